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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    """A = C + lam I (absolute) or C + lam tr(C)/d I (relative); P = A^-1 (K = 0) or nu sum_{j<K} (I - nu A)^j;
    P = I before the first refresh; M = mu M + G (heavy ball; M = G without momentum); p -= eta M P."""

    def __init__(self, lr=0.3, lam=1.0, lambda_mode="absolute", momentum=0.0, steps=0, nu=0.5):
        self.lr, self.lam, self.mode, self.mu, self.K, self.nu = lr, lam, lambda_mode, momentum, steps, nu
        self.M, self.P = 0.0, None

    def refresh(self, C):
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


@pytest.mark.parametrize("setting,value,allowed", [
    ("newton_muon_precondition", "inside", "before or after"),
    ("locoprop_lambda_mode", "scaled", "absolute or relative"),
])
def test_choice_settings_refuse_unknown_values(setting, value, allowed):
    with pytest.raises(SystemExit, match=f"^--{setting}: must be {allowed}, got '{value}'$"):
        t.check_optimizer_args(t.parse_args([f"--{setting}", value]))


def test_choice_settings_reach_the_optimizers():
    tiny = ["--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--vocab_size", "100"]
    defaults = t.parse_args([])
    assert (defaults.newton_muon_precondition, defaults.locoprop_lambda_mode) == ("before", "absolute")
    for optimizer, setting, key, value in (("newton_muon", "newton_muon_precondition", "precondition", "after"),
                                           ("locoprop", "locoprop_lambda_mode", "lambda_mode", "relative")):
        args = t.parse_args(tiny + ["--optimizer", optimizer, f"--{setting}", value])
        t.check_optimizer_args(args)
        assert t.build_optimizers(t.GPT(args), args)[-1].param_groups[0][key] == value
