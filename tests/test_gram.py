"""Feature-gram optimizers: the model's collected C, LocoProp-S against its local problem, Newton-Muon against
msign(G (C + gamma I)^-1), and collection leaving the forward unchanged."""
import os
import subprocess
import sys

import pytest
import torch

import train_gpt2 as t
from conftest import DRIVERS, subprocess_env

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64"]


def tiny_model(mode="full", optimizer="newton_muon", extra=()):
    args = t.parse_args(TINY + ["--optimizer", optimizer, "--gram", mode, "--gram_block", "16", *extra])
    torch.manual_seed(0)
    model = t.GPT(args)
    return args, model, t.build_optimizers(model, args)


def reference_gram(x: torch.Tensor, mode: str, block: int = 16) -> torch.Tensor:
    x = x.reshape(-1, x.size(-1)).double()
    if mode == "diag":
        return (x * x).sum(0)
    C = x.T @ x
    if mode == "full":
        return C
    k = C.size(0) // block
    return torch.stack([C[i * block:(i + 1) * block, i * block:(i + 1) * block] for i in range(k)])


@pytest.mark.parametrize("mode,triangle", [("full", False), ("full", True), ("block", False), ("diag", False)])
def test_collected_gram_equals_hooked_inputs(mode, triangle, monkeypatch):
    """triangle: full C summed as its upper block triangle and mirrored at the end (what every full C at least two
    GRAM_TRIANGLE_BLOCKs wide gets: the 768- and 3072-wide inputs), here in 16-wide blocks for widths 64 and 256."""
    if triangle:
        monkeypatch.setattr(t, "GRAM_TRIANGLE_BLOCK", 16)
    idx = torch.randint(0, t.Hyperparameters.vocab_size, (2, 2, 16), generator=torch.Generator().manual_seed(0))

    def collect(recompute: str, hook: bool):
        args, model, _ = tiny_model(mode, extra=("--recompute_gelu", recompute))
        seen = {m: [] for m in model.gram_layers()}
        hooks = [m.register_forward_hook(lambda m, inp, out: seen[m].append(inp[0].detach()))
                 for m in (seen if hook else ())]
        model.collect_gram(True)
        for micro in idx:
            model(micro, micro)
        model.collect_gram(False)
        for h in hooks:
            h.remove()
        return args, model, seen

    # with GELU recomputed, the MLP's c_proj runs inside a checkpointed region, not as a module call (no hooks): its C
    # must equal the one collected without the recompute, which the hooks check below
    args, model, seen = collect("0", hook=True)
    _, recomputing, _ = collect("1", hook=False)
    for m, r in zip(model.gram_layers(), recomputing.gram_layers()):
        torch.testing.assert_close(r.gram, m.gram, rtol=1e-6, atol=1e-6)
    assert len(seen) == 4 * args.n_layer
    for m, xs in seen.items():
        assert len(xs) == 2
        ref = reference_gram(torch.cat(xs), mode) / idx.numel()
        torch.testing.assert_close(m.gram.double() / idx.numel(), ref, rtol=1e-5, atol=1e-6)
    widths = sorted({m.in_features for m in seen})
    assert widths == [64, 256]  # attention in/out and MLP in are 64 wide, the MLP hidden 256


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
def test_collected_gram_under_autocast_is_the_gram_of_the_matmul_operand(mode):
    """Under bf16 autocast (here CPU's; the trainer's is CUDA's) C is the Gram of what each layer's matmul takes, its
    input cast to bf16, with the products summed in fp32: never rounded to bf16 (autocast would make the Gram matmul
    of an fp32 input, RMSNorm's output, a bf16 one), GELU's output inside the recompute region included."""
    idx = torch.randint(0, t.Hyperparameters.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    args, model, _ = tiny_model(mode, extra=("--recompute_gelu", "0"))
    seen = {m: [] for m in model.gram_layers()}
    hooks = [m.register_forward_hook(lambda m, inp, out: seen[m].append(inp[0].detach())) for m in seen]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.collect_gram(True)
        model(idx, idx)
        model.collect_gram(False)
    for h in hooks:
        h.remove()
    assert {x[0].dtype for x in seen.values()} == {torch.float32, torch.bfloat16}  # RMSNorm's fp32, the rest bf16
    _, recomputing, _ = tiny_model(mode, extra=("--recompute_gelu", "1"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recomputing.collect_gram(True)
        recomputing(idx, idx)
        recomputing.collect_gram(False)
    for (m, xs), r in zip(seen.items(), recomputing.gram_layers()):
        ref = reference_gram(xs[0].bfloat16(), mode)
        torch.testing.assert_close(m.gram.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        torch.testing.assert_close(r.gram.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


TWO_PROCESS_CASES = [("full", False), ("full", True), ("block", False), ("diag", False)]


@pytest.fixture(scope="module")
def two_process_grams(tmp_path_factory):
    """Every case's C from 2 processes under torchrun (gloo), all cases in one launch: {"mode:block": [C per layer]}."""
    out = tmp_path_factory.mktemp("grams") / "grams.pt"
    cases = [f"{mode}:{16 if triangle else t.GRAM_TRIANGLE_BLOCK}" for mode, triangle in TWO_PROCESS_CASES]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(DRIVERS / "gram_allreduce.py"), *cases], capture_output=True, text=True,
                       env=dict(subprocess_env(), GRAMS=str(out)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.slow
@pytest.mark.parametrize("mode,triangle", TWO_PROCESS_CASES)
def test_two_processes_gram_equals_one_process(two_process_grams, mode, triangle, monkeypatch):
    if triangle:
        monkeypatch.setattr(t, "GRAM_TRIANGLE_BLOCK", 16)
    two = two_process_grams[f"{mode}:{t.GRAM_TRIANGLE_BLOCK}"]
    args, model, _ = tiny_model(mode)
    idx = torch.randint(0, args.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    model.collect_gram(True)
    model(idx, idx)
    model.collect_gram(False)
    for m, c in zip(model.gram_layers(), two):
        torch.testing.assert_close(c, m.gram / idx.numel(), rtol=1e-5, atol=1e-6)


def test_refresh_step_gives_the_same_loss():
    args, model, _ = tiny_model("block")
    idx = torch.randint(0, args.vocab_size, (2, 16))
    plain = model(idx, idx)
    model.collect_gram(True)
    collecting = model(idx, idx)
    assert torch.equal(plain, collecting)
    assert all(m.gram.abs().sum() > 0 for m in model.gram_layers())


def real_x_dy(layer_index: int = 7):
    args, model, _ = tiny_model(extra=("--recompute_gelu", "0"))  # the hook sees the MLP's c_proj as a module call
    layer = model.gram_layers()[layer_index]
    rec = {}
    def hook(m, inp, out):
        out.retain_grad()
        rec.update(x=inp[0].detach(), y=out)

    h = layer.register_forward_hook(hook)
    idx = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    model(idx, idx).backward()
    h.remove()
    X = rec["x"].reshape(-1, layer.in_features).double()
    dY = rec["y"].grad.reshape(-1, layer.out_features).double()
    return X, dY, layer.weight.detach().double(), layer.weight.grad.double()


def local_minimizer_by_gd(X, dY, W0, eta, lam, tol=1e-13):
    """argmin_W 1/(2n) ||X W^T - (X W0^T - eta n dY)||^2 + lam/2 ||W - W0||^2 by plain gradient descent (float64):
    the mean-over-tokens form of LocoProp-S's square-loss local problem (n dY: the per-token output gradient)."""
    n = X.size(0)
    target = X @ W0.T - eta * n * dY
    step = 1 / (torch.linalg.eigvalsh(X.T @ X / n).max() + lam)
    W = W0.clone()
    for _ in range(200000):
        grad = (X @ W.T - target).T @ X / n + lam * (W - W0)
        W -= step * grad
        if grad.norm() < tol * W0.norm():
            break
    return W - W0


def test_locoprop_closed_form_is_the_local_minimizer():
    X, dY, W0, G = real_x_dy()
    n = X.size(0)
    torch.testing.assert_close(dY.T @ X, G, rtol=1e-4, atol=1e-7)  # G = dY^T X: the same normalization as C
    C, eta, lam = X.T @ X / n, 0.7, 0.5
    ref = local_minimizer_by_gd(X, dY, W0, eta, lam)
    ours = -eta * t.right_precondition(G, t.gram_factor(C, lam, "full"), "full")
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-6
    # block and diagonal C: the block-diagonal / diagonal local problem's closed form
    Cd = torch.diag(torch.diag(C))
    diag = -eta * t.right_precondition(G, t.gram_factor(torch.diag(C), lam, "diag"), "diag")
    torch.testing.assert_close(diag, -eta * G @ torch.linalg.inv(Cd + lam * torch.eye(C.size(0), dtype=C.dtype)))
    blocks = torch.stack([C[i * 16:(i + 1) * 16, i * 16:(i + 1) * 16] for i in range(C.size(0) // 16)])
    Cb = torch.block_diag(*blocks)
    blk = -eta * t.right_precondition(G, t.gram_factor(blocks, lam, "block"), "block")
    torch.testing.assert_close(blk, -eta * G @ torch.linalg.inv(Cb + lam * torch.eye(C.size(0), dtype=C.dtype)))
    assert (blk - ours).norm() > 1e-3 * ours.norm()  # the modes really differ


def test_locoprop_inner_steps():
    X, dY, W0, G = real_x_dy()
    n = X.size(0)
    C, eta, lam, nu = X.T @ X / n, 0.7, 0.5, 0.3
    # K = 1: scaled SGD
    P1 = t.inner_steps_polynomial(C, lam, nu, 1, "full")
    torch.testing.assert_close(-eta * t.right_precondition(G, P1, "full"), -nu * eta * G)
    # K steps of size nu on the local loss from W0 give -nu eta G sum_{j<K} (I - nu A)^j
    K, W = 5, W0.clone()
    target = X @ W0.T - eta * n * dY
    for _ in range(K):
        W -= nu * ((X @ W.T - target).T @ X / n + lam * (W - W0))
    PK = t.inner_steps_polynomial(C, lam, nu, K, "full")
    torch.testing.assert_close(-eta * t.right_precondition(G, PK, "full"), W - W0)
    Pd = t.inner_steps_polynomial(torch.diag(C), lam, nu, K, "diag")
    A = torch.diag(C) + lam
    torch.testing.assert_close(Pd, nu * sum((1 - nu * A) ** j for j in range(K)))


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
def test_locoprop_optimizer_step(mode):
    """One LocoPropS step on the model: p -= eta G (C + lam I)^-1 with C from the collected Gram matrix."""
    args, model, opts = tiny_model(mode, "locoprop", ["--locoprop_lr", "0.3", "--locoprop_lambda", "0.2"])
    opt = opts[-1]
    idx = torch.randint(0, args.vocab_size, (2, 16))
    model.collect_gram(True)
    model(idx, idx).backward()
    model.collect_gram(False)
    opt.refresh_gram(n_tokens=idx.numel())
    layer = model.gram_layers()[3]
    W0, G, C = layer.weight.detach().clone().double(), layer.weight.grad.double(), layer.gram.double() / idx.numel()
    opt.step()
    if mode == "full":
        A = C + 0.2 * torch.eye(C.size(0), dtype=C.dtype)
    elif mode == "block":
        A = torch.block_diag(*C) + 0.2 * torch.eye(G.size(1), dtype=C.dtype)
    else:
        A = torch.diag(C + 0.2)
    torch.testing.assert_close(layer.weight.detach().double(), W0 - 0.3 * G @ torch.linalg.inv(A), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
def test_newton_muon_step_is_msign_of_the_preconditioned_gradient(mode):
    args, model, opts = tiny_model(mode, "newton_muon", ["--ns_coeffs", "quintic"])
    opt, lr = opts[-1], args.muon_lr
    idx = torch.randint(0, args.vocab_size, (2, 32))
    model.collect_gram(True)
    model(idx, idx).backward()
    model.collect_gram(False)
    opt.refresh_gram(n_tokens=idx.numel())
    layers = model.gram_layers()
    before = [m.weight.detach().clone().double() for m in layers]
    grads = [m.weight.grad.double() for m in layers]
    opt.step()
    muon_in_band = 0
    for m, W0, G in zip(layers, before, grads):
        C = m.gram.double() / idx.numel()
        if mode == "diag":
            A = torch.diag(C + 0.2 * C.mean())
        elif mode == "block":
            A = torch.block_diag(*C)
            A = A + 0.2 * torch.diagonal(A).mean() * torch.eye(A.size(0), dtype=A.dtype)
        else:
            A = C + 0.2 * torch.diagonal(C).mean() * torch.eye(C.size(0), dtype=C.dtype)
        step = (W0 - m.weight.detach().double()) / lr
        Gt = G @ torch.linalg.inv(A)
        # msign(G~) = U V^T: on the directions the quintic iteration converges on (s >= 1e-2 ||G~||_F), the step's
        # singular values u_i^T step v_i lie in the coefficient set's band [0.84, 1.16]; no cross terms
        U, S, Vh = torch.linalg.svd(Gt, full_matrices=False)
        big = S >= 1e-2 * S.norm()
        assert big.sum() >= 8
        assert in_band(U.T @ step @ Vh.T, big)
        # the check can fail: Muon's step (msign of the raw G) is not in that band on G~'s singular vectors
        muon = t.orthogonalize(1.95 * G.float(), "quintic").double()
        muon_in_band += in_band(U.T @ muon @ Vh.T, big)
    assert muon_in_band <= 1


def in_band(P: torch.Tensor, big: torch.Tensor) -> bool:
    """P = U^T step V restricted to the converged directions is diagonal (|off| < 0.05) with entries in [0.8, 1.2]."""
    D = P[big][:, big]
    off = D - torch.diag(D.diagonal())
    return bool(((D.diagonal() > 0.8) & (D.diagonal() < 1.2)).all() and off.abs().max() < 0.05)


def test_newton_muon_with_isotropic_c_is_muon():
    """C = 3 I: G~ = G / 3.6, a scale msign ignores, so each step equals Muon's up to bf16 Newton-Schulz noise (~4%),
    while a non-isotropic C moves the step far more."""
    torch.manual_seed(0)

    def run(C, steps=3):
        ps = [torch.nn.Parameter(torch.randn(48, 32, generator=torch.Generator().manual_seed(i))) for i in range(3)]
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        layers = [torch.nn.Module() for _ in ps]
        for m, p in zip(layers, ps):
            m.weight, m.gram = p, C * 100  # C over 100 tokens
        nm, mu = t.NewtonMuon(ps, layers, lr=0.02), t.Muon(qs, lr=0.02)
        nm.refresh_gram(n_tokens=100)
        errs = []
        for step in range(steps):
            before = [q.detach().clone() for q in qs]
            for i, (p, q) in enumerate(zip(ps, qs)):
                p.grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(100 * step + i))
                q.grad = p.grad.clone()
            nm.step()
            mu.step()
            for p, q, b in zip(ps, qs, before):
                errs.append(((p - b) - (q - b)).norm().item() / (q - b).norm().item())
                p.data.copy_(q.data)  # compare single steps from the same point
        return max(errs)

    assert run(3.0 * torch.eye(32)) < 0.06
    skew = torch.diag(torch.linspace(0.1, 10.0, 32))
    assert run(skew) > 0.3


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
def test_factor_stored_in_the_operand_dtype(mode, monkeypatch):
    """With --gram_apply bf16, where right_precondition multiplies in bf16 (CUDA; forced here on CPU),
    refresh_gram stores the full and block factors in bf16 once, and the step equals the one that converts the
    fp32 factor at every step, bit for bit; the diag factor (an elementwise product) stays fp32."""
    args, model, opts = tiny_model(mode, "locoprop", ["--locoprop_lr", "0.3", "--gram_apply", "bf16"])
    opt = opts[-1]
    idx = torch.randint(0, args.vocab_size, (2, 16))
    model.collect_gram(True)
    model(idx, idx).backward()
    model.collect_gram(False)
    layer = model.gram_layers()[3]
    p = layer.weight
    opt.refresh_gram(n_tokens=idx.numel())
    R32 = opt.state[p]["factor"]
    expect = p.detach().clone().add_(t.right_precondition(p.grad, R32, mode, low_precision=True), alpha=-0.3)
    monkeypatch.setattr(t, "bf16_operands", lambda G: True)
    opt.refresh_gram(n_tokens=idx.numel())
    R = opt.state[p]["factor"]
    assert R.dtype == (torch.float32 if mode == "diag" else torch.bfloat16)
    assert torch.equal(R, R32.to(R.dtype))
    opt.step()
    assert torch.equal(p.detach(), expect)


@pytest.mark.parametrize("optimizer", ["newton_muon", "locoprop"])
@pytest.mark.parametrize("apply", [None, "bf16", "fp32"])
def test_gram_apply_chooses_the_factor_dtype_and_the_product(optimizer, apply, monkeypatch):
    """--gram_apply, where bf16 operands are available (CUDA; forced here on CPU): bf16 stores R in bf16 and
    multiplies G R with bf16 operands; fp32 keeps R fp32 and multiplies in fp32; the default (None here) does what its
    declaration's value says. Both rules' steps equal the one that applies R with the chosen operands, bit for bit."""
    monkeypatch.setattr(t, "bf16_operands", lambda G: True)
    extra = ["--locoprop_lr", "0.3"] if optimizer == "locoprop" else ["--muon_momentum", "0"]
    args, model, opts = tiny_model("full", optimizer, extra + (["--gram_apply", apply] if apply else []))
    declared = t.FeatureGram.declared()["gram_apply"].default
    assert args.gram_apply == (apply or declared) == opts[-1].param_groups[0]["gram_apply"]
    low = args.gram_apply == "bf16"
    opt = opts[-1]
    idx = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model.collect_gram(True)
    model(idx, idx).backward()
    model.collect_gram(False)
    opt.refresh_gram(n_tokens=idx.numel())
    p = model.gram_layers()[3].weight
    R = opt.state[p]["factor"]
    assert R.dtype == (torch.bfloat16 if low else torch.float32)
    GR = t.right_precondition(p.grad, R, "full", low_precision=low)
    assert (GR != t.right_precondition(p.grad, R.float(), "full", low_precision=not low)).any()
    if optimizer == "locoprop":
        expect = p.detach().clone().add_(GR, alpha=-0.3)
    else:
        expect = p.detach() - args.muon_lr * t.orthogonalize(GR[None], args.ns_coeffs)[0].to(p.dtype)
    opt.step()
    assert torch.equal(p.detach(), expect)


def test_refresh_redoes_a_failed_cholesky_with_more_damping_at_the_next_step():
    """refresh_gram factors each batch once without a host sync; a batch in which a Cholesky failed (here one
    C + gamma I is not positive definite) is redone by finish_refresh, which step() calls, with gram_factor's
    per-matrix damping boosts: the failed matrix gets 10x gamma, its neighbour keeps gamma."""
    good = torch.eye(4, dtype=torch.float64)
    bad = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5], dtype=torch.float64))  # + 0.1 I: not PD; + 1.0 I: PD
    ps = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64)) for _ in range(2)]
    layers = [torch.nn.Module() for _ in ps]
    for m, p, C in zip(layers, ps, (good, bad)):
        m.weight, m.gram = p, C * 10  # C over 10 tokens
    opt = t.LocoPropS(ps, layers, lr=0.1, lam=0.1)
    opt.refresh_gram(n_tokens=10)
    assert [bool(f) for _, _, f in opt._pending] == [True]  # one batch (one shape of C), flagged
    for p in ps:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert not opt._pending
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(opt.state[ps[0]]["factor"], torch.linalg.inv(good + 0.1 * eye))
    torch.testing.assert_close(opt.state[ps[1]]["factor"], torch.linalg.inv(bad + 1.0 * eye))
