"""Faults a user's input or machine can cause, each ending in one clear line (exit status != 0 for a mistake) with
nothing lost: a full or read-only disk at a checkpoint, bad data found before the first step, broken checkpoints,
unwritable folders, bad command lines, allocations too large. records/robustness/README.md lists every class with its
tests."""
import errno
import json
import re
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as t
from conftest import REPO, SMALL_VOCAB, TINY, make_shards, subprocess_env, write_datafile

sys.path.insert(0, str(REPO / "records"))
import compare  # noqa: E402


def run_train(args: list[str], limit_file_bytes: int = 0, nproc: int = 1, timeout: int = 180,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """train_gpt2.py as a command (under torchrun for nproc > 1); limit_file_bytes > 0: no file it writes may grow
    past that size (RLIMIT_FSIZE: a write beyond fails with EFBIG, as on a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run(launcher + [str(REPO / "train_gpt2.py")] + args, capture_output=True, text=True,
                          env={**subprocess_env(), **(env or {})}, timeout=timeout, cwd=REPO,
                          preexec_fn=limit if limit_file_bytes else None)


def train_here(args: list[str]) -> str:
    """One process, in this one, on one thread: the record's path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return t.train(t.parse_args(args))[0]
    finally:
        torch.set_num_threads(threads)


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


def lines_of(record: str, prefix: str) -> list[str]:
    return [line for line in Path(record).read_text().splitlines() if line.startswith(prefix)]


# ----------------------------------------------------------------------------- runs lost


def test_failed_end_checkpoint_keeps_the_result_and_the_previous_checkpoint(small_vocab_args, tmp_path, monkeypatch):
    """The end-of-run save fails (EROFS on its first file): the final val line and the record's other lines come
    first, the failure is one record line naming the reason and the checkpoint kept, step_<n>.tmp/ is gone, the run
    ends normally; the earlier checkpoints stay and resume."""
    real = t._save_synced

    def read_only_at_the_end(obj, path):
        if "step_000005" in path:
            raise OSError(errno.EROFS, "Read-only file system", path)
        real(obj, path)

    monkeypatch.setattr(t, "_save_synced", read_only_at_the_end)
    records = tmp_path / "records"
    record = train_here(small_vocab_args + ["--save_every", "2", "--records_dir", str(records)])
    text = Path(record).read_text().split(t.RECORD_MARK)[-1]  # the lines after the source
    val, failed, peak = (text.index(s) for s in ("step:5/5 val_loss:", "checkpoint: step:5/5 not saved",
                                                  "peak memory consumption"))
    assert val < failed < peak
    (line,) = lines_of(record, "checkpoint: step:5/5")
    (run,) = (records / "checkpoints").iterdir()
    assert "(Read-only file system: " in line and line.endswith(f"the previous one stays: {run / 'step_000004'}")
    assert sorted(p.name for p in run.iterdir()) == ["step_000002", "step_000004"]  # no step_000005.tmp
    assert compare.parse_record(record).complete
    assert t.find_checkpoint("latest", str(records / "checkpoints")) == str(run / "step_000004")


def test_full_disk_at_every_save_loses_no_result(tiny_args, tmp_path):
    """No file may grow past 4 MB (the checkpoint's optimizer file would be ~26 MB): every save fails with a real
    OSError (EFBIG) through torch.save, the run still validates, records and exits 0, and no partial save is left."""
    records = tmp_path / "records"
    r = run_train(tiny_args + ["--save_every", "2", "--records_dir", str(records)], limit_file_bytes=4 << 20)
    no_traceback(r)
    assert r.returncode == 0, r.stderr[-3000:]
    (record,) = map(str, records.glob("*.txt"))
    failed = lines_of(record, "checkpoint: ")
    assert [f.split()[1] for f in failed] == ["step:2/5", "step:4/5", "step:5/5"]
    assert all("not saved (File too large: " in f for f in failed)
    assert failed[0].endswith("no earlier checkpoint")
    assert re.search(r"^step:5/5 val_loss:", Path(record).read_text(), re.M) and compare.parse_record(record).complete
    assert [p.name for p in (records / "checkpoints").rglob("*")] == [Path(record).stem]  # an empty run folder


def test_two_processes_agree_on_a_failed_save(tiny_args, tmp_path):
    """Process 0's file (the embedding's AdamW state) exceeds the limit, process 1's does not: both see the save
    failed, neither waits for the other forever, the run ends with its record, nothing partial is left."""
    records = tmp_path / "records"
    r = run_train(tiny_args + ["--records_dir", str(records)], limit_file_bytes=4 << 20, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    (record,) = map(str, records.glob("*.txt"))
    (failed,) = lines_of(record, "checkpoint: ")
    assert "step:5/5 not saved (File too large: " in failed and "rank0.pt" in failed
    assert compare.parse_record(record).complete
    assert not list((records / "checkpoints").rglob("*.tmp"))


def test_bad_token_id_in_a_later_shard_stops_before_the_first_step(tmp_path):
    """The second train shard holds an id >= the vocabulary: refused with its path before any record or step."""
    train, val = make_shards(tmp_path / "s", train_sizes=(3000, 3000))
    ids = np.random.default_rng(1).integers(0, 50257, 3000)
    ids[2500] = 50300
    write_datafile(str(tmp_path / "s" / "t_train_000002.bin"), ids)
    r = run_train(TINY + ["--input_bin", train, "--input_val_bin", val, "--records_dir", str(tmp_path / "rec")])
    no_traceback(r)
    assert r.returncode == 1 and not (tmp_path / "rec").exists()
    assert r.stderr.startswith(f"data error: {tmp_path / 's' / 't_train_000002.bin'}: token id 50300 >= vocab size")
    assert "step:" not in r.stdout
