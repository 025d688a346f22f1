"""Divergence: a non-finite train loss or parameter stops the run at that step, with a message naming the step, the
optimizer and the first non-finite parameter; the record says diverged with the last good step; the last checkpoint
stays; the exit status is 1. Learning rates far too large make it happen at step 2."""
import subprocess
import sys

import pytest
import torch

import train_gpt2 as t
from conftest import REPO, subprocess_env, train_here
from test_resume import compare, saved

WTE = "transformer.wte.weight (256, 64), updated by the embedding/head AdamW"
CASES = {  # settings -> what the message says besides the step, the optimizer and the checkpoint
    # Muon steps so large that the next forward overflows in fp32 (q k^T of weights ~1e29): the loss is NaN, and so is
    # the embedding's gradient and AdamW update (at 1e12 the overflow came in the backward or not at all, by CPU)
    "muon": (["--muon_lr", "1e30"], ["train loss nan", f"first non-finite parameter: {WTE}"]),
    # the loss itself is NaN
    "adamw": (["--optimizer", "adamw", "--adamw_lr", "1e18"], ["train loss nan", f"first non-finite parameter: {WTE}"]),
    # C of the overflowing activations is not finite: its Cholesky fails in the refresh, before the update
    "newton_muon": (["--optimizer", "newton_muon", "--gram_every", "1", "--muon_lr", "1e12"],
                    ["Gram refresh: Cholesky of C + 1000 gamma I failed", "C is not finite"]),
}


def check_diverged(message: str, records, optimizer: str, says: list[str]) -> None:
    (record,) = records.glob("*.txt")
    (run,) = (records / "checkpoints").iterdir()
    assert message.startswith(f"diverged at step 2/8 (optimizer {optimizer}): ")
    assert f"Last good step 1; last checkpoint: {run / 'step_000001'} (kept)" in message
    for fragment in says:
        assert fragment in message, message
    assert saved(records) == ["step_000001"]  # nothing saved after the last good step
    last = record.read_text().splitlines()[-1]
    assert last.startswith(f"diverged: step:2/8 last_good_step:1 optimizer:{optimizer} ")
    parsed = compare.parse_record(record)
    assert (parsed.diverged_at, parsed.last_good_step, parsed.last_step, parsed.complete) == (2, 1, 1, False)


@pytest.mark.parametrize("optimizer", list(CASES))
def test_divergence_stops_the_run_within_one_step(small_vocab_args, tmp_path, optimizer):
    settings, says = CASES[optimizer]
    args = small_vocab_args + ["--num_iterations", "8", "--save_every", "1", "--records_dir", str(tmp_path), *settings]
    with pytest.raises(SystemExit) as stop:
        train_here(args)
    assert isinstance(stop.value.code, str)  # printed, exit status 1
    check_diverged(stop.value.code, tmp_path, t.parse_args(args).optimizer, says)


def test_a_nonfinite_update_stops_the_run_while_the_loss_is_finite(small_vocab_args, tmp_path, monkeypatch):
    """A Muon update that leaves the block matrices non-finite at step 2 (poisoned here, the loss still finite) stops
    the run at that step, naming the first of them in model order and its optimizer."""
    calls, step = [0], t.Muon.step

    def poisoned(self):
        step(self)
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                torch._foreach_mul_(t.optimizer_params(self), float("nan"))

    monkeypatch.setattr(t.Muon, "step", poisoned)
    args = small_vocab_args + ["--num_iterations", "8", "--save_every", "1", "--records_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as stop:
        t.train(t.parse_args(args))
    check_diverged(stop.value.code, tmp_path, "muon",
                   ["train loss 5.6", "first non-finite parameter: transformer.h.0.attn.c_attn.weight (192, 64), "
                                      "updated by muon"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_diverged_command_exits_nonzero(small_vocab_args, tmp_path, nproc):
    """As a command, alone and as 2 processes under torchrun (where the Gram refresh fails on the matrices' owners,
    and the all-reduced flag stops both processes at the same step)."""
    settings, says = CASES["newton_muon" if nproc == 2 else "adamw"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    r = subprocess.run(launcher + [str(REPO / "train_gpt2.py")] + small_vocab_args + [
        "--num_iterations", "8", "--save_every", "1", "--records_dir", str(tmp_path), *settings],
        capture_output=True, text=True, env=subprocess_env(), timeout=120, cwd=REPO)
    assert r.returncode == 1, r.stderr[-3000:]
    message = next(line for line in r.stderr.splitlines() if line.startswith("diverged at step"))
    check_diverged(message, tmp_path, "newton_muon" if nproc == 2 else "adamw", says)
    if nproc == 1:
        assert r.stderr.strip() == message  # one message, no traceback
