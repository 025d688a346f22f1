"""Feature-gram optimizers over several steps, with momentum and across refreshes of C, against float64 references
written here from their formulas (inverses by torch.linalg.inv, square roots by eigh, msign by SVD), never from
train_gpt2's helpers or constants. msign is swapped for the exact U V^T (fixture exact_msign), so every rule must agree
to ~1e-10; each test also shows that a plausible wrong rule is far outside its tolerance."""
import pytest
import torch

import train_gpt2 as t

WIDE, TALL = (12, 20), (20, 12)  # out x d: both orientations of one transposition class, and a square one
SHAPES = [WIDE, TALL, (16, 16)]
N_TOKENS = 10  # the collected sums are C * N_TOKENS
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def msign64(X: torch.Tensor) -> torch.Tensor:
    """U V^T of X = U S V^T in float64."""
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U @ Vh


@pytest.fixture
def exact_msign(monkeypatch):
    """train_gpt2's Newton-Schulz (and the bf16 cast before it) replaced by the exact msign in float64."""
    monkeypatch.setattr(t, "NS_DTYPE", torch.float64)
    monkeypatch.setattr(t, "orthogonalize", lambda G, coeffs="simple": torch.stack([msign64(g) for g in G]))


def spd(d: int, seed: int, spread: float = 3.0) -> torch.Tensor:
    """Q diag(l) Q^T with l log-spaced over 10^spread and a random orthonormal Q (float64): a C far from c I."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (Q * torch.logspace(0, -spread, d, dtype=torch.float64)) @ Q.T


def gaussians(shapes, steps: int, seed: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(steps)]


def run_feature_gram(make, grams: dict[int, list[torch.Tensor]], gs, p0) -> list[list[torch.Tensor]]:
    """Params after each step of make(params, layers) fed gradients gs, float64; before step k in `grams`, each
    layer's collected sum is set to C * N_TOKENS (C as the optimizer's mode stores it) and refresh_gram runs."""
    ps = [torch.nn.Parameter(p.clone()) for p in p0]
    layers = [torch.nn.Module() for _ in ps]
    for m, p in zip(layers, ps):
        m.weight = p
    opt, out = make(ps, layers), []
    for k, step in enumerate(gs):
        if k in grams:
            for m, C in zip(layers, grams[k]):
                m.gram = C * N_TOKENS
            opt.refresh_gram(n_tokens=N_TOKENS)
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


def run_reference(make_ref, grams, gs, p0) -> list[list[torch.Tensor]]:
    """The same with one reference per matrix: ref.refresh(C) before step k in grams, ref.step(p, G) -> new p."""
    ps, refs, out = [p.clone() for p in p0], [make_ref() for _ in p0], []
    for k, step in enumerate(gs):
        if k in grams:
            for r, C in zip(refs, grams[k]):
                r.refresh(C)
        ps = [r.step(p, g) for r, p, g in zip(refs, ps, step)]
        out.append([p.clone() for p in ps])
    return out


def worst_step_error(a, b, p0) -> float:
    """Max over steps and matrices of ||step_a - step_b|| / ||step_b|| (each step from its own previous params)."""
    prev_a, prev_b, worst = p0, p0, 0.0
    for pa, pb in zip(a, b):
        for x, y, u, v in zip(pa, prev_a, pb, prev_b):
            worst = max(worst, ((x - y) - (u - v)).norm().item() / (u - v).norm().item())
        prev_a, prev_b = pa, pb
    return worst


def init(shapes, seed: int = 7) -> list[torch.Tensor]:
    return [0.1 * x for x in gaussians(shapes, 1, seed)[0]]


def damped(C: torch.Tensor, gamma: float) -> torch.Tensor:
    return C + gamma * torch.eye(C.size(0), dtype=C.dtype)


class RefNewtonMuon:
    """R = (C + gamma I)^-1 (solve) or V diag(l + gamma)^-1/2 V^T (inverse_sqrt), gamma = damping tr(C)/d, R = I before
    the first refresh; s = max(1, rows/cols)^0.5 if shape_scale else 1;
    before: buf = m buf + G R; D = G R + m buf (Nesterov) or buf;   after: buf = m buf + G; D = (G + m buf) R or buf R;
    p -= lr s msign(D)."""

    def __init__(self, lr=0.02, momentum=0.9, nesterov=True, damping=0.2, precondition="before", f="solve",
                 shape_scale=False):
        self.lr, self.m, self.nesterov, self.damping, self.pre, self.f, self.shape_scale = \
            lr, momentum, nesterov, damping, precondition, f, shape_scale
        self.buf, self.R = 0.0, None

    def refresh(self, C):
        gamma = self.damping * torch.trace(C) / C.size(0)
        if self.f == "solve":
            self.R = torch.linalg.inv(damped(C, gamma))
        else:
            l, V = torch.linalg.eigh(C)
            self.R = (V * (l + gamma) ** -0.5) @ V.T

    def step(self, p, G):
        R = self.R if self.R is not None else torch.eye(G.size(1), dtype=G.dtype)
        if self.pre == "before":
            self.buf = self.m * self.buf + G @ R
            D = G @ R + self.m * self.buf if self.nesterov else self.buf
        else:
            self.buf = self.m * self.buf + G
            D = (G + self.m * self.buf if self.nesterov else self.buf) @ R
        s = max(1.0, G.size(0) / G.size(1)) ** 0.5 if self.shape_scale else 1.0
        return p - self.lr * s * msign64(D)


def newton_muon_case(seed: int = 0, steps: int = 6, refresh_at=(0, 3)):
    """Gradients for `steps` steps, and a different C per matrix at each refresh step."""
    grams = {k: [spd(s[1], seed + 10 * k + i) for i, s in enumerate(SHAPES)] for k in refresh_at}
    return grams, gaussians(SHAPES, steps, seed), init(SHAPES)


@pytest.mark.parametrize("precondition,nesterov", [("before", True), ("after", True), ("before", False),
                                                   ("after", False)])
def test_newton_muon_precondition_rule(exact_msign, precondition, nesterov):
    """6 steps with momentum 0.9 across a refresh of C (steps 0 and 3): each step equals the reference to 1e-10; the
    other placement of the preconditioner is off by > 0.05 after the refresh (the placements agree up to it only if
    R never changed: here R changes at step 3, which is what tells them apart)."""
    grams, gs, p0 = newton_muon_case()
    kw = dict(lr=0.02, momentum=0.9, nesterov=nesterov)
    a = run_feature_gram(lambda ps, layers: t.NewtonMuon(ps, layers, damping=0.2, precondition=precondition, **kw),
                         grams, gs, p0)
    ref = run_reference(lambda: RefNewtonMuon(precondition=precondition, **kw), grams, gs, p0)
    assert worst_step_error(a, ref, p0) < 1e-10
    other = "after" if precondition == "before" else "before"
    wrong = run_reference(lambda: RefNewtonMuon(precondition=other, **kw), grams, gs, p0)
    assert worst_step_error(a[:3], wrong[:3], p0) < 1e-10  # one R so far: the same rule
    assert worst_step_error(a, wrong, p0) > 0.05


class RefLocoProp:
    """C <- beta C + (1 - beta) C_new at each refresh (the first: C_new); A = C + lam I (absolute) or
    C + lam tr(C)/d I (relative); P = A^-1 (K = 0) or nu sum_{j<K} (I - nu A)^j; P = I before the first refresh;
    M = mu M + G (heavy ball; M = G without momentum); p -= eta M P."""

    def __init__(self, lr=0.3, lam=1.0, lambda_mode="absolute", momentum=0.0, steps=0, nu=0.5, gram_beta=0.0):
        self.lr, self.lam, self.mode, self.mu, self.K, self.nu = lr, lam, lambda_mode, momentum, steps, nu
        self.beta, self.C = gram_beta, None
        self.M, self.P = 0.0, None

    def refresh(self, C):
        C = self.C = C if self.C is None else self.beta * self.C + (1 - self.beta) * C
        lam = self.lam * (torch.trace(C) / C.size(0) if self.mode == "relative" else 1.0)
        A = damped(C, lam)
        if self.K == 0:
            self.P = torch.linalg.inv(A)
        else:
            B = torch.eye(C.size(0), dtype=C.dtype) - self.nu * A
            self.P = self.nu * sum(torch.linalg.matrix_power(B, j) for j in range(self.K))

    def step(self, p, G):
        self.M = self.mu * self.M + G
        P = self.P if self.P is not None else torch.eye(G.size(1), dtype=G.dtype)
        return p - self.lr * self.M @ P


def locoprop_case(seed: int = 1, steps: int = 6, refresh_at=(0, 3)):
    """As newton_muon_case, with C's scale far from 1 (tr(C)/d ~ 0.02), where relative and absolute lam differ."""
    grams = {k: [0.1 * spd(s[1], seed + 10 * k + i) for i, s in enumerate(SHAPES)] for k in refresh_at}
    return grams, gaussians(SHAPES, steps, seed), init(SHAPES)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_locoprop_lambda_mode(mode):
    """LocoProp-S with momentum 0.9 over 6 steps across a refresh: A = C + lam I (absolute) or C + lam tr(C)/d I
    (relative), to 1e-10; the other mode is off by > 0.5 (tr(C)/d ~ 0.02 here)."""
    grams, gs, p0 = locoprop_case()
    kw = dict(lr=0.3, lam=0.5, momentum=0.9)
    a = run_feature_gram(lambda ps, layers: t.LocoPropS(ps, layers, lambda_mode=mode, **kw), grams, gs, p0)
    ref = run_reference(lambda: RefLocoProp(lambda_mode=mode, **kw), grams, gs, p0)
    assert worst_step_error(a, ref, p0) < 1e-10
    other = "relative" if mode == "absolute" else "absolute"
    assert worst_step_error(a, run_reference(lambda: RefLocoProp(lambda_mode=other, **kw), grams, gs, p0), p0) > 0.5


@pytest.mark.parametrize("setting,value,allowed,got", [
    ("newton_muon_precondition", "inside", "before or after", "'inside'"),
    ("locoprop_lambda_mode", "scaled", "absolute or relative", "'scaled'"),
    ("locoprop_nu", "2", "in (0, 2) (the inner step is locoprop_nu / L, L >= lambda_max(C + lambda I))", "2.0"),
    ("locoprop_nu", "0", "in (0, 2)", "0.0"),
    ("gram_phase", "8", "in [0, 8) (--gram_every)", "8"),
    ("gram_phase", "-1", "in [0, 8) (--gram_every)", "-1"),
    ("gram_start", "-0.001", ">= 0", "-0.001"),
    ("gram_start", "inf", ">= 0", "inf"),
    ("gram_ridge", "layer", "matrix or block", "'layer'"),
    ("gram_apply", "fp16", "bf16 or fp32", "'fp16'"),
    ("gram_damping_eps", "-1e-8", ">= 0", "-1e-08"),
    ("gram_damping_eps", "nan", ">= 0", "nan"),
])
def test_optimizer_settings_refuse_values_out_of_range(setting, value, allowed, got):
    with pytest.raises(SystemExit) as e:
        t.check_optimizer_args(t.parse_args([f"--{setting}", value]))
    assert str(e.value).startswith(f"--{setting}: must be {allowed}") and str(e.value).endswith(f", got {got}")
    assert "\n" not in str(e.value)


def test_choice_settings_reach_the_optimizers():
    tiny = ["--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--vocab_size", "100"]
    defaults = t.parse_args([])
    assert (defaults.newton_muon_precondition, defaults.locoprop_lambda_mode) == ("before", "absolute")
    for optimizer, setting, key, value in (("newton_muon", "newton_muon_precondition", "precondition", "after"),
                                           ("locoprop", "locoprop_lambda_mode", "lambda_mode", "relative")):
        args = t.parse_args(tiny + ["--optimizer", optimizer, f"--{setting}", value])
        t.check_optimizer_args(args)
        assert t.build_optimizers(t.GPT(args), args)[-1].param_groups[0][key] == value


def dense(C: torch.Tensor, mode: str) -> torch.Tensor:
    """The d x d matrix a full, block (d/b, b, b) or diag (d,) C stands for."""
    return {"full": lambda: C, "block": lambda: torch.block_diag(*C), "diag": lambda: torch.diag(C)}[mode]()


def as_mode(C: torch.Tensor, mode: str, b: int = 4) -> torch.Tensor:
    """A full C as the optimizer stores it in `mode`: itself, its (d/b, b, b) diagonal blocks, or its diagonal."""
    if mode == "diag":
        return torch.diagonal(C).clone()
    if mode == "block":
        return torch.stack([C[i:i + b, i:i + b] for i in range(0, C.size(0), b)])
    return C


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
@pytest.mark.parametrize("f", ["solve", "inverse_sqrt"])
def test_newton_muon_gram_f(exact_msign, mode, f):
    """R = (C + gamma I)^-1 (solve) or (C + gamma I)^(-1/2) (inverse_sqrt) for full, block-diagonal and diagonal C,
    gamma = 0.2 tr(C)/d, over 6 steps with momentum across a refresh, to 1e-10; the other f is off by > 0.05."""
    grams, gs, p0 = newton_muon_case(seed=3)
    grams = {k: [as_mode(C, mode) for C in Cs] for k, Cs in grams.items()}
    dense_grams = {k: [dense(C, mode) for C in Cs] for k, Cs in grams.items()}
    a = run_feature_gram(lambda ps, layers: t.NewtonMuon(ps, layers, lr=0.02, momentum=0.9, gram=mode, f=f),
                         grams, gs, p0)
    ref = run_reference(lambda: RefNewtonMuon(momentum=0.9, f=f), dense_grams, gs, p0)
    assert worst_step_error(a, ref, p0) < 1e-10
    other = "solve" if f == "inverse_sqrt" else "inverse_sqrt"
    assert worst_step_error(a, run_reference(lambda: RefNewtonMuon(momentum=0.9, f=other), dense_grams, gs, p0),
                            p0) > 0.05


def test_newton_muon_shape_scale(exact_msign):
    """--muon_shape_scale reaches Newton-Muon: a tall matrix's step is max(1, rows/cols)^0.5 msign(...), to 1e-10."""
    grams, gs, p0 = newton_muon_case(seed=4)
    a = run_feature_gram(lambda ps, layers: t.NewtonMuon(ps, layers, lr=0.02, momentum=0.9, shape_scale=True),
                         grams, gs, p0)
    assert worst_step_error(a, run_reference(lambda: RefNewtonMuon(momentum=0.9, shape_scale=True), grams, gs, p0),
                            p0) < 1e-10
    assert worst_step_error(a, run_reference(lambda: RefNewtonMuon(momentum=0.9), grams, gs, p0), p0) > 0.2
    tiny = ["--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--vocab_size", "100", "--optimizer", "newton_muon"]
    for flag in (False, True):
        args = t.parse_args(tiny + ["--muon_shape_scale", str(int(flag))])
        assert t.build_optimizers(t.GPT(args), args)[-1].param_groups[0]["shape_scale"] is flag


def test_polar_express_coefficients_are_the_papers_with_its_safety_factor():
    """The paper's code (Amsel et al. 2025) lists 8 polynomials and divides each but the list's last by its safety
    factor, (a, b, c) -> (a / 1.01, b / 1.01^3, c / 1.01^5); a 5-step run uses the first 5, all divided, and
    normalizes by 1.01 ||G||_F."""
    paper = [(8.28721201814563, -23.595886519098837, 17.300387312530933),
             (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
             (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
             (3.3184196573706015, -2.488488024314874, 0.51004894012372),
             (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
             (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
             (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
             (1.875, -1.25, 0.375)]
    used = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in paper[:-1]] + paper[-1:]
    steps, f = t.NS_COEFFS["polar_express"]
    assert f == 1.01 and len(steps) == 5
    for got, want in zip(steps, used[:5]):
        assert got == pytest.approx(want, rel=1e-15, abs=0)

# ----------------------------------------------------------------------------- LocoProp-S K inner steps


def init_like_spectrum(d: int, knots: list[tuple[float, float]]) -> torch.Tensor:
    """d eigenvalues, log-linear between (quantile, eigenvalue) knots measured on the 768-wide model's C at init
    (2 layers, 2048 tokens of data/sample): the same spread at a small width."""
    q = torch.linspace(0, 1, d, dtype=torch.float64)
    kq = torch.tensor([k for k, _ in knots], dtype=torch.float64)
    kl = torch.tensor([l for _, l in knots], dtype=torch.float64).log()
    i = torch.searchsorted(kq, q, right=True).clamp(1, len(knots) - 1)
    w = (q - kq[i - 1]) / (kq[i] - kq[i - 1])
    return (kl[i - 1] + w * (kl[i] - kl[i - 1])).exp()


# quantiles 0, 1/4, 1/2, 3/4, 0.99, 1 of the eigenvalues of C at init (768 wide): c_fc's input (tr/d 1.0, lambda_max
# 147), c_attn's (tr/d 1.0, 30) and attention c_proj's (tr/d 0.011, 1.85)
C_FC = [(0, 0.0114), (0.25, 0.0839), (0.5, 0.241), (0.75, 0.613), (0.99, 13.5), (1, 146.6)]
C_ATTN = [(0, 0.00308), (0.25, 0.121), (0.5, 0.409), (0.75, 1.036), (0.99, 10.4), (1, 30.1)]
ATTN_PROJ = [(0, 3e-5), (0.25, 1.6e-4), (0.5, 4.5e-4), (0.75, 1.56e-3), (0.99, 0.269), (1, 1.853)]


def init_like_c(knots, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    return (Q * init_like_spectrum(d, knots)) @ Q.T


def locoprop_direction(C: torch.Tensor, G: torch.Tensor, steps: int, **kw) -> torch.Tensor:
    """One LocoPropS step (eta = 1, refreshed with C) from W0 = 0: the direction -G P."""
    return run_feature_gram(lambda ps, layers: t.LocoPropS(ps, layers, lr=1.0, steps=steps, **kw),
                            {0: [C]}, [[G]], [torch.zeros_like(G)])[0][0]


@pytest.mark.parametrize("knots", [C_FC, C_ATTN], ids=["c_fc", "c_attn"])
def test_locoprop_k_steps_converge_to_the_exact_minimizer(knots):
    """On C with the spread of the 768-wide model's at init (lambda = 1, nu = 1): the K-step direction's error
    against the exact -G A^-1 falls monotonically with K = 1, 2, ..., 10 (on every eigenvector of A the error factor
    is (1 - nu a_i / L)^K in [0, 1)), and K = 5000 is the minimizer to 1e-6; with the step nu not scaled by 1/L
    (nu = 0.5, as before) the error at K = 10 exceeds 1e6."""
    C = init_like_c(knots)
    G = gaussians([(8, 64)], 1, seed=5)[0][0] @ C  # a gradient dY^T X lies in X's row space: G = H C
    exact = -G @ torch.linalg.inv(damped(C, 1.0))
    errs = [((locoprop_direction(C, G, K) - exact).norm() / exact.norm()).item() for K in range(1, 11)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[0] < 1 and ((locoprop_direction(C, G, 5000) - exact).norm() / exact.norm()).item() < 1e-6
    B = torch.eye(64, dtype=C.dtype) - 0.5 * damped(C, 1.0)
    unscaled = -G @ (0.5 * sum(torch.linalg.matrix_power(B, j) for j in range(10)))
    assert ((unscaled - exact).norm() / exact.norm()).item() > 1e6


def test_locoprop_k_steps_close_at_k10_where_a_is_well_conditioned():
    """Attention c_proj's C at init (tr/d 0.011; lambda = 1: lambda_max(A) / lambda_min(A) = 2.85): K = 10 steps of
    nu = 1 are within 2% of the exact minimizer, K = 1, 3, 10 each closer."""
    C = init_like_c(ATTN_PROJ)
    G = gaussians([(8, 64)], 1, seed=6)[0][0] @ C
    exact = -G @ torch.linalg.inv(damped(C, 1.0))
    errs = [((locoprop_direction(C, G, K) - exact).norm() / exact.norm()).item() for K in (1, 3, 10)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.02, errs


def schatten16(C: torch.Tensor) -> float:
    """(sum_i l_i^16)^(1/16) over the eigenvalues of C, by eigvalsh."""
    return (torch.linalg.eigvalsh(C).clamp(min=0) ** 16).sum().item() ** (1 / 16)


def test_eigenvalue_bound():
    """full: the Schatten 16-norm of C's eigenvalues (>= lambda_max, within d^(1/16)); block: the largest of its
    blocks'; diag: the largest entry; on the init-like C within 1% of lambda_max."""
    Cs = torch.stack([init_like_c(C_FC), init_like_c(C_ATTN, seed=1), torch.eye(64, dtype=torch.float64)])
    L = t.eigenvalue_bound(Cs, "full")
    for C, l in zip(Cs, L):
        lmax = torch.linalg.eigvalsh(C).max().item()
        assert l.item() == pytest.approx(schatten16(C), rel=1e-10)
        assert lmax * (1 - 1e-12) <= l.item() <= 64 ** (1 / 16) * lmax  # >= up to float64 rounding
    assert L[0] / torch.linalg.eigvalsh(Cs[0]).max() < 1.01 and L[1] / torch.linalg.eigvalsh(Cs[1]).max() < 1.01
    blocks = torch.stack([as_mode(C, "block", 16) for C in Cs])
    want = [max(schatten16(b) for b in bs) for bs in blocks]
    torch.testing.assert_close(t.eigenvalue_bound(blocks, "block"), torch.tensor(want, dtype=torch.float64))
    diags = torch.stack([torch.diagonal(C) for C in Cs])
    assert torch.equal(t.eigenvalue_bound(diags, "diag"), diags.amax(-1))


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
@pytest.mark.parametrize("lambda_mode", ["absolute", "relative"])
def test_locoprop_k_step_rule(mode, lambda_mode):
    """K = 3 inner steps with momentum 0.9 over 6 steps across a refresh, in every gram mode: P = s sum_{j<3} (I - s A)^j
    with s = nu / L, L = lambda_max bound + lam (the Schatten 16-norm of the (block-)diagonal C's eigenvalues, or its
    largest entry for diag), to 1e-10; an absolute step nu is off by > 0.1."""
    grams, gs, p0 = locoprop_case(seed=2)
    grams = {k: [as_mode(30 * C, mode) for C in Cs] for k, Cs in grams.items()}  # lambda_max(C) ~ 3: nu A > 2 possible
    kw = dict(lr=0.3, lam=0.5, momentum=0.9, lambda_mode=lambda_mode, steps=3)

    class Ref(RefLocoProp):
        def refresh(self, C):  # C dense; the bound from its (block-)diagonal structure, as the mode has it
            blocks = [C[i:i + 4, i:i + 4] for i in range(0, C.size(0), 4)] if mode == "block" else [C]
            L = C.diagonal().max().item() if mode == "diag" else max(schatten16(b) for b in blocks)
            lam = self.lam * (torch.trace(C).item() / C.size(0) if self.mode == "relative" else 1.0)
            self.nu = self.scale / (L + lam)
            super().refresh(C)

    def make_ref(scale=1.0):
        r = Ref(nu=0.0, **kw)
        r.scale = scale
        return r

    dense_grams = {k: [dense(C, mode) for C in Cs] for k, Cs in grams.items()}
    a = run_feature_gram(lambda ps, layers: t.LocoPropS(ps, layers, gram=mode, nu=1.0, **kw), grams, gs, p0)
    assert worst_step_error(a, run_reference(make_ref, dense_grams, gs, p0), p0) < 1e-10
    absolute = run_reference(lambda: RefLocoProp(nu=1.0, **kw), dense_grams, gs, p0)
    assert worst_step_error(a, absolute, p0) > 0.1

# ----------------------------------------------------------------------------- Cholesky fallbacks


@pytest.mark.parametrize("mode", ["full", "block"])
def test_cholesky_fallbacks_are_counted_by_the_damping_that_held(mode):
    """Three C's (lam = 0.1): one positive definite, one with eigenvalue -0.5 (C + lam I fails, C + 10 lam I holds),
    one with -5 (holds at 100 lam); in block mode the bad eigenvalue sits in one of two blocks. After the refresh:
    fallbacks {10: 1, 100: 1, 1000: 0} (a matrix counted once), the factors (C + boost lam I)^-1, the first exact."""
    eye = torch.eye(8, dtype=torch.float64)
    Cs = [eye, torch.diag(torch.tensor([1.0] * 7 + [-0.5], dtype=torch.float64)),
          torch.diag(torch.tensor([1.0] * 7 + [-5.0], dtype=torch.float64))]
    ps = [torch.nn.Parameter(torch.zeros(3, 8, dtype=torch.float64)) for _ in Cs]
    grams = {0: [as_mode(C, mode) for C in Cs]}
    opt = []
    run_feature_gram(lambda qs, layers: opt.append(t.LocoPropS(qs, layers, lam=0.1, gram=mode)) or opt[0],
                     grams, [[torch.zeros_like(p) for p in ps]], [p.detach() for p in ps])
    assert opt[0].fallbacks == {10: 1, 100: 1, 1000: 0}
    for p, C, boost in zip(t.optimizer_params(opt[0]), Cs, (1, 10, 100)):
        R = opt[0].state[p]["factor"]
        want = torch.linalg.inv(dense(as_mode(C, mode), mode) + 0.1 * eye * (boost if mode == "full" else 1))
        if mode == "block":  # only the failing block is refactored with more damping
            want[4:, 4:] = torch.linalg.inv(C[4:, 4:] + 0.1 * boost * torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(dense(R, mode), want)
    opt[0].refresh_gram(n_tokens=N_TOKENS)  # a refresh starts the count afresh
    assert opt[0].fallbacks == {10: 0, 100: 0, 1000: 0} and opt[0]._pending


def test_locoprop_gram_beta_over_several_refreshes():
    """gram_beta = 0.6 over 4 refreshes (steps 0, 2, 4, 6), momentum 0.9: C is the EMA of the refreshed C's, to
    1e-10; replacing C at each refresh (beta = 0), or keeping the first, is off by > 0.05."""
    grams, gs, p0 = locoprop_case(seed=3, steps=8, refresh_at=(0, 2, 4, 6))
    kw = dict(lr=0.3, lam=0.05, momentum=0.9)
    a = run_feature_gram(lambda ps, layers: t.LocoPropS(ps, layers, gram_beta=0.6, **kw), grams, gs, p0)
    assert worst_step_error(a, run_reference(lambda: RefLocoProp(gram_beta=0.6, **kw), grams, gs, p0), p0) < 1e-10
    assert worst_step_error(a, run_reference(lambda: RefLocoProp(**kw), grams, gs, p0), p0) > 0.05
    frozen = {0: grams[0]}
    assert worst_step_error(a, run_reference(lambda: RefLocoProp(**kw), frozen, gs, p0), p0) > 0.05


def test_gram_phase_range_follows_gram_every():
    """gram_phase may be any of 0 ... gram_every - 1: 31 with gram_every 32 (the paper's 1 too), not 32."""
    for phase in ("1", "31"):
        t.check_optimizer_args(t.parse_args(["--gram_every", "32", "--gram_phase", phase]))
    with pytest.raises(SystemExit, match=r"^--gram_phase: must be in \[0, 32\)"):
        t.check_optimizer_args(t.parse_args(["--gram_every", "32", "--gram_phase", "32"]))


def test_the_papers_choices_are_off_by_default():
    """gram_phase 0, gram_start 0, gram_ridge matrix, gram_damping_eps 0: the refresh at steps 0, E, 2E, ..., C the
    first C_new, gamma = delta tr(C)/d per matrix (the project's rule before these settings existed)."""
    a = t.parse_args([])
    assert (a.gram_phase, a.gram_start, a.gram_ridge, a.gram_damping_eps) == (0, 0.0, "matrix", 0.0)


@pytest.mark.parametrize("mode", ["full", "block", "diag"])
def test_gram_start_is_the_first_refreshes_ema_start(mode):
    """gram_start s, gram_beta b: the first refresh keeps C = b s I + (1 - b) C_new in the mode's layout (s I per
    block, a vector of s for diag), the second b C + (1 - b) C_new; s = 0 keeps C_new itself."""
    d, b, s = 8, 0.9, 0.01
    C1, C2 = (as_mode(spd(d, seed), mode) for seed in (1, 2))
    eye = as_mode(torch.eye(d, dtype=torch.float64), mode)
    for start, want1 in ((s, b * s * eye + (1 - b) * C1), (0.0, C1)):
        p = torch.nn.Parameter(torch.zeros(4, d, dtype=torch.float64))
        layer = torch.nn.Module()
        layer.weight = p
        opt = t.NewtonMuon([p], [layer], gram=mode, gram_block=4, gram_beta=b, gram_start=start)
        layer.gram = C1 * N_TOKENS
        opt.refresh_gram(n_tokens=N_TOKENS)
        torch.testing.assert_close(opt.state[p]["gram"], want1, rtol=1e-14, atol=1e-16)
        layer.gram = C2 * N_TOKENS
        opt.refresh_gram(n_tokens=N_TOKENS)
        torch.testing.assert_close(opt.state[p]["gram"], b * want1 + (1 - b) * C2, rtol=1e-14, atol=1e-16)


def test_gram_ridge_block_damps_each_block_by_its_own_trace():
    """gram block: gram_ridge block gives block k its own gamma_k = delta tr(C_k)/b + eps, so R's block k is
    (C_k + gamma_k I)^-1; gram_ridge matrix one gamma = delta tr(C)/d + eps for all blocks (here the blocks' traces
    differ 1000-fold, so the two differ)."""
    d, blk, delta, eps = 12, 4, 0.2, 1e-3
    C = torch.stack([spd(blk, k) * 10.0 ** (-k) for k in range(d // blk)])
    traces = C.diagonal(dim1=-2, dim2=-1).sum(-1)
    for ridge, gammas in (("block", delta * traces / blk + eps), ("matrix", delta * traces.sum() / d + eps
                                                                   + torch.zeros(d // blk, dtype=torch.float64))):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.zeros(3, d, dtype=torch.float64))
        opt = t.NewtonMuon([layer.weight], [layer], gram="block", gram_block=blk, ridge=ridge, damping=delta,
                           damping_eps=eps)
        group = opt.param_groups[0]
        R = opt.factor(C[None], group)[0]
        want = torch.stack([torch.linalg.inv(Ck + g * torch.eye(blk, dtype=torch.float64))
                            for Ck, g in zip(C, gammas)])
        torch.testing.assert_close(R, want, rtol=1e-10, atol=0)
