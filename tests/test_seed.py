"""--seed varies the init and only the init; --deterministic 1 makes reruns bit-identical (and leaves the process's
flags as they were); both are in the record."""
import hashlib
import json
import os
import random
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as t
from conftest import REPO, SMALL_VOCAB, TINY, make_shards, train_here

OP_WARNING = ("index_add_cuda_ does not have a deterministic implementation, but you set "
              "'torch.use_deterministic_algorithms(True, warn_only=True)'.")

ORIGINAL = t.DataLoader.next_batch, t.val_batches, t.build_optimizers  # what run() wraps, not a wrapper of before


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("seed")
    train, val = make_shards(root / "shards", vocab=SMALL_VOCAB)
    return TINY + ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train, "--input_val_bin", val,
                   "--matmul_check", "0", "--records_dir", str(root / "records")]


def run(argv: list[str], monkeypatch) -> dict:
    """One tiny run on one thread, observed: the batches it trained and validated on, its parameters as built (and the
    global RNG states right then), its record's step lines, settings and final parameters, the RNG states after."""
    seen = dict(train=[], val=[])
    next_batch, val_batches, build = ORIGINAL

    def record_batch(self):
        x, y = next_batch(self)
        seen["train"].append(x.clone())
        return x, y

    def record_val(*a, **k):
        for x, y in val_batches(*a, **k):
            seen["val"].append(x.clone())
            yield x, y

    def record_init(model, args):
        seen["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seen["rng_after_init"] = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        return build(model, args)

    monkeypatch.setattr(t.DataLoader, "next_batch", record_batch)
    monkeypatch.setattr(t, "val_batches", record_val)
    monkeypatch.setattr(t, "build_optimizers", record_init)
    path, model = train_here(argv)
    seen["rng_at_end"] = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    seen["final"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen["digest"] = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for _, p in model.named_parameters())
                                    ).hexdigest()
    text = open(path).read().split(t.RECORD_MARK)[-1]
    seen["steps"] = re.findall(r"^step:\d+/\d+ (?:train|val)_loss:\S+", text, re.M)
    seen["settings"] = json.loads(re.search(r"^hyperparameters: (.*)$", text, re.M).group(1))
    seen["text"] = text
    return seen


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_changes_the_init_and_nothing_else(shards, monkeypatch):
    """Seeds 0 and 1: different initial parameters; the same train batches, in the same order, and the same val
    tokens; after the init nothing draws from the seeded generators (torch, numpy, random): their states at the end
    are those right after the init. The same seed again: the identical run (step lines and final parameters)."""
    a = run(shards + ["--seed", "0"], monkeypatch)
    b = run(shards + ["--seed", "1"], monkeypatch)
    again = run(shards + ["--seed", "0"], monkeypatch)
    assert a["settings"]["seed"] == 0 and b["settings"]["seed"] == 1
    assert not any(torch.equal(a["init"][k], b["init"][k]) for k in a["init"] if a["init"][k].is_floating_point()
                   and k.endswith("weight"))
    assert len(a["train"]) == len(b["train"]) > 5 and all(torch.equal(x, y) for x, y in zip(a["train"], b["train"]))
    assert len(a["val"]) == len(b["val"]) > 0 and all(torch.equal(x, y) for x, y in zip(a["val"], b["val"]))
    for r in (a, b):
        (t0, n0, p0), (t1, n1, p1) = r["rng_after_init"], r["rng_at_end"]
        assert torch.equal(t0, t1) and np.array_equal(n0, n1) and p0 == p1
    assert a["steps"] != b["steps"]
    assert same(a["init"], again["init"]) and same(a["final"], again["final"]) and a["steps"] == again["steps"]
    # the record's params_sha256: the final parameters' bytes, equal for the rerun, not for the other seed
    digests = [re.findall(r"^params_sha256: ([0-9a-f]{64})$", r["text"], re.M) for r in (a, b, again)]
    assert [len(d) for d in digests] == [1, 1, 1] and digests[0] == digests[2] != digests[1]
    assert digests[0][0] == a["digest"]


def test_deterministic_reruns_are_identical_and_recorded(shards, monkeypatch):
    """Two runs with --deterministic 1 (soap: its refresh at step 2 runs too): the same step lines and final
    parameters; the record says deterministic (settings and its `deterministic: on` line); the process's flags are
    as before afterwards. Without it the record says off."""
    argv = shards + ["--deterministic", "1", "--seed", "3", "--optimizer", "soap",
                     "--soap_precondition_frequency", "2"]
    before = torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    a, b = run(argv, monkeypatch), run(argv, monkeypatch)
    assert len(a["steps"]) == 6 and a["steps"] == b["steps"] and same(a["final"], b["final"])
    assert a["settings"]["deterministic"] is True
    assert re.search(r"^deterministic: on \(use_deterministic_algorithms warn_only, backward strict, "
                     r"CUBLAS_WORKSPACE_CONFIG=:\d+:8", a["text"], re.M)
    assert (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before
    off = run(shards + ["--seed", "3", "--num_iterations", "2", "--warmup_iters", "1", "--warmdown_iters", "1"],
              monkeypatch)
    assert off["settings"]["deterministic"] is False and re.search(r"^deterministic: off$", off["text"], re.M)


def test_determinism_sets_the_flags_and_restores_them(monkeypatch):
    """Within Determinism(True): deterministic algorithms in warn_only mode, CUBLAS_WORKSPACE_CONFIG, cudnn
    deterministic without benchmarking, Inductor's deterministic mode; strict (no warn_only) within backward(); all
    as before on exit. Determinism(False) touches nothing."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
              torch._inductor.config.deterministic)
    with t.Determinism(False):
        assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    with t.Determinism(True) as d:
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == t.CUBLAS_DETERMINISTIC
        assert cudnn.deterministic and not cudnn.benchmark and torch._inductor.config.deterministic
        with d.backward():
            assert torch.are_deterministic_algorithms_enabled()
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), cudnn.deterministic, cudnn.benchmark,
            torch._inductor.config.deterministic) == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_ops_without_a_deterministic_implementation_are_named_once(monkeypatch):
    """A warn_only warning naming an op becomes one `deterministic: no deterministic implementation of <op>` line (twice
    warned, once logged; lines seen before the record opens are logged when it attaches), flash attention's too;
    other warnings reach the previous handler. In backward(), strict mode's error for such an op stops the run with
    the op named and the fix."""
    shown, logged = [], []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    with t.Determinism(True) as d:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(OP_WARNING)
            d.attach(logged.append)
            warnings.warn(OP_WARNING)
            warnings.warn("Flash Attention defaults to a non-deterministic algorithm. To explicitly enable "
                          "determinism call torch.use_deterministic_algorithms(True, warn_only=False).")
            warnings.warn("an unrelated warning")
        with pytest.raises(SystemExit) as stop:
            with d.backward():
                raise RuntimeError(OP_WARNING.replace(", warn_only=True", ""))
    assert logged == ["deterministic: no deterministic implementation of index_add_cuda_",
                      "deterministic: no deterministic implementation of Flash Attention"]
    assert shown == ["an unrelated warning"]
    assert "index_add_cuda_ does not have a deterministic implementation" in stop.value.code
    assert "--deterministic 0" in stop.value.code


def test_diff_checkpoints_finds_the_first_step_and_tensors_that_differ(shards, tmp_path, monkeypatch, capsys):
    """records/determinism/diff_checkpoints.py on three runs saved every step: a rerun is identical at every step
    (exit 0); with another muon_lr the first difference is step 1, in the block matrices and the lr, not in the
    AdamW-trained embedding/head (its step-1 update depends only on the init); Muon's momentum from step 2 (exit 1)."""
    sys.path.insert(0, str(REPO / "records" / "determinism"))
    import diff_checkpoints as dc

    def saved(name: str, *extra: str) -> Path:
        folder = tmp_path / name
        run(shards + ["--seed", "3", "--save_every", "1", "--keep_checkpoints", "10", "--checkpoint_dir",
                      str(folder), *extra], monkeypatch)
        (runs,) = list(folder.iterdir())
        return runs

    a, b, c = saved("a"), saved("b"), saved("c", "--muon_lr", "0.03")
    capsys.readouterr()
    assert dc.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert [f"step {s}: identical" in out for s in range(1, 6)] == [True] * 5 and "identical at every" in out
    assert dc.main([str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("step 1: ") and "first difference at step 1" in out and "step 2" not in out
    names = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ")]
    assert "main.model.transformer.h.0.attn.c_attn.weight" in names and "main.model.lm_head.weight" not in names
    assert "main.param_groups.1.0.lr" in names  # settings too: lr 0.009 vs 0.015 at step 1 (warmup)
    assert dc.main([str(a), str(c), "--all", "--top", "100"]) == 1  # the momentum (= the init's gradient at step
    step2 = capsys.readouterr().out.split("step 2: ")[1].split("step 3: ")[0]  # 1) differs from step 2
    assert re.search(r"rank0\.optimizers\.1\.\d+\.momentum_buffer", step2)
    assert dc.main([str(a / "step_000002"), str(b / "step_000002")]) == 0  # one step folder each
    assert dc.main([str(a), str(tmp_path)]) == 2


def test_repeat_step_names_the_stage_that_does_not_repeat(shards, tmp_path, monkeypatch, capsys):
    """records/determinism/repeat_step.py: on CPU one step repeats bit for bit (exit 0); when a repeat's gradient of
    one matrix is off by one ulp in one entry, the backward is reported as differing there, the forward not (exit 1)."""
    sys.path.insert(0, str(REPO / "records" / "determinism"))
    import repeat_step as rs

    argv = shards + ["--seed", "1", "--deterministic", "1", "--checkpoint_dir", str(tmp_path)]
    assert rs.main(["--repeats", "2", *argv]) == 0
    out = capsys.readouterr().out
    assert "repeat 1 vs 0, forward: identical" in out and "repeat 1 vs 0, step: identical" in out

    one_step, calls = rs.one_step, []

    def nudged(run, *a):
        loss, grads, after = one_step(run, *a)
        calls.append(1)
        if len(calls) == 2:  # the second repeat: h.0's attention matrix gradient one ulp up in one entry
            i = [n for n, _ in run.raw_model.named_parameters()].index("transformer.h.0.attn.c_attn.weight")
            grads[i].view(-1)[0] = torch.nextafter(grads[i].view(-1)[0], torch.tensor(float("inf")))
        return loss, grads, after

    monkeypatch.setattr(rs, "one_step", nudged)
    assert rs.main(["--repeats", "2", *argv]) == 1
    out = capsys.readouterr().out
    assert "repeat 1 vs 0, forward: identical" in out
    assert "repeat 1 vs 0, backward: 1 differ, first: transformer.h.0.attn.c_attn.weight" in out
