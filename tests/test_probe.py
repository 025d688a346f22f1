"""What a new user's probe found, each ending in no lost work, no silent wrong result, no crafted file obeyed and
one clear line: a full checkpoint folder, a second Ctrl-C, a record deleted mid-run; train data that runs out, train
and val shards that overlap, shards changed under a checkpoint; a crafted meta.json; unclear refusals; two resumes
of one checkpoint at once; --help."""
import collections
import os
import signal
from pathlib import Path

import pytest
import torch

import train_gpt2 as t
from conftest import TINY, make_shards


def train_here(args: list[str]) -> str:
    """One process, in this one, on one thread: the record's path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return t.train(t.parse_args(args))[0]
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- no lost work

Usage = collections.namedtuple("Usage", "total used free")


def test_a_full_checkpoint_folder_keeps_the_last_good_checkpoint(small_vocab_args, tmp_path, monkeypatch):
    """The disk fills once step 2 is saved: later saves first remove older checkpoints (never the newest), then,
    still short of room, write nothing and say how much is free; the run ends with step 2 to resume from."""
    records = tmp_path / "records"
    real = t.shutil.disk_usage

    def full_after_step_2(path):
        u = real(path)
        full = any(records.glob("checkpoints/*/step_000002"))
        return Usage(u.total, u.used, 0 if full else u.free)

    monkeypatch.setattr(t.shutil, "disk_usage", full_after_step_2)
    record = train_here(small_vocab_args + ["--save_every", "1", "--keep_checkpoints", "3",
                                            "--records_dir", str(records)])
    (run,) = (records / "checkpoints").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["step_000002"]  # step 1 made room, step 2 kept, no .tmp
    lines = [x for x in Path(record).read_text().splitlines() if x.startswith("checkpoint: ")]
    assert lines[1] == f"checkpoint: step:2/5 {run / 'step_000002'}"
    for line in lines[2:]:
        assert "not saved (0 MiB free in " in line and "a checkpoint needs about" in line, line
        assert line.endswith(f"the previous one stays: {run / 'step_000002'}")
    assert t.find_checkpoint("latest", str(records / "checkpoints")) == str(run / "step_000002")


def test_a_second_ctrl_c_stops_at_once_naming_the_checkpoint(capfd):
    """The first SIGINT asks for a checkpoint at the end of the step; a second one ends the run at once with exit
    status 130 and one line naming the checkpoint to continue from, not a KeyboardInterrupt traceback."""
    signals = t.StopSignals()
    signals.last = lambda: "/runs/x/step_000004"
    signals._handle(signal.SIGINT, None)
    assert signals.signum == signal.SIGINT
    with pytest.raises(SystemExit) as e:
        signals._handle(signal.SIGINT, None)
    assert e.value.code == 130
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == ("SIGINT again: stopped at once, without a checkpoint of this step; continue with --resume "
                       "/runs/x/step_000004")


def test_a_record_deleted_mid_run_is_written_again_whole(tmp_path, capfd):
    """The record file is deleted while the run writes it: the next line writes it again at its path with every
    line so far, and says so once on stderr."""
    args = t.parse_args(TINY + ["--records_dir", str(tmp_path)])
    path = str(tmp_path / "r.txt")
    record = t.Record(args, 1, torch.device("cpu"), path)
    record.log("step:1/5 train_loss:1.0")
    head = Path(path).read_text()
    os.remove(path)
    record.log("step:2/5 train_loss:0.9")
    record.log("step:3/5 train_loss:0.8")
    record.finish(1)
    assert Path(path).read_text() == head + "step:2/5 train_loss:0.9\nstep:3/5 train_loss:0.8\n" + \
        "peak memory consumption: 1 MiB\n"
    assert capfd.readouterr().err.count(f"record: {path} was deleted during the run; written again") == 1
