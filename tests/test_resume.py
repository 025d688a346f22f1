"""Checkpoints and resume: a run killed with SIGKILL after a step, or in the middle of writing a checkpoint, then
resumed, ends bitwise identical (CPU, fp32) to an uninterrupted run, for every optimizer, with 1 process (both kills
in one chain) and 2 processes (one of the two kills per optimizer);
SIGINT/SIGTERM save a checkpoint and stop every process at the same step; a checkpoint resumes with another world size.

The kills come from tests/drivers/kill_driver.py, the trainer's command with a SIGKILL at the point $TRAIN_GPT2_TEST_KILL names
("after:K": every process right after step K; "save:K": during step K's save, once its files are written, before the
rename); the signals come from here.
"""
import concurrent.futures
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt2 as t
from conftest import DRIVERS, REPO, SMALL_VOCAB, TINY, make_shards, subprocess_env, train_here

sys.path.insert(0, str(REPO / "records"))
import compare  # noqa: E402

sys.path.insert(0, str(DRIVERS))
import kill_driver  # noqa: E402

N = 8  # steps; checkpoints every 2, the newest 2 kept
# settings that put a state refresh between a checkpoint and the kill after it: SOAP's bases every 3 steps, the
# feature-gram C and its factor every 3 steps (at steps 0, 3, 6), LocoProp with a momentum buffer
OPTIMIZERS = {"muon": [], "polargrad": [], "soap": ["--soap_precondition_frequency", "3"],
              "newton_muon": ["--gram_every", "3"], "locoprop": ["--gram_every", "3", "--locoprop_momentum", "0.5"],
              "adamw": []}


def launch(nproc: int, args: list[str], kill: str = "", timeout: int = 120) -> subprocess.CompletedProcess:
    """train_gpt2.py as a command, alone or under torchrun (gloo); with `kill`, through tests/drivers/kill_driver.py."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = dict(subprocess_env(), **({kill_driver.KILL_ENV: kill} if kill else {}))
    script = DRIVERS / "kill_driver.py" if kill else REPO / "train_gpt2.py"
    return subprocess.run(launcher + [str(script)] + args, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def launch_runs(nproc: int, runs: list[list[str]], folder: Path) -> subprocess.CompletedProcess:
    """Several runs (lists of settings) one after another in one launch of
    tests/drivers/train_in_sequence.py, alone or under torchrun (gloo): one start-up of the launcher
    and its processes for all of them."""
    spec = folder / f"runs-{len(list(folder.glob('runs-*.json')))}.json"
    spec.write_text(json.dumps(runs))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run(launcher + [str(DRIVERS / "train_in_sequence.py"), str(spec)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300,
                          cwd=REPO)


def saved(records: Path) -> list[str]:
    """What the single run folder under records/checkpoints holds, less the .lock a killed resumed run
    leaves (train_gpt2.run_lock: a file whose lock went with the process)."""
    (run,) = (records / "checkpoints").iterdir()
    return sorted(p.name for p in run.iterdir() if p.name != ".lock")


def final_state(records: Path, step: int = N) -> dict:
    """Every .pt of the run's step_<step> checkpoint; from main.pt's progress only what must not depend on timing."""
    (run,) = (records / "checkpoints").iterdir()
    files = {p.stem: torch.load(p, weights_only=True) for p in (run / f"step_{step:06d}").glob("*.pt")}
    progress = files["main"].pop("progress")
    files["main"]["progress"] = {"step": progress["step"], "losses": progress["losses"]}
    return files


def assert_bitwise(a, b, where: str = "") -> None:
    """Same structure, same values; tensors of the same dtype and shape with the same bits."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (where, a, b)


def losses(record: str) -> tuple[list, list]:
    """(step, train loss) and (step, val loss) as records/compare.py reads them from a record."""
    run = compare.parse_record(record)
    return [(s, v) for s, v, *_ in run.train], [(s, v) for s, v, _ in run.val]


def kill_chain(nproc: int, args: list[str], chain: Path, kills: list[str]) -> list[subprocess.CompletedProcess]:
    """A run killed at kills[0] (from scratch, saving every 2 steps), then one resumed from the latest checkpoint and
    killed at kills[1], ...; the caller resumes it to the end."""
    runs, resume = [], ["--resume", "latest", "--records_dir", str(chain)]
    for kill in kills:
        runs.append(launch(nproc, resume if runs else args + ["--records_dir", str(chain)], kill=kill))
        if runs[-1].returncode == 0:  # not killed: check_kills says so
            return runs
    return runs


def check_kills(runs: list[subprocess.CompletedProcess], kills: list[str], nproc: int) -> None:
    """Each run died where its kill said: "after:5" right after step 5's line, "save:6" during step 6's save."""
    for run, kill, resumed in zip(runs, kills, [False, True]):
        out = run.stdout
        assert run.returncode == (-signal.SIGKILL if nproc == 1 else 1), out[-1500:] + run.stderr[-3000:]
        assert ("resumed: step:4/8" in out) == resumed and "peak memory" not in out
        if kill == "after:5":
            assert "step:5/8 train_loss" in out and "step:6/8" not in out, out[-1500:]
        else:
            assert "step:6/8 train_loss" in out and "checkpoint: step:6/8" not in out, out[-1500:]
        if nproc > 1:  # torchrun reports the killed workers
            assert "SIGKILL" in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_killed_and_resumed_run_is_bitwise_identical(small_vocab_args, tmp_path, optimizer):
    args = small_vocab_args + ["--num_iterations", str(N), "--save_every", "2", "--optimizer", optimizer,
                               *OPTIMIZERS[optimizer]]
    reference, _ = train_here(args + ["--records_dir", str(tmp_path / "ref")])
    chain, kills = tmp_path / "chain", ["after:5", "save:6"]
    runs = kill_chain(1, args, chain, kills)
    check_kills(runs, kills, 1)
    assert len(runs) == 2
    assert saved(chain) == ["step_000002", "step_000004", "step_000006.tmp"]  # the cut save left the old ones valid
    assert t.find_checkpoint("latest", str(chain / "checkpoints")).endswith("step_000004")
    record, _ = train_here(["--resume", "latest", "--records_dir", str(chain)])
    assert saved(chain) == ["step_000006", "step_000008"]  # --keep_checkpoints 2; the unfinished save is gone
    assert_bitwise(final_state(tmp_path / "ref"), final_state(chain))
    assert losses(record) == losses(reference) and len(losses(record)[0]) == N
    run = compare.parse_record(record)
    assert run.complete and run.resumed_at == [4, 4]


# with 2 processes, each optimizer's run is killed once (half of them right after step 5, half in the middle of saving
# step 6), then resumed
TWO_PROCESS_KILL = {"muon": "after:5", "polargrad": "save:6", "soap": "after:5", "newton_muon": "save:6",
                    "locoprop": "after:5", "adamw": "save:6"}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """For every optimizer, with 2 processes: the killed run (one torchrun each, 3 at a time); then one torchrun that
    trains every optimizer's uninterrupted run and resumes every killed one, one after another."""
    root = tmp_path_factory.mktemp("two")
    train, val = make_shards(root / "shards", vocab=SMALL_VOCAB)
    base = TINY + ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train, "--input_val_bin", val,
                   "--num_iterations", str(N), "--save_every", "2"]
    args = {o: base + ["--optimizer", o, *OPTIMIZERS[o]] for o in OPTIMIZERS}

    def killed(optimizer):
        return launch(2, args[optimizer] + ["--records_dir", str(root / optimizer / "chain")],
                      kill=TWO_PROCESS_KILL[optimizer])

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        kills = dict(zip(OPTIMIZERS, pool.map(killed, OPTIMIZERS)))
    rest = launch_runs(2, [args[o] + ["--records_dir", str(root / o / "ref")] for o in OPTIMIZERS]
                       + [["--resume", "latest", "--records_dir", str(root / o / "chain")] for o in OPTIMIZERS], root)
    return root, kills, rest


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_two_processes_killed_and_resumed_is_bitwise_identical(two_process_runs, optimizer):
    root, kills, rest = two_process_runs
    check_kills([kills[optimizer]], [TWO_PROCESS_KILL[optimizer]], 2)
    assert rest.returncode == 0, rest.stdout[-1500:] + rest.stderr[-3000:]  # the references and the resumed runs
    chain = root / optimizer / "chain"
    assert saved(chain) == ["step_000006", "step_000008"]
    ours, theirs = final_state(root / optimizer / "ref"), final_state(chain)
    assert set(ours) == {"main", "rank0", "rank1"}  # each process saved the optimizer state it owns
    assert_bitwise(ours, theirs)
    (ref_record,), (record,) = (root / optimizer / "ref").glob("*.txt"), chain.glob("*.txt")
    assert losses(str(record)) == losses(str(ref_record)) and compare.parse_record(record).resumed_at == [4]

    # another world size: 1 process resumes the 2-process checkpoint of step 6 (each matrix's state now on rank 0)
    (run,) = (chain / "checkpoints").iterdir()
    train_here(["--resume", str(run / "step_000006")])
    one = final_state(chain)["main"]
    for name, p in ours["main"]["model"].items():  # 2 processes vs 1 with accumulation: equal up to rounding
        torch.testing.assert_close(one["model"][name], p, rtol=1e-4, atol=1e-5)
    assert one["progress"]["losses"] == pytest.approx(ours["main"]["progress"]["losses"], abs=1e-5)
    assert "world_size:1 (saved with 2)" in record.read_text()


def run_until_signal(cmd: list[str], sig: int) -> tuple[int, str]:
    """Start cmd, send sig to it once step 2 is logged; (exit code, everything it printed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            cwd=REPO)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("step:2/"):
                proc.send_signal(sig)
                break
        out.append(proc.communicate(timeout=120)[0])
    finally:
        proc.kill()
    return proc.returncode, "".join(out)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_signal_saves_a_checkpoint_and_the_run_resumes_exactly(tiny_args, tmp_path, nproc, sig):
    """SIGINT to the process, or SIGTERM to torchrun (which passes it to every process): each process finishes its
    step, all save the same step, the record says stopped, the exit code is 128 + the signal; resuming gives the
    uninterrupted run. The full vocabulary makes steps slow enough (~80 ms) for the signal to land mid-run."""
    args = tiny_args + ["--num_iterations", "16", "--records_dir", str(tmp_path / "stopped")]
    prefix = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
              if nproc > 1 else [sys.executable])
    code, out = run_until_signal(prefix + [str(REPO / "train_gpt2.py")] + args, sig)
    stopped = [line for line in out.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and f"by {signal.Signals(sig).name}" in stopped[0], out[-3000:]
    step = int(stopped[0].split("step:")[1].split("/")[0])
    assert 2 <= step < 16 and saved(tmp_path / "stopped") == [f"step_{step:06d}"]
    assert set(final_state(tmp_path / "stopped", step)) == {"main"} | {f"rank{r}" for r in range(nproc)}
    assert code == (128 + sig if nproc == 1 else 1)  # torchrun itself exits 1 when signalled
    resume = ["--resume", "latest", "--records_dir", str(tmp_path / "stopped")]
    if nproc == 1:
        record, _ = train_here(resume)
        reference, _ = train_here(tiny_args + ["--num_iterations", "16", "--records_dir",
                                               str(tmp_path / "ref")])
    else:
        done = launch_runs(2, [resume, args[:-1] + [str(tmp_path / "ref")]], tmp_path)  # resumed, then the reference
        assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
        (record,), (reference,) = (tmp_path / "stopped").glob("*.txt"), (tmp_path / "ref").glob("*.txt")
    assert_bitwise(final_state(tmp_path / "ref", 16), final_state(tmp_path / "stopped", 16))
    assert losses(str(record)) == losses(str(reference))
    assert compare.parse_record(record).resumed_at == [step]


def test_training_time_continues_across_a_resume(small_vocab_args, tmp_path):
    """Resumed at step 15 of 30: train_time goes on from the checkpoint's; the 10 steps after the start are warm-up
    again (untimed: train_time stays, step_avg over the 5 timed steps before), then it is timed as before."""
    records = tmp_path / "records"
    train_here(small_vocab_args + ["--num_iterations", "30", "--warmup_iters", "2", "--warmdown_iters", "2",
                                   "--save_every", "15", "--keep_checkpoints", "3", "--records_dir", str(records)])
    (run,) = (records / "checkpoints").iterdir()
    saved_ms = torch.load(run / "step_000015" / "main.pt", weights_only=True)["progress"]["training_ms"]
    record, _ = train_here(["--resume", str(run / "step_000015")])
    text = Path(record).read_text().split("resumed: step:15/30")
    before = {int(s): (int(ms), float(avg)) for s, ms, avg in
              re.findall(r"^step:(\d+)/30 train_loss:\S+ train_time:(\d+)ms step_avg:(\S+)ms", text[0], re.M)}
    after = {int(s): (int(ms), float(avg)) for s, ms, avg in
             re.findall(r"^step:(\d+)/30 train_loss:\S+ train_time:(\d+)ms step_avg:(\S+)ms", text[1], re.M)}
    assert sorted(after) == list(range(16, 31))
    assert before[15][0] <= round(saved_ms) and before[15][1] == pytest.approx(before[15][0] / 5, abs=0.11)
    for s in range(16, 26):  # warm-up after the start: nothing timed
        assert after[s] == (round(saved_ms), pytest.approx(saved_ms / 5, abs=0.01))
    times = [after[s][0] for s in range(25, 31)]
    assert times == sorted(times) and times[-1] > times[0]
    for s in range(26, 31):
        assert after[s][1] == pytest.approx(after[s][0] / (5 + s - 25), abs=0.2)  # train_time is rounded to 1 ms
    final = compare.parse_record(record)
    assert final.complete and final.train_time_ms >= times[-1]


@pytest.mark.slow
def test_stop_at_saves_and_the_resumed_run_is_the_whole_schedule(small_vocab_args, tmp_path):
    """--stop_at 3 of an 8-step schedule: the run validates at step 3, saves step_000003, says `stopped: ... by
    --stop_at` with the resume command, ends with exit status 0 and its peak memory, and the LR schedule is the 8-step
    one (step 3's multiplier is that of the 8-step run). --resume latest (stop_at back to 0) runs steps 4..8 and ends
    bitwise identical to an uninterrupted run; compare.py reads the stopped record as a complete 3-step run (its own
    config), the resumed one as the complete 8-step run with the uninterrupted run's config."""
    args = small_vocab_args + ["--num_iterations", str(N), "--warmup_iters", "4", "--warmdown_iters", "2",
                               "--optimizer", "soap", "--soap_precondition_frequency", "3"]
    reference, _ = train_here(args + ["--records_dir", str(tmp_path / "ref")])
    run = launch(1, args + ["--records_dir", str(tmp_path / "stopped"), "--stop_at", "3"])
    assert run.returncode == 0, run.stderr[-2000:]
    (record,) = map(str, (tmp_path / "stopped").glob("*.txt"))
    text = Path(record).read_text()
    assert re.search(r"^step:3/8 val_loss:", text, re.M) and "step:4/8" not in text
    assert re.search(r"^stopped: step:3/8 by --stop_at; continue with --resume \S+step_000003$", text, re.M)
    assert saved(tmp_path / "stopped") == ["step_000003"]
    stopped = compare.parse_record(record)
    assert stopped.complete and stopped.stopped_at == stopped.end_step == stopped.last_step == 3
    assert stopped.peak_mib is not None and stopped.final_val_loss == float(re.search(r"^step:3/8 val_loss:(\S+)",
                                                                                       text, re.M)[1])
    assert stopped.config != compare.parse_record(reference).config
    assert losses(record)[0] == losses(reference)[0][:3]  # the 8-step schedule's first 3 steps
    resumed, _ = train_here(["--resume", "latest", "--records_dir", str(tmp_path / "stopped")])
    assert resumed == record and 'changed: {"stop_at": 0}' in Path(record).read_text()
    assert_bitwise(final_state(tmp_path / "ref"), final_state(tmp_path / "stopped"))
    assert losses(record) == losses(reference)
    run = compare.parse_record(record)
    assert run.complete and run.resumed_at == [3] and run.stopped_at is None and run.end_step == 8
    assert run.config == compare.parse_record(reference).config


def test_resuming_a_finished_run_says_it_is_complete_and_writes_nothing(small_vocab_args, tmp_path):
    """--resume latest on a run that reached its last step: one line on stdout, exit status 0, the record and the
    checkpoints as they were (no re-validation, no duplicated lines)."""
    records = tmp_path / "records"
    record, _ = train_here(small_vocab_args + ["--records_dir", str(records)])
    (run,) = (records / "checkpoints").iterdir()
    before = Path(record).read_bytes(), sorted(p.name for p in run.iterdir())
    r = launch(1, ["--resume", "latest", "--records_dir", str(records)])
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    assert r.stdout == (f"--resume {run / 'step_000005'}: the run is complete (step 5/5, record {record}); nothing to "
                        f"do\n")
    assert (Path(record).read_bytes(), sorted(p.name for p in run.iterdir())) == before


def test_a_checkpoint_saved_before_a_setting_existed_resumes_with_its_default(small_vocab_args,
                                                                             tmp_path):
    """A checkpoint whose settings and Muon group lack muon_lerp and muon_weight_decay (saved by a
    train_gpt2.py before they existed) resumes with their defaults, bitwise as an uninterrupted
    run."""
    args = small_vocab_args + ["--num_iterations", str(N), "--warmup_iters", "4",
                               "--warmdown_iters", "2"]
    train_here(args + ["--records_dir", str(tmp_path / "ref")])
    train_here(args + ["--records_dir", str(tmp_path / "old"), "--stop_at", "3"])
    (folder,) = (tmp_path / "old" / "checkpoints").glob("*/step_000003")
    meta = json.loads((folder / "meta.json").read_text())
    for k in ("muon_lerp", "muon_weight_decay"):
        del meta["args"][k]
    (folder / "meta.json").write_text(json.dumps(meta))
    main = torch.load(folder / "main.pt", weights_only=False)
    for k in ("lerp", "weight_decay"):
        del main["param_groups"][1][0][k]
    torch.save(main, folder / "main.pt")
    train_here(["--resume", "latest", "--records_dir", str(tmp_path / "old")])
    assert_bitwise(final_state(tmp_path / "ref"), final_state(tmp_path / "old"))
