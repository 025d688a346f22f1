"""Block-matrix optimizers against float64 references written here from the algorithm text (not from train_gpt2's
helpers); Newton-Schulz bands and batching; 2 processes vs 1; state-dict round trips; settings.

Two kinds of comparison:
- the rule, exactly: float64 parameters, and for Muon/PolarGrad the bf16 Newton-Schulz swapped for the float64 iteration
  (fixture float64_ns), so everything else must agree to 1e-9;
- the production precision: fp32 parameters, bf16 Newton-Schulz, fp32 SOAP, each with a tolerance measured here.
Every tolerance is also shown to be failed by deliberately wrong variants of the reference.

SOAP's first step takes eigenbases of L = G G^T, R = G^T G, which for a non-square G are rank-deficient: the basis of
their null space is arbitrary (it differs between fp32 and fp64 eigh) and changes every later step, so the reference
starts from the implementation's first-step bases, after checking they are eigenbases of L and R in descending order.
"""
import dataclasses
import functools
import io
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt2 as t

# one CPU thread per test (conftest.single_thread): CPU reductions split the same way in every
# process, which test_processes_equal_one compares bit for bit
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # c_attn, attn c_proj, c_fc, mlp c_proj
SMALL = [(m // 4, n // 4) for m, n in SHAPES]
TINY = [(m // 8, n // 8) for m, n in SHAPES]  # for the exact-rule checks of Muon and PolarGrad: the rule, not the size
# bf16 Newton-Schulz vs the float64 iteration, relative Frobenius error of one result; measured on the model's shapes
# (full and 1/4): simple <= 0.027, quintic <= 0.028, polar_express <= 0.106 (its large first coefficients amplify the
# bf16 rounding; 0.035 at full size)
BF16_TOL = {"simple": 0.04, "convergent": 0.04, "quintic": 0.04, "polar_express": 0.15}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(shapes, steps: int, seed: int = 0, scale: float = 1.0) -> list[list[torch.Tensor]]:
    """Fresh Gaussian gradients per step: grads[step][matrix]."""
    g = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def init_params(shapes, seed: int = 1) -> list[torch.Tensor]:
    """nn.Linear's init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=g) * 2 - 1) / math.sqrt(s[1]) for s in shapes]


def run_impl(make, gs, p0, dtype=torch.float32, keep=None) -> list[list[torch.Tensor]]:
    """Params (float64 copies) after each step of optimizer make(params) fed the gradients gs: out[step][matrix].
    keep(opt, params) is called after the first step."""
    ps = [torch.nn.Parameter(p.clone().to(dtype)) for p in p0]
    opt, out = make(ps), []
    for i, step in enumerate(gs):
        for p, g in zip(ps, step):
            p.grad = g.clone().to(dtype)
        opt.step()
        if i == 0 and keep:
            keep(opt, ps)
        out.append([p.detach().double().clone() for p in ps])
    return out


def run_ref(ref_cls, gs, p0, **kw) -> list[list[torch.Tensor]]:
    """The same with one float64 reference object per matrix, ref.step(p, G) -> new p."""
    ps = [p.double() for p in p0]
    refs, out = [ref_cls(**kw) for _ in p0], []
    for step in gs:
        ps = [r.step(p, g.double()) for r, p, g in zip(refs, ps, step)]
        out.append([p.clone() for p in ps])
    return out


def step_error(a, b, p0) -> float:
    """Max over steps and matrices of the relative error of one step's update, (a_t - a_{t-1}) vs (b_t - b_{t-1})."""
    prev_a = prev_b = [p.double() for p in p0]
    worst = 0.0
    for pa, pb in zip(a, b):
        worst = max(worst, *(rel(x - y, u - v) for x, y, u, v in zip(pa, prev_a, pb, prev_b)))
        prev_a, prev_b = pa, pb
    return worst


def wrong_error(a, ref_cls, gs, p0, steps: int = 5, **kw) -> float:
    """step_error of the first `steps` steps of `a` against a (deliberately wrong) reference: enough to tell."""
    return step_error(a[:steps], run_ref(ref_cls, gs[:steps], p0, **kw), p0)


def displacement_error(a, b, p0) -> float:
    """Max over matrices of the relative error of the whole displacement p_T - p_0."""
    return max(rel(x - p.double(), y - p.double()) for x, y, p in zip(a[-1], b[-1], p0))

# ----------------------------------------------------------------------------- float64 references


def ns64(G: torch.Tensor, coeffs: str) -> torch.Tensor:
    """The Newton-Schulz iteration in float64 with the set's numbers: X = G / (f ||G||_F + 1e-7), rows <= cols,
    X <- a X + b (X X^T) X + c (X X^T)^2 X."""
    steps, f = t.NS_COEFFS[coeffs]
    X = G / (G.norm() * f + 1e-7)
    tall = X.shape[0] > X.shape[1]
    X = X.T if tall else X
    for a, b, c in steps:
        A = X @ X.T
        B = A @ X
        X = a * X + b * B + c * (A @ B)
    return X.T if tall else X


@pytest.fixture
def float64_ns(monkeypatch):
    """train_gpt2's bf16 orthogonalization (and the cast to bf16 before it) replaced by ns64 in float64, so the rest
    of each rule can be checked exactly."""
    monkeypatch.setattr(t, "NS_DTYPE", torch.float64)  # what the momentum rule casts to before orthogonalizing
    monkeypatch.setattr(t, "orthogonalize", lambda G, coeffs: torch.stack([ns64(g, coeffs) for g in G.double()]))


class RefMuon:
    """buf = m buf + G; D = G + m buf (Nesterov) or buf; p -= lr s ns64(D), s = max(1, rows/cols)^0.5 if shape_scale.
    sign=-1 is a wrong variant."""

    def __init__(self, lr=0.02, momentum=0.95, nesterov=True, coeffs="simple", shape_scale=False, sign=1.0):
        self.lr, self.m, self.nesterov, self.coeffs, self.shape_scale, self.sign = lr, momentum, nesterov, coeffs, \
            shape_scale, sign
        self.buf = 0.0

    def step(self, p, G):
        self.buf = self.m * self.buf + G
        D = G + self.m * self.buf if self.nesterov else self.buf
        s = max(1.0, G.shape[0] / G.shape[1]) ** 0.5 if self.shape_scale else 1.0
        return p - self.sign * self.lr * s * ns64(D, self.coeffs)


class RefPolarGrad:
    """M = b M + (1-b) G; D = b M + (1-b) G (Nesterov) or M; O = ns64(D); s = <O, D> (inner) or the sum of D's
    singular values by SVD (exact); p = (1 - lr wd) p - lr s O. nuclear="one" (s = 1) is a wrong variant."""

    def __init__(self, lr=1e-3, momentum=0.95, nesterov=False, weight_decay=0.0, nuclear="inner",
                 coeffs="polar_express"):
        self.lr, self.b, self.nesterov, self.wd, self.nuclear, self.coeffs = lr, momentum, nesterov, weight_decay, \
            nuclear, coeffs
        self.M = 0.0

    def step(self, p, G):
        self.M = self.b * self.M + (1 - self.b) * G
        D = self.b * self.M + (1 - self.b) * G if self.nesterov else self.M
        O = ns64(D, self.coeffs)
        s = {"inner": lambda: (O * D).sum(), "exact": lambda: torch.linalg.svdvals(D).sum(), "one": lambda: 1.0}
        return (1 - self.lr * self.wd) * p - self.lr * s[self.nuclear]() * O


class RefAdamW:
    """m = b1 m + (1-b1) G; v = b2 v + (1-b2) G^2; p = (1 - lr wd) p - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
    bias_correction=False is a wrong variant."""

    def __init__(self, lr=0.0018, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, bias_correction=True):
        self.lr, (self.b1, self.b2), self.eps, self.wd, self.bc = lr, betas, eps, weight_decay, bias_correction
        self.m = self.v = 0.0
        self.t = 0

    def step(self, p, G):
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * G
        self.v = self.b2 * self.v + (1 - self.b2) * G * G
        c1, c2 = (1 - self.b1**self.t, 1 - self.b2**self.t) if self.bc else (1.0, 1.0)
        return (1 - self.lr * self.wd) * p - self.lr * (self.m / c1) / ((self.v / c2).sqrt() + self.eps)


class RefSOAP:
    """SOAP from the algorithm text. First call: L = (1-s) G G^T, R = (1-s) G^T G, Q_L, Q_R their eigenvectors by
    descending eigenvalue (or the next pair of `initial_bases`), no update. Then t = 1, 2, ...: G~ = Q_L^T G Q_R;
    m = b1 m + (1-b1) G~ (m in the eigenbasis); v = b2 v + (1-b2) G~^2;
    p -= lr sqrt(1-b2^t)/(1-b1^t) Q_L (m / (sqrt v + eps)) Q_R^T; p -= lr wd p; L, R: EMA with s;
    every f-th t, for (P, Q) in (L, Q_L), (R, Q_R): o = argsort(-diag(Q^T P Q)); Q' = qr(P Q[:, o]).Q; v's rows (L) or
    columns (R) permuted by o; m carried over: m = Q_L'^T (Q_L m Q_R^T) Q_R'. A side longer than max_dim: Q = I, no
    statistic, no refresh. bug="no_v_permute" | "stale_m" | "no_bias_correction" are wrong variants."""

    def __init__(self, lr=0.0018, betas=(0.95, 0.95), shampoo_beta=0.95, eps=1e-8, weight_decay=0.0, frequency=10,
                 max_dim=10000, initial_bases=None, bug=""):
        self.lr, (self.b1, self.b2), self.s, self.eps, self.wd, self.f = lr, betas, shampoo_beta, eps, weight_decay, \
            frequency
        self.max_dim, self.initial_bases, self.bug, self.t = max_dim, initial_bases, bug, None

    def step(self, p, G):
        if self.t is None:
            self.t = 0
            keep = [n <= self.max_dim for n in G.shape]
            self.L = (1 - self.s) * G @ G.T if keep[0] else None
            self.R = (1 - self.s) * G.T @ G if keep[1] else None
            given = self.initial_bases.pop(0) if self.initial_bases else (None, None)
            self.QL, self.QR = (
                torch.eye(n, dtype=G.dtype) if P is None else q.double() if q is not None
                else torch.linalg.eigh(P)[1].flip(1) for P, q, n in zip((self.L, self.R), given, G.shape))
            self.m, self.v = torch.zeros_like(G), torch.zeros_like(G)
            return p
        self.t += 1
        Gr = self.QL.T @ G @ self.QR
        self.m = self.b1 * self.m + (1 - self.b1) * Gr
        self.v = self.b2 * self.v + (1 - self.b2) * Gr * Gr
        U = self.QL @ (self.m / (self.v.sqrt() + self.eps)) @ self.QR.T
        size = 1.0 if self.bug == "no_bias_correction" else math.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        p = p - self.lr * size * U
        p = p - self.lr * self.wd * p
        if self.L is not None:
            self.L = self.s * self.L + (1 - self.s) * G @ G.T
        if self.R is not None:
            self.R = self.s * self.R + (1 - self.s) * G.T @ G
        if self.t % self.f == 0:
            m_original = self.QL @ self.m @ self.QR.T
            new = []
            for P, Q, side in ((self.L, self.QL, 0), (self.R, self.QR, 1)):
                if P is None:
                    new.append(Q)
                    continue
                order = torch.argsort(torch.diag(Q.T @ P @ Q), descending=True)
                new.append(torch.linalg.qr(P @ Q[:, order])[0])
                if self.bug != "no_v_permute":
                    self.v = self.v[order, :] if side == 0 else self.v[:, order]
            self.QL, self.QR = new
            if self.bug != "stale_m":
                self.m = self.QL.T @ m_original @ self.QR
        return p

# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("coeffs", list(t.NS_COEFFS))
def test_orthogonalize_matches_float64_and_batches(coeffs):
    g = torch.Generator().manual_seed(0)
    for shape in SMALL:  # full size (768 x 768): test_muon_matches_float64_within_bf16
        G = torch.randn(shape, generator=g)
        assert rel(t.orthogonalize(G, coeffs), ns64(G.double(), coeffs)) < BF16_TOL[coeffs], shape
    for shape in (SMALL[0], SMALL[3]):  # a batch of one shape is the per-matrix results, bit for bit
        G = torch.randn(3, *shape, generator=g)
        batch = t.orthogonalize(G, coeffs)
        assert all(torch.equal(batch[i], t.orthogonalize(G[i], coeffs)) for i in range(3))


def rotated(spectrum: torch.Tensor, rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """U diag(spectrum) V^T with Haar-random orthonormal U (rows x k), V (cols x k)."""
    U, V = (torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))[0] for n in (rows, cols))
    return (U * spectrum) @ V.T


@functools.cache
def band_cases() -> list[tuple[float, torch.Tensor]]:
    """(x0, G) with every singular value of G >= x0 ||G||_F: a Gaussian 768x3072 (x >= 0.018) for the 1e-2 band and
    log-spread spectra over 10^1.4 (x >= 0.003), wide and tall, for the 2e-3 band."""
    g = torch.Generator().manual_seed(1)
    gauss = torch.randn(768, 3072, generator=g, dtype=torch.float64)
    assert torch.linalg.svdvals(gauss).min() >= 1e-2 * gauss.norm()
    spread = torch.logspace(0, -1.4, 768, dtype=torch.float64)
    assert spread.min() >= 2e-3 * spread.norm()
    cases = [(1e-2, gauss), (2e-3, rotated(spread, 768, 3072, g)), (2e-3, rotated(spread, 3072, 768, g))]
    return [(x0, G.float()) for x0, G in cases]


@pytest.mark.parametrize("coeffs", list(t.NS_COEFFS))
def test_singular_values_land_in_the_documented_band(coeffs):
    """NS_BANDS[set][x0]: if every singular value of G is >= x0 ||G||_F, all those of orthogonalize(G) are in it."""
    for x0, G in band_cases():
        O = t.orthogonalize(G, coeffs).double()
        gram = O @ O.T if O.shape[0] <= O.shape[1] else O.T @ O
        sv = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt()
        lo, hi = t.NS_BANDS[coeffs][x0]
        assert lo <= sv.min() and sv.max() <= hi, (x0, sv.min().item(), sv.max().item())

# ----------------------------------------------------------------------------- Muon


@pytest.mark.parametrize("kw,wrongs", [
    (dict(), [dict(nesterov=False), dict(sign=-1.0)]),
    (dict(nesterov=False), [dict(nesterov=True)]),
    (dict(shape_scale=True, coeffs="polar_express"), [dict(shape_scale=False)]),
])
def test_muon_rule_exact(float64_ns, kw, wrongs):
    p0, gs = init_params(TINY), grads(TINY, 20)
    a = run_impl(lambda ps: t.Muon(ps, lr=0.02, **kw), gs, p0, torch.float64)
    assert step_error(a, run_ref(RefMuon, gs, p0, **kw), p0) < 1e-9
    for wrong in wrongs:
        assert wrong_error(a, RefMuon, gs, p0, **{**kw, **wrong}) > 1e-2, wrong


@pytest.mark.parametrize("coeffs", list(t.NS_COEFFS))
def test_muon_matches_float64_within_bf16(coeffs):
    p0, gs = init_params(SMALL), grads(SMALL, 20)
    a = run_impl(lambda ps: t.Muon(ps, lr=0.02, coeffs=coeffs), gs, p0)
    assert step_error(a, run_ref(RefMuon, gs, p0, coeffs=coeffs), p0) < BF16_TOL[coeffs]
    # without Nesterov the updates differ by >= 0.37 (the wrong sign by 2): far outside the tolerance
    assert wrong_error(a, RefMuon, gs, p0, coeffs=coeffs, nesterov=False) > 2 * BF16_TOL[coeffs]
    full, gf = init_params(SHAPES[1:2]), grads(SHAPES[1:2], 2, seed=5)  # one full-size matrix, 2 steps
    a = run_impl(lambda ps: t.Muon(ps, lr=0.02, coeffs=coeffs), gf, full)
    assert step_error(a, run_ref(RefMuon, gf, full, coeffs=coeffs), full) < BF16_TOL[coeffs]

# ----------------------------------------------------------------------------- PolarGrad


@pytest.mark.parametrize("kw,wrongs", [
    (dict(nuclear="exact"), [dict(nuclear="inner"), dict(nuclear="one"), dict(momentum=0.9)]),
    (dict(nuclear="inner"), [dict(nuclear="exact")]),
    (dict(nuclear="exact", nesterov=True, weight_decay=5.0), [dict(nesterov=False), dict(weight_decay=0.0)]),
    (dict(nuclear="inner", nesterov=True, weight_decay=5.0, coeffs="quintic"), [dict(coeffs="simple")]),
])
def test_polargrad_rule_exact(float64_ns, kw, wrongs):
    p0, gs = init_params(TINY), grads(TINY, 20, scale=1e-2)
    a = run_impl(lambda ps: t.PolarGrad(ps, lr=1e-3, **kw), gs, p0, torch.float64)
    assert step_error(a, run_ref(RefPolarGrad, gs, p0, **kw), p0) < 1e-9
    for wrong in wrongs:
        assert wrong_error(a, RefPolarGrad, gs, p0, **{**kw, **wrong}) > 1e-3, wrong


@pytest.mark.parametrize("kw", [dict(nuclear="exact", coeffs="simple"),
                                dict(nuclear="inner", nesterov=True, weight_decay=5.0, coeffs="simple")])
def test_polargrad_matches_float64_within_bf16(kw):
    p0, gs = init_params(SMALL), grads(SMALL, 20, scale=1e-2)
    a = run_impl(lambda ps: t.PolarGrad(ps, lr=1e-3, **kw), gs, p0)
    assert step_error(a, run_ref(RefPolarGrad, gs, p0, **kw), p0) < BF16_TOL["simple"]
    wrong = dict(kw, nesterov=not kw.get("nesterov", False))
    assert wrong_error(a, RefPolarGrad, gs, p0, **wrong) > 2 * BF16_TOL["simple"]


def test_polargrad_exact_scale_is_the_svd_nuclear_norm():
    g = torch.Generator().manual_seed(2)
    for shape, scale in zip(SHAPES, (1e-3, 1.0, 1e-3, 1.0)):
        M = torch.randn(shape, generator=g) * scale
        truth = torch.linalg.svdvals(M.double()).sum()
        assert abs(t.nuclear_norm(M, "exact") / truth - 1) < 1e-4, shape
    spread = rotated(torch.logspace(0, -3, 768, dtype=torch.float64), 768, 768, g)  # a wide spectrum
    assert abs(t.nuclear_norm(spread.float()[None], "exact").item() / torch.linalg.svdvals(spread).sum() - 1) < 1e-4

# ----------------------------------------------------------------------------- SOAP


def soap_bases(store: list):
    """keep= hook of run_impl: after the first step, check each matrix's bases are eigenbases of L ~ G G^T and
    R ~ G^T G with descending eigenvalues, and store copies for the reference (None: a side without a basis)."""
    def keep(opt, ps):
        for p in ps:
            st, G = opt.state[p], p.grad.double()
            for P, Q in ((G @ G.T, st.get("QL")), (G.T @ G, st.get("QR"))):
                if Q is None:
                    continue
                Q = Q.double()
                assert (Q.T @ Q - torch.eye(len(Q), dtype=Q.dtype)).abs().max() < 1e-5
                D = Q.T @ P @ Q
                assert (D - torch.diag(torch.diag(D))).norm() < 1e-5 * P.norm()
                assert (torch.diag(D).diff() <= 1e-5 * P.norm()).all()
            store.append(tuple(None if q is None else q.clone() for q in (st.get("QL"), st.get("QR"))))  # state is
            # updated in place (views of the stacked state): a copy of this step's bases
    return keep


@pytest.mark.parametrize("shapes,steps,frequency,kw,bugs", [
    (SMALL, 22, 10, dict(), ["no_v_permute", "stale_m", "no_bias_correction"]),  # refreshes at t = 10, 20
    (SMALL[:2], 12, 4, dict(lr=0.01, betas=(0.9, 0.99), shampoo_beta=0.9, weight_decay=0.5), ["no_v_permute"]),
    (SMALL, 12, 4, dict(max_precond_dim=300), ["no_v_permute"]),  # 576 and 768 rows/columns: no basis there
    (SHAPES[1:2], 7, 3, dict(), []),  # full size (attn c_proj): refreshes at t = 3 and 6
])
def test_soap_rule_exact(shapes, steps, frequency, kw, bugs):
    p0, gs, bases = init_params(shapes), grads(shapes, steps), []
    a = run_impl(lambda ps: t.SOAP(ps, precondition_frequency=frequency, **kw), gs, p0, torch.float64,
                 keep=soap_bases(bases))
    ref_kw = {"max_dim" if k == "max_precond_dim" else k: v for k, v in dict(kw, frequency=frequency).items()}
    assert displacement_error(a, run_ref(RefSOAP, gs, p0, initial_bases=list(bases), **ref_kw), p0) < 1e-9
    for bug in bugs:  # the first 12 steps hold a refresh (t = 10, or 4 and 8) and updates after it
        wrong = run_ref(RefSOAP, gs[:12], p0, initial_bases=list(bases), bug=bug, **ref_kw)
        assert displacement_error(a[:12], wrong, p0) > 1e-2, bug


def test_soap_fp32_matches_float64():
    """fp32 SOAP vs the float64 reference on the same gradients. Not ~1e-6 everywhere: Adam's first step is a sign in
    the eigenbasis, and the first refresh sorts eigenvalue estimates that tie to fp32 precision (the bases start
    arbitrary in the null space), so fp32 and fp64 part ways on a few coordinates: displacement errors measured
    over 8 seeds 1e-6 .. 6e-4. Rounding the bases to bf16 instead gives 1.2e-2."""
    p0, gs, bases = init_params(SMALL), grads(SMALL, 22), []  # refreshes at t = 10 and 20
    a = run_impl(lambda ps: t.SOAP(ps), gs, p0, keep=soap_bases(bases))
    assert all(st.dtype == torch.float32 for q in bases for st in q)
    assert displacement_error(a, run_ref(RefSOAP, gs, p0, initial_bases=list(bases)), p0) < 3e-3


def test_soap_state_is_stacked_and_updated_in_place():
    """The state of one shape's matrices is one tensor per entry, updated in place: self.state[p][name] are views of
    it whose storage stays put over plain and refresh steps (no per-step copies); a loaded state dict is restacked
    once, then stays put too. A matrix without a gradient for a step is batched apart (restacked), and every matrix
    still moves exactly as when each has an optimizer of its own (float64)."""
    shapes = [SMALL[1]] * 3 + [SMALL[3]]
    p0, gs = init_params(shapes), grads(shapes, 8, seed=6)
    ps = [torch.nn.Parameter(p.clone().double()) for p in p0]
    opt = t.SOAP(ps, precondition_frequency=3)

    def storage(o, params):
        return {(i, k): v.data_ptr() for i, p in enumerate(params) for k, v in o.state[p].items() if k != "step"}
    for i, step in enumerate(gs[:7]):  # refreshes at t = 3, 6
        for p, g in zip(ps, step):
            p.grad = g.clone().double()
        opt.step()
        if i == 0:
            first = storage(opt, ps)
            assert set(k for _, k in first) == {"exp_avg", "exp_avg_sq", "L", "R", "QL", "QR"}
            assert all(opt.state[ps[0]][k]._base is opt.state[ps[2]][k]._base is not None for k in ("L", "QR"))
        assert storage(opt, ps) == first, i
    fresh_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fresh = t.SOAP(fresh_ps, precondition_frequency=3)
    fresh.load_state_dict(io_round_trip(opt.state_dict()))
    for k in range(2):
        for p, g in zip(fresh_ps, gs[7]):
            p.grad = g.clone().double()
        fresh.step()
        loaded = storage(fresh, fresh_ps) if k == 0 else loaded
    assert storage(fresh, fresh_ps) == loaded

    gs = grads(shapes, 8, seed=7)
    gs[4][1] = None  # matrix 1 misses step 4: from then on a step behind the others of its shape
    batched = [torch.nn.Parameter(p.clone().double()) for p in p0]
    alone = [torch.nn.Parameter(p.clone().double()) for p in p0]
    opts = [t.SOAP(batched, precondition_frequency=3)] + [t.SOAP([p], precondition_frequency=3) for p in alone]
    for step in gs:
        for p, q, g in zip(batched, alone, step):
            p.grad = q.grad = None if g is None else g.clone().double()
        for o in opts:
            o.step()
    assert max(rel(p - p0_, q - p0_) for p, q, p0_ in zip(batched, alone, p0)) < 1e-12


def io_round_trip(state_dict: dict) -> dict:
    """state_dict through torch.save / torch.load."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)

def test_soap_tf32_is_scoped_to_the_step(monkeypatch):
    """tf32=True: SOAP's matmuls run with torch.backends.cuda.matmul.allow_tf32 on, and after each step the flag and
    its fp32_precision spelling are what they were (off, or already on), also when the step raises; tf32=False leaves
    it off. On CPU the flag changes nothing: the parameters come out bit for bit as with tf32=False."""
    mm, seen = torch.backends.cuda.matmul, []
    before = (mm.allow_tf32, mm.fp32_precision)
    rotate = t._rotate
    monkeypatch.setattr(t, "_rotate", lambda *a, **k: (seen.append(mm.allow_tf32), rotate(*a, **k))[1])
    p0, gs = init_params(SMALL[:2]), grads(SMALL[:2], 4)
    try:
        runs = {}
        for tf32 in (False, True):
            seen.clear()
            runs[tf32] = run_impl(lambda ps: t.SOAP(ps, precondition_frequency=3, tf32=tf32), gs, p0)
            assert seen and set(seen) == {tf32} and (mm.allow_tf32, mm.fp32_precision) == before, tf32
        assert all(torch.equal(a, b) for x, y in zip(runs[False], runs[True]) for a, b in zip(x, y))
        mm.allow_tf32 = True  # already on: stays on
        run_impl(lambda ps: t.SOAP(ps, tf32=True), gs[:2], p0)
        assert mm.allow_tf32 and mm.fp32_precision == "tf32"
        mm.allow_tf32, mm.fp32_precision = before
        monkeypatch.setattr(t, "_rotate", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run_impl(lambda ps: t.SOAP(ps, tf32=True), gs[:2], p0)
        assert (mm.allow_tf32, mm.fp32_precision) == before
    finally:
        mm.allow_tf32, mm.fp32_precision = before


def test_soap_tf32_setting():
    assert t.parse_args([]).soap_tf32 is False
    tiny = ["--optimizer", "soap", "--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--vocab_size", "100"]
    for text, value in (("1", True), ("true", True), ("off", False)):
        args = t.parse_args(tiny + ["--soap_tf32", text])
        t.check_optimizer_args(args)
        assert t.build_optimizers(t.GPT(args), args)[1].param_groups[0]["tf32"] is value
    with pytest.raises(SystemExit, match="--soap_tf32: cannot read 'maybe' as bool"):
        t.parse_args(["--soap_tf32", "maybe"])
    with pytest.raises(SystemExit, match="--soap_tf32: must be a bool"):
        t.check_optimizer_args(dataclasses.replace(t.parse_args([]), soap_tf32="yes"))

def ema_gram(n: int, k: int, steps: int, rank: int, noise: float, g: torch.Generator, keep: int = -1):
    """SOAP's L after `steps` gradients G (n x k) = (slowly rotating rank-`rank` U) diag(i^-1) V^T + noise:
    L = 0.95 L + 0.05 G G^T, float64; also L as it was `keep` steps before the end."""
    U = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(k, rank, generator=g, dtype=torch.float64))[0]
    L, old = torch.zeros(n, n, dtype=torch.float64), None
    for i in range(steps):
        U = torch.linalg.qr(U + 0.1 * torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
        G = (U / torch.arange(1, rank + 1)) @ V.T + noise * torch.randn(n, k, generator=g, dtype=torch.float64)
        L = 0.95 * L + 0.05 * G @ G.T
        old = L.clone() if i == steps - 1 - keep else old
    return L, old


def power_step(L: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """What SOAP's refresh orthonormalizes, in fp32: (L Q)[:, argsort(-diag(Q^T L Q))]."""
    PQ = L.float() @ Q.float()
    order = torch.argsort((Q.float() * PQ).sum(-2), dim=-1, descending=True)
    return PQ.gather(-1, order[..., None, :].expand_as(PQ))


def signed_error(Q: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """max |Q D - ref| per matrix, D = the column signs that match Q to ref (float64)."""
    Q, ref = Q.double(), ref.double()
    return (Q * torch.sign((Q * ref).sum(-2, keepdim=True)) - ref).abs().amax(dim=(-2, -1))


@pytest.fixture
def qr_calls(monkeypatch):
    """torch.linalg.qr counting the matrices it is given (the fallback of orthonormalize)."""
    calls, qr = [], torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda A, *a, **k: (calls.append(A.shape), qr(A, *a, **k))[1])
    return calls


def test_orthonormalize_is_householder_q_up_to_signs(qr_calls):
    """Shifted CholeskyQR3 (float64) vs Householder QR in float64 of the same fp32 input, up to column signs. Realistic
    inputs (L = EMA of G G^T of low-rank-plus-noise gradients, the previous basis from eigh of L 10 steps earlier) land
    within fp32 rounding. Spectra spread over 1e8 .. 1e12 around a perturbed basis give scaled condition numbers
    5e3 .. 2e10: all take the fast path (no torch.linalg.qr) and are within 1e-7 of the exact Q, where fp32
    Householder (the reference code's precision) is up to 1e-2 off."""
    g = torch.Generator().manual_seed(0)
    for n, k, rank, noise in ((576, 192, 16, 1e-3), (192, 576, 64, 1e-2), (192, 192, 8, 1e-4)):
        Ls = [ema_gram(n, k, 30, rank, noise, g, keep=10) for _ in range(2)]
        A = power_step(torch.stack([L for L, _ in Ls]), torch.stack([t.eigenbasis(old) for _, old in Ls]))
        qr_calls.clear()
        Q = t.orthonormalize(A)
        assert Q.dtype == torch.float32 and not qr_calls, (n, k)
        assert signed_error(Q, torch.linalg.qr(A.double()).Q).max() < 1e-6, (n, k)
        assert (Q.double().mT @ Q.double() - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-6
    for ratio, perturbation in ((1e8, 1e-5), (1e8, 1e-2), (1e10, 1e-2), (1e12, 1e-3), (1e9, 1e-1)):
        U = torch.linalg.qr(torch.randn(3, 256, 256, generator=g, dtype=torch.float64)).Q
        L = (U * torch.logspace(0, -math.log10(ratio), 256, dtype=torch.float64)) @ U.mT
        E = torch.randn(3, 256, 256, generator=g, dtype=torch.float64) * perturbation / 16
        A = power_step(L, t.eigenbasis(L + E + E.mT))
        qr_calls.clear()
        Q = t.orthonormalize(A)
        assert not qr_calls, ratio
        exact, householder = torch.linalg.qr(A.double()).Q, torch.linalg.qr(A).Q
        err, hh_err = signed_error(Q, exact), signed_error(householder, exact)
        assert err.max() < 1e-7, (ratio, err)
        assert (Q.double().mT @ Q.double() - torch.eye(256, dtype=torch.float64)).abs().max() < 1e-6
    assert hh_err.min() > 1e-5  # where it matters: fp32 Householder is worse


def test_orthonormalize_rank_deficient_power_step(qr_calls):
    """SOAP's case on the 3072-wide side of an MLP matrix: L = EMA of G G^T with rank(L) < n, so P Q has fp32-noise
    columns and a scaled condition number near 1e11, where plain CholeskyQR2 fails (and fell back to torch.linalg.qr,
    the slow path on a GPU). Shifted CholeskyQR3 takes it without fallback: Q^T Q = I, Q^T A upper triangular (A = Q R),
    and the leading columns, where L's eigenvalues stand above the noise, equal float64 Householder's up to sign."""
    g = torch.Generator().manual_seed(3)
    L, old = ema_gram(512, 24, 12, 16, 1e-3, g, keep=5)  # rank <= 12 steps x 24 = 288 < 512
    A = power_step(L, t.eigenbasis(old))
    scaled = A.double() / A.double().norm(dim=0)
    s = torch.linalg.svdvals(scaled)
    assert s[0] / s[-1] > 1e9  # as measured on this model's gradients
    qr_calls.clear()
    Q = t.orthonormalize(A).double()
    assert not qr_calls
    assert (Q.mT @ Q - torch.eye(512, dtype=torch.float64)).abs().max() < 1e-6
    R = Q.mT @ A.double()
    assert R.tril(-1).abs().max() < 1e-6 * A.double().abs().max()
    assert signed_error(Q[:, :100], torch.linalg.qr(A.double()).Q[:, :100]) < 1e-5


def test_orthonormalize_gives_a_fourth_pass_where_the_third_gram_is_off(qr_calls, monkeypatch):
    """A matrix whose Gram before the third CholeskyQR pass is still off I by >= 0.5 (cond(A) ~ 10^12.7 here; 2304-
    and 3072-wide SOAP bases on an H100 had 0.7 .. 3.2 there) gets a fourth pass, only it, instead of torch.linalg.qr:
    Q^T Q = I and Q^T A upper triangular to float64 rounding, and the well-conditioned matrix beside it keeps three
    passes, bit for bit as alone."""
    g = torch.Generator().manual_seed(0)
    n = 256
    U, V = (torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] for _ in range(2))
    hard = (U * torch.logspace(0, -12.7, n, dtype=torch.float64)) @ V.T
    easy = torch.randn(n, n, generator=g, dtype=torch.float64)
    qr_calls.clear()
    passes = []
    real = t.cholesky_blocked
    monkeypatch.setattr(t, "cholesky_blocked", lambda A, b=None: passes.append(A.size(0)) or real(A, b))
    Q = t.orthonormalize(torch.stack([easy, hard]))
    assert not qr_calls and passes == [2, 2, 2, 1], passes
    eye = torch.eye(n, dtype=torch.float64)
    assert (Q[1].mT @ Q[1] - eye).abs().max() < 1e-12
    R = Q[1].mT @ hard
    assert R.tril(-1).abs().max() < 1e-12 * hard.abs().max()
    assert torch.equal(Q[0], t.orthonormalize(easy[None])[0])


def test_orthonormalize_falls_back_per_matrix(qr_calls):
    """Matrices whose Cholesky fails get torch.linalg.qr's Q, bit for bit: a zero column always; a repeated column where
    the rounding fails its Cholesky (it did in one run of the suite and held in another, on one CPU machine; where it
    holds, the shifted pass turns the rounding noise of that column into an orthonormal column, also a valid basis). The rest of the batch stays on the fast path; float64 input
    gives float64 accuracy; an unbatched matrix works."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 64, 64, generator=g)
    A[1, :, 7] = A[1, :, 3]
    A[2, :, 5] = 0
    Q = t.orthonormalize(A)
    assert qr_calls in ([torch.Size([2, 64, 64])], [torch.Size([1, 64, 64])])
    fell = [1, 2] if qr_calls[0][0] == 2 else [2]
    assert torch.equal(Q[fell], torch.linalg.qr(A[fell]).Q)
    if fell == [2]:
        assert (Q[1].double().mT @ Q[1].double() - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-5
    assert signed_error(Q[[0, 3]], torch.linalg.qr(A[[0, 3]].double()).Q).max() < 1e-6
    A64 = torch.randn(2, 96, 96, generator=g, dtype=torch.float64)
    assert signed_error(t.orthonormalize(A64), torch.linalg.qr(A64).Q).max() < 1e-12
    assert signed_error(t.orthonormalize(A64[0]), torch.linalg.qr(A64[0]).Q) < 1e-12


def test_soap_update_is_invariant_to_basis_column_signs(monkeypatch):
    """Q_L, Q_R are defined up to column signs (eigh's, QR's): flipping columns of Q_L and Q_R before step 3, with the
    first moment's matching rows and columns (m lives in that basis), leaves all 12 updates unchanged (float64,
    refreshes at t = 5, 10); flipping Q_L, Q_R alone changes them (the control). So do bases that come out of
    eigenbasis and orthonormalize with random column signs, as orthonormalize's may differ from Householder's."""
    p0, gs = init_params(SMALL), grads(SMALL, 12)
    plain = run_impl(lambda ps: t.SOAP(ps, precondition_frequency=5), gs, p0, torch.float64)

    def flipping(with_m: bool, steps: int) -> list[list[torch.Tensor]]:
        ps = [torch.nn.Parameter(p.clone().double()) for p in p0]
        opt, out = t.SOAP(ps, precondition_frequency=5), []
        for i, step in enumerate(gs[:steps]):
            for p, g in zip(ps, step):
                p.grad = g.clone().double()
                st = opt.state[p]
                if i == 3:  # state entries are views of the stacked state: flipped in place
                    st["QL"][:, ::2] *= -1
                    st["QR"][:, 1::3] *= -1
                    if with_m:
                        st["exp_avg"][::2] *= -1
                        st["exp_avg"][:, 1::3] *= -1
            opt.step()
            out.append([p.detach().clone() for p in ps])
        return out
    assert step_error(flipping(True, 12), plain, p0) < 1e-12
    assert step_error(flipping(False, 5), plain[:5], p0) > 1e-2

    g = torch.Generator().manual_seed(5)

    def random_signs(f):
        def signed(*a):
            out = f(*a)
            return out * (torch.randint(0, 2, (*out.shape[:-2], 1, out.size(-1)), generator=g) * 2 - 1).to(out.dtype)
        return signed
    monkeypatch.setattr(t, "eigenbasis", random_signs(t.eigenbasis))
    monkeypatch.setattr(t, "orthonormalize", random_signs(t.orthonormalize))
    assert step_error(run_impl(lambda ps: t.SOAP(ps, precondition_frequency=5), gs, p0, torch.float64), plain, p0) < 1e-12


def low_rank_grads(shapes, steps: int, seed: int = 0, rank: int = 8) -> list[list[torch.Tensor]]:
    """Gradients U diag(z_i / i) V^T + 1e-3 noise per step, z Gaussian, U and V (rank columns) turning a little each
    step: grads[step][matrix], fp32."""
    g = torch.Generator().manual_seed(seed)
    UV = [[torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0] for n in s] for s in shapes]
    out = []
    for _ in range(steps):
        for U, V in UV:
            U.copy_(torch.linalg.qr(U + 0.1 * torch.randn(U.shape, generator=g, dtype=torch.float64))[0])
        out.append([((U / torch.arange(1, rank + 1) * torch.randn(rank, generator=g, dtype=torch.float64)) @ V.T
                     + 1e-3 * torch.randn(U.size(0), V.size(0), generator=g, dtype=torch.float64)).float()
                    for U, V in UV])
    return out


def test_soap_fp32_low_rank_gradients_match_float64(qr_calls):
    """fp32 SOAP vs the float64 reference (Householder QR) on low-rank-plus-noise gradients, whose L and R are far
    worse conditioned than the Gaussian ones above, 22 steps with refreshes at t = 10, 20: the refreshes take the
    fast path (no torch.linalg.qr) and the displacements agree as in test_soap_fp32_matches_float64 (measured over
    seeds 0-3: 5e-5 .. 5e-4, the same as with fp32 Householder QR in the refresh)."""
    p0, gs, bases = init_params(SMALL), low_rank_grads(SMALL, 22), []
    qr_calls.clear()
    a = run_impl(lambda ps: t.SOAP(ps), gs, p0, keep=soap_bases(bases))
    assert not qr_calls
    assert displacement_error(a, run_ref(RefSOAP, gs, p0, initial_bases=list(bases)), p0) < 3e-3


# ----------------------------------------------------------------------------- AdamW


def test_adamw_control_matches_float64():
    args = t.parse_args(["--optimizer", "adamw", "--n_layer", "1", "--n_embd", "64", "--n_head", "2",
                         "--vocab_size", "100"])
    embed, blocks = t.build_optimizers(t.GPT(args), args)
    assert type(blocks) is torch.optim.AdamW and len(blocks.param_groups[0]["params"]) == 4
    g = blocks.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (0.0018, (0.9, 0.95), 0.0, 1e-8)
    p0, gs = init_params(SMALL), grads(SMALL, 20, scale=1e-2)
    a = run_impl(lambda ps: torch.optim.AdamW(ps, lr=0.0018, betas=(0.9, 0.95), weight_decay=0.0), gs, p0)
    assert displacement_error(a, run_ref(RefAdamW, gs, p0), p0) < 1e-5
    assert max(rel(x, y) for x, y in zip(a[-1], run_ref(RefAdamW, gs, p0)[-1])) < 1e-5
    assert displacement_error(a, run_ref(RefAdamW, gs, p0, bias_correction=False), p0) > 1e-2


def test_adamw_groups_take_their_own_settings():
    """The embedding/head AdamW takes embed_lr and embed_betas (no weight decay); the block AdamW control takes
    adamw_lr, adamw_betas and adamw_weight_decay: every value set apart from its default and from the other's."""
    args = t.parse_args(["--optimizer", "adamw", "--n_layer", "1", "--n_embd", "64", "--n_head", "2",
                         "--vocab_size", "100", "--embed_lr", "0.011", "--embed_betas", "0.81,0.91",
                         "--adamw_lr", "0.022", "--adamw_betas", "0.82,0.92", "--adamw_weight_decay", "0.3"])
    embed, blocks = (o.param_groups[0] for o in t.build_optimizers(t.GPT(args), args))
    assert (embed["lr"], embed["base_lr"], embed["betas"], embed["weight_decay"]) == (0.011, 0.011, (0.81, 0.91), 0.0)
    assert (blocks["lr"], blocks["base_lr"], blocks["betas"], blocks["weight_decay"]) == (0.022, 0.022, (0.82, 0.92),
                                                                                          0.3)

# ----------------------------------------------------------------------------- 2 processes vs 1

DIST_SHAPES = TINY + TINY  # two blocks' matrices: the 2 processes own different subsets of each shape
DIST_MAKERS = {
    "muon": lambda ps: t.Muon(ps, lr=0.02),
    "polargrad": lambda ps: t.PolarGrad(ps, lr=1e-3, nesterov=True, weight_decay=0.1),
    "polargrad_inner": lambda ps: t.PolarGrad(ps, lr=1e-3, nuclear="inner", coeffs="polar_express"),
    "soap": lambda ps: t.SOAP(ps, precondition_frequency=2),
}


def run_all_matrix_optimizers() -> dict:
    """5 steps of each MatrixOptimizer on DIST_SHAPES with fixed gradients: {name: (final params, owner ranks)}."""
    out, gs = {}, grads(DIST_SHAPES, 5, seed=3, scale=1e-2)
    for name, make in DIST_MAKERS.items():
        ps = [torch.nn.Parameter(p) for p in init_params(DIST_SHAPES)]
        opt = make(ps)
        for step in gs:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()
        out[name] = ([p.detach().clone() for p in ps], [opt.owner[p] for p in ps])
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run_all_matrix_optimizers(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_processes_equal_one(tmp_path, world):
    """W processes (gloo), each running the rule on the matrices it owns and sharing them, end every step with the
    parameters 1 process computes, bit for bit (same gradients on every process)."""
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    one = run_all_matrix_optimizers()  # one thread, as the workers (fixture one_thread)
    for name in DIST_MAKERS:
        owners = ranks[0][name][1]
        assert set(owners) == set(range(world)) and all(ranks[r][name][1] == owners for r in range(world))
        # some shapes are split between the processes: their batches differ from the 1-process batches
        assert any(len({o for o, s in zip(owners, DIST_SHAPES) if s == shape}) == 2 for shape in TINY)
        assert set(one[name][1]) == {0}
        for i, p in enumerate(one[name][0]):
            assert all(torch.equal(ranks[r][name][0][i], p) for r in range(world)), name

# ----------------------------------------------------------------------------- state dict


ROUND_TRIP = {
    "muon": lambda ps: t.Muon(ps, lr=0.02),
    "polargrad": lambda ps: t.PolarGrad(ps, lr=1e-3, nesterov=True, weight_decay=0.1),
    "polargrad_inner": lambda ps: t.PolarGrad(ps, lr=1e-3, nuclear="inner"),
    "soap": lambda ps: t.SOAP(ps, precondition_frequency=3),  # the step after loading refreshes the bases
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.0018, betas=(0.9, 0.95), weight_decay=0.0),
}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_dict_round_trip(name):
    make, gs = ROUND_TRIP[name], grads(SMALL, 4, seed=4, scale=1e-2)
    ps = [torch.nn.Parameter(p) for p in init_params(SMALL)]
    opt = make(ps)
    for step in gs[:3]:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in ps]}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    qs = [torch.nn.Parameter(p) for p in saved["params"]]
    fresh = make(qs)
    fresh.load_state_dict(saved["opt"])
    for params, o in ((ps, opt), (qs, fresh)):
        for p, g in zip(params, gs[3]):
            p.grad = g.clone()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))

@pytest.mark.parametrize("nesterov", [True, False])
def test_nesterov_stack_is_the_momentum_rule_on_wide_and_tall_matrices(nesterov):
    """nesterov_stack (wide matrices one fused kernel each, tall ones by foreach ops on CUDA): buf = m buf + G in
    place and the stack of bf16(G + m buf) or bf16(buf), tall ones transposed: bitwise equal to the plain formulas."""
    gen = torch.Generator().manual_seed(6)
    shapes = [(48, 96), (96, 48), (48, 96), (96, 48)]
    bufs = [torch.randn(s, generator=gen) for s in shapes]
    grads_ = [torch.randn(s, generator=gen) for s in shapes]
    want_bufs = [0.9 * b + g for b, g in zip(bufs, grads_)]
    want = torch.stack([(x.mT if x.size(0) > x.size(1) else x).bfloat16() for x in
                        ([g + 0.9 * b for g, b in zip(grads_, want_bufs)] if nesterov else want_bufs)])
    got = t.Muon.nesterov_stack(grads_, bufs, 0.9, nesterov)
    assert got.dtype == torch.bfloat16 and got.shape == (4, 48, 96)
    assert all(torch.equal(b, w) for b, w in zip(bufs, want_bufs)) and torch.equal(got, want)


@pytest.mark.parametrize("name", ["muon", "polargrad_inner"])
def test_momentum_buffers_are_made_once(name, monkeypatch):
    """The first step makes each matrix's momentum buffer; later steps allocate none (they only update it)."""
    ps = [torch.nn.Parameter(p) for p in init_params(SMALL)]
    opt, made = ROUND_TRIP[name](ps), []
    real = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda *a, **k: made.append(1) or real(*a, **k))
    for step, g in enumerate(grads(SMALL, 3, seed=5, scale=1e-2)):
        for p, gi in zip(ps, g):
            p.grad = gi
        opt.step()
        assert len(made) == len(ps), step
    assert all(opt.state[p]["momentum_buffer"].shape == p.shape for p in ps)


# ----------------------------------------------------------------------------- settings


def test_settings_defaults_and_build():
    a = t.parse_args([])
    assert {"muon", "polargrad", "soap", "adamw"} <= set(t.OPTIMIZERS)
    assert (a.polargrad_lr, a.polargrad_momentum, a.polargrad_nesterov, a.polargrad_weight_decay) == (0.3, 0.95,
                                                                                                        False, 0.0)
    assert (a.polargrad_nuclear, a.polargrad_ns_coeffs, a.ns_coeffs) == ("inner", "polar_express", "simple")
    assert (a.soap_lr, a.soap_betas, a.soap_shampoo_beta, a.soap_eps, a.soap_weight_decay,
            a.soap_precondition_frequency, a.soap_max_precond_dim) == (0.0018, (0.95, 0.95), -1.0, 1e-8, 0.0, 10, 10000)
    t.check_optimizer_args(a)
    kinds = {"muon": t.Muon, "polargrad": t.PolarGrad, "soap": t.SOAP, "adamw": torch.optim.AdamW}
    tiny = ["--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--vocab_size", "100"]
    for name, cls in kinds.items():
        args = t.parse_args(["--optimizer", name] + tiny)
        model = t.GPT(args)
        embed, blocks = t.build_optimizers(model, args)
        assert type(blocks) is cls and type(embed) is torch.optim.AdamW
        assert embed.param_groups[0]["params"] == [model.lm_head.weight]
        assert (embed.param_groups[0]["lr"], embed.param_groups[0]["betas"]) == (0.0018, (0.9, 0.95))
        assert blocks.param_groups[0]["params"] == list(model.transformer.h.parameters())
    group = t.build_optimizers(model, t.parse_args(["--optimizer", "polargrad"] + tiny))[1].param_groups[0]
    assert (group["nuclear"], group["coeffs"], group["lr"]) == ("inner", "polar_express", 0.3)
    args = t.parse_args(["--optimizer", "polargrad", "--polargrad_nuclear", "exact", "--polargrad_ns_coeffs", "quintic",
                         "--polargrad_lr", "0.5"] + tiny)
    group = t.build_optimizers(model, args)[1].param_groups[0]
    assert (group["nuclear"], group["coeffs"], group["lr"]) == ("exact", "quintic", 0.5)
    with pytest.raises(SystemExit, match="unknown optimizer"):
        t.build_optimizers(model, t.parse_args(["--optimizer", "sgd"]))


@pytest.mark.parametrize("setting,value", [
    ("polargrad_lr", "0"), ("soap_lr", "-1"), ("muon_lr", "nan"), ("soap_eps", "0"), ("polargrad_momentum", "1"),
    ("muon_momentum", "-0.1"), ("soap_betas", "0.9,1.0"), ("adamw_betas", "0.9"), ("embed_betas", "-0.1,0.9"),
    ("polargrad_weight_decay", "-1"), ("soap_shampoo_beta", "1.0"), ("soap_precondition_frequency", "0"),
    ("soap_max_precond_dim", "0"), ("polargrad_nuclear", "svd"),
])
def test_check_optimizer_args_refuses(setting, value):
    with pytest.raises(SystemExit, match=f"--{setting}: must be"):
        t.check_optimizer_args(t.parse_args([f"--{setting}", value]))

# ----------------------------------------------------------------------------- measurement (not a check)


@pytest.mark.skipif(not os.environ.get("POLARGRAD_NUCLEAR_SHARD"), reason="set POLARGRAD_NUCLEAR_SHARD=<a .bin shard>")
def test_measure_polargrad_nuclear():
    """How far `inner` (<O, M>) is from `exact` (Gram eigvalsh) on real gradients: a 2-layer GPT at the real width
    (768), 8 x 128 tokens per step from the shard, 3 Muon/AdamW steps, then the gradient G and PolarGrad's momentum
    M = EMA_0.95(G) of the 4th. Prints (inner - exact) / exact per coefficient set and matrix (run with -s)."""
    torch.manual_seed(0)
    args = t.parse_args(["--n_layer", "2", "--sequence_length", "128", "--device_batch_size", "8",
                         "--batch_size", "8"])
    model = t.GPT(args)
    opts = t.build_optimizers(model, args)
    tokens = t.load_shard(os.environ["POLARGRAD_NUCLEAR_SHARD"], args.vocab_size)
    n = 8 * 128
    named = list(model.transformer.h.named_parameters())
    momentum = [torch.zeros_like(p) for _, p in named]
    for step in range(4):
        buf = torch.from_numpy(tokens[step * n: (step + 1) * n + 1].astype("int64"))
        model(buf[:-1].view(8, 128), buf[1:].view(8, 128)).backward()
        for m, (_, p) in zip(momentum, named):
            m.lerp_(p.grad, 0.05)
        if step < 3:
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)
    print(f"\n(inner - exact) / exact per set; exact vs SVD: |exact - svd| / svd\n{'':9} {'matrix':22} {'shape':12} "
          f"{'exact vs SVD':>12} " + " ".join(f"{c:>13}" for c in t.NS_COEFFS))
    for what, mats in (("gradient", [p.grad for _, p in named]), ("momentum", momentum)):
        for (name, _), M in zip(named, mats):
            exact = t.nuclear_norm(M, "exact").item()
            svd = torch.linalg.svdvals(M.double()).sum().item()
            errs = [(t.nuclear_norm(M, "inner", t.orthogonalize(M, c)).item() - exact) / exact for c in t.NS_COEFFS]
            print(f"{what:9} {name:22} {str(tuple(M.shape)):12} {abs(exact - svd) / svd:12.1e} "
                  + " ".join(f"{e:+13.4f}" for e in errs))


def test_soap_refresh_orthonormalizes_each_basis_size_once(monkeypatch):
    """At a refresh SOAP orthonormalizes all bases of one size as one batch, across the matrices' shapes (e.g. the
    MLP's 4d x d and d x 4d share their 4d-wide bases, and every d-wide basis goes in one batch): one call per size,
    each with every matrix's basis of that size; none on other steps. (The float64 reference tests check the result.)"""
    calls = []
    real = t.orthonormalize
    monkeypatch.setattr(t, "orthonormalize", lambda A: calls.append(tuple(A.shape)) or real(A))
    ps = [torch.nn.Parameter(p.clone()) for p in init_params(SMALL)]
    opt = t.SOAP(ps, precondition_frequency=3)
    for i, step in enumerate(grads(SMALL, 4)):
        for p, g in zip(ps, step):
            p.grad = g
        calls.clear()
        opt.step()
        assert calls == [] or i == 3, (i, calls)
    sizes = sorted(n for shape in SMALL for n in shape)
    expect = sorted((sizes.count(n), n, n) for n in set(sizes))
    assert sorted(calls) == expect, (calls, expect)


def test_every_mutant_of_the_mutation_check_applies_to_the_trainer():
    """tests/mutants.py's mutants are strings replaced in train_gpt2.py: each must occur exactly once, and each names
    tests that exist, or the mutation check (python tests/mutants.py, slow) reports it instead of its result."""
    import mutants
    assert mutants.stale(open(t.__file__).read()) == []
