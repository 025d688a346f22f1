"""Shared fixtures: the repo on sys.path, tiny shards made by the tests themselves, a tiny model
config, torch on one CPU thread (one_thread) and a training run in this process (train_here)."""
import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DRIVERS = REPO / "tests" / "drivers"  # programs the tests start as processes
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from data.fineweb import write_datafile  # noqa: E402

# a 2-layer, 64-wide GPT on 32-token sequences; 4 sequences a step, 2 per micro-batch on one process
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--sequence_length", "32", "--batch_size", "4",
        "--device_batch_size", "2", "--num_iterations", "5", "--warmup_iters", "2", "--warmdown_iters", "2",
        "--val_loss_every", "0", "--val_tokens", "256", "--compile", "0"]


def make_shards(folder: Path, train_sizes=(3000, 2500), val_sizes=(1000,), seed: int = 0,
                vocab: int = 50257) -> tuple[str, str]:
    """Random-token shards `t_train_00000i.bin` and `t_val_00000i.bin` (ids < vocab); returns the two glob patterns."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(val_sizes):
        write_datafile(str(folder / f"t_val_{i:06d}.bin"), rng.integers(0, vocab, n))
    for i, n in enumerate(train_sizes):
        write_datafile(str(folder / f"t_train_{i + 1:06d}.bin"), rng.integers(0, vocab, n))
    return str(folder / "t_train_*.bin"), str(folder / "t_val_*.bin")


# TINY with a 256-token vocabulary (shards from make_shards(..., vocab=256)): the head no longer dominates a step
SMALL_VOCAB = 256


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    """Command-line settings for a tiny run on fresh shards, writing records into tmp_path/records."""
    train, val = make_shards(tmp_path / "shards")
    return TINY + ["--input_bin", train, "--input_val_bin", val, "--records_dir", str(tmp_path / "records")]


@pytest.fixture
def small_vocab_args(tmp_path: Path) -> list[str]:
    """TINY on fresh shards of SMALL_VOCAB token ids, --vocab_size SMALL_VOCAB; no --records_dir."""
    train, val = make_shards(tmp_path / "shards", vocab=SMALL_VOCAB)
    return TINY + ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train, "--input_val_bin", val]


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


@contextlib.contextmanager
def single_thread():
    """torch on one CPU thread inside, the previous count restored after: as the trainer's commands
    run (subprocess_env's OMP_NUM_THREADS=1); a predictable time when other jobs share the cores
    (oversubscribed OpenMP threads spin); CPU reductions split the same way in every process."""
    import torch  # here, not above: the tests of data/ and of the downloader never load torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The test on one CPU thread (single_thread); a module puts all its tests on one thread with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with single_thread():
        yield


def train_here(args: list[str]):
    """train_gpt2.train on the command-line settings `args` in this process, on one thread
    (single_thread): what train returns, (the record's path, the model)."""
    import train_gpt2 as t
    with single_thread():
        return t.train(t.parse_args(args))
