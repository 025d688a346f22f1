"""Run train_gpt2.train for each list of settings in the JSON file argv[1], one after another in this process (alone or
under torchrun, where each run sets up and tears down its process group): many runs for one start-up. Exit status:
0 if every run ended normally, else the first failing run's."""
import json
import os
import sys

from torch.distributed import distributed_c10d

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt2  # noqa: E402

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        runs = json.load(f)
    # what each run returns (its record and model) is kept until exit_now: freeing a run's DDP model here, its
    # gloo process group's destructor joins a worker thread that waits for the GIL this thread holds (a deadlock
    # seen between two runs of a 2-process launch)
    kept = []
    for i, argv in enumerate(runs):
        # each run's process group under its own name, so its store keys are new: destroying a group leaves the last
        # one's keys (gloo's addresses) in torchrun's store, and a group of the same name could read them
        distributed_c10d._world.group_count = 1000 * i
        try:
            kept.append(train_gpt2.train(train_gpt2.parse_args(argv)))
        except SystemExit as e:
            if e.code not in (None, 0):
                train_gpt2.exit_now(e.code)
    train_gpt2.exit_now(0)  # see exit_now: a plain exit after a gloo run can abort
