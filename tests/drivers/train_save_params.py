"""Run train_gpt2.train with command-line settings (under torchrun or alone); process 0 saves the final parameters to
$FINAL_PARAMS so tests can compare runs."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt2  # noqa: E402

if __name__ == "__main__":
    try:
        path, model = train_gpt2.train(train_gpt2.parse_args(sys.argv[1:]))
    except SystemExit as e:
        train_gpt2.exit_now(e.code)
    if path and os.environ.get("FINAL_PARAMS"):
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.environ["FINAL_PARAMS"])
    train_gpt2.exit_now(0)  # see exit_now: a plain exit after a gloo run can abort
