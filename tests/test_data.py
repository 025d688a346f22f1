"""The data path against hand-made shards: good ones load, each fault stops the run with a clear message, and the
token stream per step is the same for any number of processes."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_gpt2 as t
from conftest import REPO, TINY, make_shards, subprocess_env, write_datafile

CPU = torch.device("cpu")


def raw_shard(path, header, tokens):
    h = np.zeros(256, dtype=np.int32)
    h[: len(header)] = header
    with open(path, "wb") as f:
        f.write(h.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def test_good_shards_load(tmp_path):
    train, val = make_shards(tmp_path, train_sizes=(300, 200))
    files = t.check_shards(train, 129, "train")
    assert [f.rsplit("/", 1)[1] for f in files] == ["t_train_000001.bin", "t_train_000002.bin"]
    toks = t.load_shard(files[1], 50257)
    assert len(toks) == 200 == t.shard_token_count(files[1])
    write_datafile(str(tmp_path / "k.bin"), [5, 6, 50256])
    assert list(t.load_shard(str(tmp_path / "k.bin"), 50257)) == [5, 6, 50256]


@pytest.mark.parametrize("case,fault", [
    ("short_file", "shorter than the 1024-byte header"),
    ("magic", "magic number 123"),
    ("version", "version 7"),
    ("truncated", "header says 100 tokens"),
    ("too_long", "header says 100 tokens"),
])
def test_bad_headers(tmp_path, case, fault):
    p = str(tmp_path / "bad.bin")
    if case == "short_file":
        open(p, "wb").write(b"\0" * 100)
    else:
        header = {"magic": [123, 1, 100], "version": [20240520, 7, 100]}.get(case, [20240520, 1, 100])
        n = {"truncated": 60, "too_long": 101}.get(case, 100)
        raw_shard(p, header, np.arange(n))
    with pytest.raises(t.ShardError, match=fault) as e:
        t.shard_token_count(p)
    assert p in str(e.value) and "fix:" in str(e.value)


def test_missing_few_tokens_and_bad_ids(tmp_path):
    with pytest.raises(t.ShardError, match="no train shards match"):
        t.check_shards(str(tmp_path / "nothing_*.bin"), 1, "train")
    write_datafile(str(tmp_path / "small.bin"), np.arange(100))
    with pytest.raises(t.ShardError, match="100 tokens, fewer than the 129 one train step needs"):
        t.check_shards(str(tmp_path / "small.bin"), 129, "train")
    write_datafile(str(tmp_path / "ids.bin"), [1, 2, 60000])
    with pytest.raises(t.ShardError, match="token id 60000 >= vocab size 50257"):
        t.load_shard(str(tmp_path / "ids.bin"), 50257)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["missing", "truncated", "val_too_small", "token_ids"])
def test_run_refuses_bad_data_before_building_anything(tmp_path, fault):
    train, val = make_shards(tmp_path / "s", train_sizes=(3000,), val_sizes=(200,) if fault == "val_too_small"
                             else (1000,))
    if fault == "missing":
        train = str(tmp_path / "s" / "nope_*.bin")
    if fault == "truncated":
        path = tmp_path / "s" / "t_train_000001.bin"
        path.write_bytes(path.read_bytes()[:-10])
    if fault == "token_ids":
        write_datafile(str(tmp_path / "s" / "t_train_000001.bin"), np.full(3000, 50300))
    args = TINY + ["--input_bin", train, "--input_val_bin", val, "--records_dir", str(tmp_path / "rec")]
    r = subprocess.run([sys.executable, str(REPO / "train_gpt2.py")] + args, capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode != 0
    msg = {"missing": "no train shards match", "truncated": "truncated or corrupt",
           "val_too_small": "val shards hold 200 tokens", "token_ids": "token id 50300 >= vocab size"}[fault]
    assert msg in r.stderr and "fix:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "rec").exists()  # token ids too: every shard is checked before the record


def batches(loader, steps, accum):
    return [[loader.next_batch() for _ in range(accum)] for _ in range(steps)]


@pytest.mark.parametrize("world", [2, 4])
def test_same_tokens_per_step_for_any_world_size(tmp_path, world):
    """W processes with accumulation A/W read exactly the tokens one process reads with accumulation A, per step,
    across shard switches (steps of 8 x 16 tokens over shards of 300 and 700 tokens: tails are skipped)."""
    train, _ = make_shards(tmp_path, train_sizes=(300, 700))
    files = t.check_shards(train, 129, "train")
    B, T, A = 2, 16, 4
    one = batches(t.DataLoader(files, B, T, 0, 1, A, 50257, CPU), 9, A)
    per_rank = [batches(t.DataLoader(files, B, T, r, world, A // world, 50257, CPU), 9, A // world)
                for r in range(world)]
    for step in range(9):
        ref = torch.cat([x for x, _ in one[step]])
        got = torch.cat([per_rank[r][step][m][0] for m in range(A // world) for r in range(world)])
        assert torch.equal(ref, got)
    xs = [x for x, _ in one[0]]
    ys = [y for _, y in one[0]]
    assert torch.equal(xs[0][0, 1:], ys[0][0, :-1])
    toks = t.load_shard(files[0], 50257)
    assert torch.equal(torch.cat(xs).flatten(), torch.from_numpy(toks[:128].astype(np.int64)))
    # 300 tokens hold two 128-token steps (+1); the third starts the 700-token shard
    toks2 = t.load_shard(files[1], 50257)
    assert torch.equal(torch.cat([x for x, _ in one[2]]).flatten(), torch.from_numpy(toks2[:128].astype(np.int64)))


def test_val_tokens_are_the_same_for_any_world_size(tmp_path):
    _, val = make_shards(tmp_path, val_sizes=(200, 300))  # val spans two shards
    files = sorted(t.check_shards(val, 0, "val"))
    tokens = t.load_val_tokens(files, 384, 50257)
    assert len(tokens) == 385
    one = [x for x, _ in t.val_batches(tokens, 2, 16, 0, 1, CPU)]
    two = [[x for x, _ in t.val_batches(tokens, 2, 16, r, 2, CPU)] for r in range(2)]
    assert len(one) == 12 and len(two[0]) == len(two[1]) == 6
    assert torch.equal(torch.stack(one), torch.stack([two[i % 2][i // 2] for i in range(12)]))
    expect = np.concatenate([t.load_shard(f, 50257) for f in files])[:384]
    assert torch.equal(torch.cat(one).flatten(), torch.from_numpy(expect.astype(np.int64)))
