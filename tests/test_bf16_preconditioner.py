"""R's application G R with bf16 or fp32 operands (--gram_apply): the error with G aligned to C's largest eigenvectors,
and records/bf16-preconditioner/measure.py's functions on small synthetic data and a tiny run."""
import importlib.util
import json
import math

import pytest
import torch

import train_gpt2 as t
from conftest import REPO


@pytest.fixture(scope="module")
def measure():
    """records/bf16-preconditioner/measure.py as a module."""
    spec = importlib.util.spec_from_file_location("bf16_measure",
                                                  REPO / "records" / "bf16-preconditioner" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def c_fc_like(d: int = 768, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V): C = V diag(l) V^T in float64 with the spectrum of c_fc's input C at init: l from 0.011 to 147, mean 1
    (tr(C)/d of a LayerNorm's output): 147 and d - 1 values geometric from 0.011 to the top that makes the mean 1;
    V a random orthogonal basis, columns by ascending l."""
    lo, top = 0.011, 147.0
    a, b = lo, top
    for _ in range(60):  # bisection on the geometric part's largest value
        hi = (a + b) / 2
        a, b = (hi, b) if torch.logspace(math.log10(lo), math.log10(hi), d - 1, dtype=torch.float64).sum() < d - top \
            else (a, hi)
    lam = torch.cat([torch.logspace(math.log10(lo), math.log10(hi), d - 1, dtype=torch.float64),
                     torch.tensor([top], dtype=torch.float64)])
    V = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))).Q
    return (V * lam) @ V.mT, V


def applied(G: torch.Tensor, R32: torch.Tensor, apply: str) -> torch.Tensor:
    """G R as a feature-gram rule applies it under --gram_apply `apply`: R stored as _store_factors keeps it, the
    product's operands by gram_low."""
    low = t.gram_low(G, apply)
    return t.right_precondition(G, R32.bfloat16() if low else R32, "full", low)


def test_fp32_application_is_exact_where_bf16_fails_for_g_aligned_with_c(monkeypatch):
    """C with c_fc's init spectrum (0.011 ... 147, mean 1), gamma = 0.2 (Newton-Muon's 0.2 tr(C)/d), R the rule's fp32
    factor, G = Gaussian G0 V_k V_k^T on C's top k = 32 eigenvectors, where bf16 operands are available (CUDA; forced
    here on CPU): --gram_apply fp32 gives G R within 1e-5 of float64 (6.0e-6 here: fp32's error amplified by C's
    conditioning), bf16 is off by more than 1% (3.3% here); for the Gaussian G0 itself bf16 is within 1% (0.3%), so a
    Gaussian test hides it."""
    monkeypatch.setattr(t, "bf16_operands", lambda G: True)
    C, V = c_fc_like()
    R64, R32 = t.gram_factor(C, 0.2, "full"), t.gram_factor(C.float(), 0.2, "full")
    G0 = torch.randn(256, C.size(0), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    Vk = V[:, -32:]
    for G, bf16_above in ((G0 @ Vk @ Vk.mT, 1e-2), (G0, None)):
        exact = G @ R64
        err = {a: ((applied(G.float(), R32, a).double() - exact).norm() / exact.norm()).item() for a in ("bf16", "fp32")}
        assert err["fp32"] <= 1e-5, err
        if bf16_above:
            assert err["bf16"] > bf16_above, err
        else:
            assert 1e-4 < err["bf16"] < 1e-2, err


def test_gram_apply_is_declared_once_with_its_choices():
    """One declaration (FeatureGram's), seen by both rules, Hyperparameters and the command line; bf16 means bf16
    operands only where bf16_operands (CUDA), fp32 never."""
    s = t.FeatureGram.declared()["gram_apply"]
    assert t.NewtonMuon.declared()["gram_apply"] is s is t.LocoPropS.declared()["gram_apply"]
    assert t.parse_args([]).gram_apply == s.default == t.Hyperparameters().gram_apply
    assert t.parse_args(["--gram_apply", "fp32"]).gram_apply == "fp32"
    cpu = torch.zeros(2, 2)
    assert not t.gram_low(cpu, "bf16") and not t.gram_low(cpu, "fp32")


def test_polar_is_the_svd_polar_factor_and_keeps_the_largest_rank(measure):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 30, dtype=torch.float64, generator=g)
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    torch.testing.assert_close(measure.polar(X), U @ Vh)
    torch.testing.assert_close(measure.polar(X.mT), (U @ Vh).mT)
    torch.testing.assert_close(measure.polar(X, rank=3), U[:, :3] @ Vh[:3])


def test_errors_on_a_synthetic_c_rank_the_paths(measure):
    """measure.errors on a tiny Newton-Muon's own factor: fp32 application within 1e-5, bf16 worse and worse still for
    G on C's top eigenvectors; msign and Newton-Schulz columns present; the stored fp32 factor is R32."""
    args = t.parse_args(["--n_layer", "1", "--n_head", "2", "--n_embd", "64", "--optimizer", "newton_muon"])
    opt = t.build_optimizers(t.GPT(args), args)[-1]
    group = opt.param_groups[0]
    C, _ = c_fc_like(64, seed=2)
    g = torch.Generator().manual_seed(3)
    G = torch.randn(96, 64, generator=g)
    buf = torch.randn(96, 64, generator=g)
    R32 = opt.factor(C.float()[None], group)[0]
    row = measure.errors(opt, group, G, C.float(), buf, top=4, stored=R32)
    assert row["stored_vs_R32"] == 0 and row["C_max"] == pytest.approx(147, rel=1e-6)
    assert row["err_fp32"] < 1e-5 < 1e-3 < row["err_bf16"] < row["top_err_bf16"]
    assert row["top_err_fp32"] < 1e-5
    for c in ("msign_bf16", "ns_ref", "ns_bf16", "ns_fp32", "step_bf16", "step_fp32", "top_msign_bf16"):
        assert math.isfinite(row[c]), c
    assert row["msign_fp32"] < 1e-4 < row["msign_bf16"]
    agg = measure.aggregate([dict(step=5, layer="transformer.h.0.mlp.c_fc", **row),
                             dict(step=5, layer="transformer.h.1.mlp.c_fc", **row)])
    assert [(a["step"], a["layer"], a["n"]) for a in agg] == [(5, "mlp.c_fc", 2)]
    assert agg[0]["err_bf16"] == (row["err_bf16"], row["err_bf16"])
    assert "| 5 | mlp.c_fc | 2 |" in measure.markdown(agg, {}, {})


def test_record_at_reads_step_avg_and_blocks_ms(measure, tmp_path):
    path = tmp_path / "r.txt"
    path.write_text("".join(f"step:{s}/400 train_loss:5.0 train_time:{s}ms step_avg:{100 + s}.00ms opt_ms:7.00 "
                            f"blocks_ms:{s}.00\n" for s in range(1, 21)) + "step:20/400 val_loss:5.0 x\n")
    got = measure.record_at(str(path), 15)
    assert (got["step_avg_ms"], got["blocks_ms_median"]) == (115.0, 13.0)  # blocks_ms of steps 11 ... 15


def test_measure_runs_end_to_end_on_a_tiny_run(measure, tiny_args, tmp_path):
    """main on a tiny run: captures both steps (a step past the run is its last), a row per block matrix and step,
    the timing, a second run at --time_steps with the other --gram_apply, the JSON and the table."""
    out = tmp_path / "out"
    result = measure.main(["--out", str(out), "--steps", "2,99", "--time_steps", "2", "--repeats", "2",
                           "--", *tiny_args, "--gram_every", "2"])
    assert result["steps"] == [2, 4]
    assert len(result["rows"]) == 2 * 8 and {r["step"] for r in result["rows"]} == {2, 4}
    assert all(r["err_fp32"] < 1e-5 for r in result["rows"])
    assert set(result["runs"]) == {"bf16", "fp32"} and result["timing"]["matrices"] == 8
    assert json.loads((out / "measure.json").read_text())["steps"] == [2, 4]
    assert "| 4 | mlp.c_proj | 2 |" in (out / "table.md").read_text()
