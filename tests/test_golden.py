"""The project's Muon, SOAP, PolarGrad and Newton-Muon against figures their originals produced
(tests/golden/*.json, made by tests/golden/make_golden.py from modded-nanogpt b9979e6, the SOAP
fork's soap.py, NVIDIA Emerging-Optimizers, the optimization track's train_gpt_simple.py
(track3_muon) and the Newton-Muon paper's code, in float64 on CPU): the same gradient stream
gives the same parameters after every step, to 1e-10 (the track's Muon: to TRACK3_TOLERANCE;
Newton-Muon: 1e-12, with its settings set to the paper's); a changed rule (a Newton-Schulz
coefficient, a beta, the refresh's sort, the nuclear norm, one of Newton-Muon's choices) misses
them by far more."""
import json
from pathlib import Path

import pytest
import torch

import train_gpt2 as t

GOLDEN = Path(__file__).resolve().parent / "golden"
TOLERANCE = 1e-10
# the track's Muon in float64: 2.2e-16 measured (the same arithmetic but for the order of
# Newton-Schulz's products); its momentum's lerp form, which differs from buf = m buf + G only
# through Newton-Schulz's 1e-7, is told apart (9.8e-9)
TRACK3_TOLERANCE = 2e-15


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def make(name: str, params: list[torch.Tensor], s: dict):
    """The project's optimizer for a golden file's settings (betas as the project takes them: a tuple)."""
    if name == "muon":
        return t.Muon(params, lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"], coeffs="simple")
    if name == "track3_muon":  # the track3 preset's Muon
        a = t.parse_args(["--preset", "track3"])
        return t.Muon(params, lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                      coeffs=a.ns_coeffs, shape_scale=s.get("shape_scale", a.muon_shape_scale),
                      lerp=s.get("lerp", a.muon_lerp), weight_decay=s["weight_decay"])
    if name == "soap":
        return t.SOAP(params, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"], weight_decay=s["weight_decay"],
                      precondition_frequency=s["precondition_frequency"])
    return t.PolarGrad(params, lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"],
                       weight_decay=s["weight_decay"], nuclear="inner", coeffs=s["ns_coeffs"])


def project_error(name: str, monkeypatch, settings: dict | None = None) -> float:
    """max |project - original| over every parameter after every step of the golden stream. Newton-Schulz runs in
    float64 (NS_DTYPE), as the originals did for these figures; SOAP adopts the original's first-step bases."""
    data = golden(name)
    monkeypatch.setattr(t, "NS_DTYPE", torch.float64)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in data["init"]]
    opt = make(name, params, dict(data["settings"], **(settings or {})))
    worst = 0.0
    for step, (grads, want) in enumerate(zip(data["grads"], data["params"])):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        if name == "soap" and step == 0:
            for p, (QL, QR) in zip(params, data["first_bases"]):
                opt.state[p]["QL"].copy_(torch.tensor(QL, dtype=torch.float64))
                opt.state[p]["QR"].copy_(torch.tensor(QR, dtype=torch.float64))
        for p, w in zip(params, want):
            worst = max(worst, (p.detach() - torch.tensor(w, dtype=torch.float64)).abs().max().item())
    return worst


@pytest.mark.parametrize("name", ["muon", "soap", "polargrad", "track3_muon"])
def test_golden_figures_have_provenance(name):
    """Each file names the original's repository, commit, files and hashes, what was changed to run it in float64,
    and holds a stream that moves the parameters (so equality is not trivial) across SOAP's refreshes."""
    data = golden(name)
    files = data["provenance"]["files"]
    assert files and all(len(f["commit"]) == 40 and len(f["sha256"]) == 64 for f in files)
    assert data["provenance"]["changed"] and all(f["why"] for f in data["provenance"]["changed"])
    moved = max(abs(a - b) for p0, p1 in zip(data["init"], data["params"][-1])
                for a, b in zip(torch.tensor(p0).flatten().tolist(), torch.tensor(p1).flatten().tolist()))
    assert moved > 0.01
    if name == "soap":
        assert len(data["params"]) - 1 >= 2 * data["settings"]["precondition_frequency"]  # two refreshes or more


@pytest.mark.parametrize("name", ["muon", "soap", "polargrad"])
def test_project_equals_the_original(name, monkeypatch):
    assert project_error(name, monkeypatch) <= TOLERANCE


def test_track3_muon_equals_the_original(monkeypatch):
    """The track3 preset's Muon (lerp momentum, Nesterov, 12 convergent Newton-Schulz steps, shape
    scale, weight decay) against train_gpt_simple.py's Muon on the golden stream, in float64; its
    settings are the preset's."""
    a, s = t.parse_args(["--preset", "track3"]), golden("track3_muon")["settings"]
    assert (a.muon_lr, a.muon_weight_decay, a.muon_momentum, a.muon_nesterov) == (
        s["lr"], s["weight_decay"], s["momentum"], s["nesterov"])
    assert project_error("track3_muon", monkeypatch) <= TRACK3_TOLERANCE


MUTATIONS = {
    "muon: Newton-Schulz c 2.0315 -> 2.0316": ("muon", lambda m: m.setitem(t.NS_COEFFS, "simple",
                                                                           ([(3.4445, -4.7750, 2.0316)] * 5, 1.0)), {}),
    "muon: momentum 0.95 -> 0.9": ("muon", None, {"momentum": 0.9}),
    "muon: no Nesterov": ("muon", None, {"nesterov": False}),
    "soap: beta2 0.95 -> 0.951": ("soap", None, {"betas": [0.95, 0.951]}),
    "soap: refresh without the sort": ("soap", lambda m: m.setattr(t, "power_step", lambda P, Q: (
        P @ Q, torch.arange(Q.size(-1)).expand(Q.shape[:-1]))), {}),
    "soap: no weight decay": ("soap", None, {"weight_decay": 0.0}),
    "polargrad: exact nuclear norm for <O, D>": ("polargrad", lambda m: m.setattr(
        t, "nuclear_norm", lambda M, mode="exact", O=None: t.torch.linalg.matrix_norm(M, "nuc")), {}),
    "polargrad: quintic a 4.0848 -> 4.0849": ("polargrad", lambda m: m.setitem(t.NS_COEFFS, "quintic", (
        [(4.0849, -6.8946, 2.9270)] + t.NS_COEFFS["quintic"][0][1:], 1.0)), {}),
    "polargrad: momentum 0.95 -> 0.9": ("polargrad", None, {"momentum": 0.9}),
    "track3_muon: no weight decay": ("track3_muon", None, {"weight_decay": 0.0}),
    "track3_muon: buf = m buf + G, not the lerp form": ("track3_muon", None, {"lerp": False}),
    "track3_muon: 11 Newton-Schulz steps": ("track3_muon", lambda m: m.setitem(
        t.NS_COEFFS, "convergent", ([(2.0, -1.5, 0.5)] * 11, 1.0)), {}),
    "track3_muon: no Nesterov": ("track3_muon", None, {"nesterov": False}),
    "track3_muon: no max(1, rows/cols)^0.5": ("track3_muon", None, {"shape_scale": False}),
}


@pytest.mark.parametrize("case", list(MUTATIONS))
def test_a_changed_rule_misses_the_golden_figures(case, monkeypatch):
    """Each change of the rule puts the project at least 1e4 x the tolerance away from the original's figures."""
    name, mutate, settings = MUTATIONS[case]
    if mutate is not None:
        mutate(monkeypatch)
    tolerance = TRACK3_TOLERANCE if name == "track3_muon" else TOLERANCE
    assert project_error(name, monkeypatch, settings) > 1e4 * tolerance


# Newton-Muon: the paper's code (zhehangdu/Newton-Muon, train_gpt_newton_muon_1.py's Muon class) as the project's
# settings express it (tests/golden/newton_muon.json's provenance note); qkv is three d x d matrices sharing C
NEWTON_MUON = dict(precondition="before", gram="block", gram_every=32, gram_phase=1, gram_beta=0.95,
                   gram_start=0.001, ridge="block", damping=0.2, damping_eps=1e-8, coeffs="simple",
                   shape_scale=False, momentum=0.95, nesterov=True)
NEWTON_MUON_TOLERANCE = 1e-12


def newton_muon_error(monkeypatch, settings: dict | None = None) -> float:
    """max |project - original| over every parameter at every kept step of the golden stream: two NewtonMuon's (lr
    0.02 sqrt(max(rows, cols)): q, k, v and o at sqrt(d), c_fc and c_proj at sqrt(4d)), each refreshing C from the
    stream's C_new before the steps its gram_every and gram_phase name, as the training loop does."""
    data = golden("newton_muon")
    monkeypatch.setattr(t, "NS_DTYPE", torch.float64)
    s, d = data["settings"], data["settings"]["d"]
    kw = dict(NEWTON_MUON, gram_block=d, **(settings or {}))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)
    qkv, o, fc, proj = (as_tensor(p) for p in data["init"])
    params = [torch.nn.Parameter(x.clone()) for x in (*qkv.split(d), o, fc, proj)]
    layers = [torch.nn.Module() for _ in params]
    for m, p in zip(layers, params):
        m.weight = p
    opts = [t.NewtonMuon(params[:4], layers[:4], lr=s["lr"] * d**0.5, **kw),
            t.NewtonMuon(params[4:], layers[4:], lr=s["lr"] * (4 * d) ** 0.5, **kw)]
    kinds = ["qkv", "qkv", "qkv", "o", "c_fc", "c_proj"]
    grams = dict(zip(data["refreshes"], data["grams"]))
    worst, kept = 0.0, dict(zip(data["kept_steps"], data["params"]))
    for k, grads in enumerate(data["grads"]):
        if (k + kw["gram_phase"]) % kw["gram_every"] == 0:
            C = grams.get(k, grams[data["refreshes"][0]])  # a refresh the original has not: some C_new
            for m, kind in zip(layers, kinds):
                m.gram = as_tensor(C[kind]).reshape(-1, d, d)
            for opt in opts:
                opt.refresh_gram(n_tokens=1)
        g_qkv, g_o, g_fc, g_proj = (as_tensor(g) for g in grads)
        for p, g in zip(params, (*g_qkv.split(d), g_o, g_fc, g_proj)):
            p.grad = g
        for opt in opts:
            opt.step()
        if k in kept:
            ours = [torch.cat([p.detach() for p in params[:3]]), *(p.detach() for p in params[3:])]
            for p, w in zip(ours, kept[k]):
                worst = max(worst, (p - as_tensor(w)).abs().max().item())
    return worst


def test_newton_muon_golden_has_provenance_and_moves():
    """The file names the paper's repository, commit, files and hashes, what was changed or shimmed and which part of
    the file ran; its stream refreshes C three times and moves every parameter."""
    data = golden("newton_muon")
    prov = data["provenance"]
    assert [f["repo"] for f in prov["files"]] == ["zhehangdu/Newton-Muon"] * 2
    assert all(len(f["commit"]) == 40 and len(f["sha256"]) == 64 for f in prov["files"])
    assert prov["changed"] and all(f["why"] for f in prov["changed"]) and prov["shims"] and prov["excerpt"]["runs"]
    assert data["refreshes"] == [31, 63, 95] and data["kept_steps"][-1] == 95
    moved = [(as_t(p1) - as_t(p0)).abs().max().item() for p0, p1 in zip(data["init"], data["params"][-1])
             for as_t in [lambda x: torch.tensor(x, dtype=torch.float64)]]
    assert min(moved) > 0.1


def test_newton_muon_equals_the_papers_code(monkeypatch):
    assert newton_muon_error(monkeypatch) <= NEWTON_MUON_TOLERANCE


NEWTON_MUON_MUTATIONS = {
    "C without its start 0.001 I": dict(gram_start=0.0),
    "C's EMA weight 0.95 -> 0.9": dict(gram_beta=0.9),
    "refresh phase 1 -> 0 (steps 0, 32, 64)": dict(gram_phase=0),
    "one ridge per matrix, not per block": dict(ridge="matrix"),
    "no 1e-8 in the ridge": dict(damping_eps=0.0),
    "ridge 0.2 -> 0.21": dict(damping=0.21),
    "R applied after the momentum": dict(precondition="after"),
}


@pytest.mark.parametrize("case", list(NEWTON_MUON_MUTATIONS))
def test_newton_muon_without_one_of_the_papers_choices_misses_it(case, monkeypatch):
    """Each of the paper's choices the project matches by a setting matters: without it the project is at least
    1e4 x the tolerance away from the paper's figures."""
    assert newton_muon_error(monkeypatch, NEWTON_MUON_MUTATIONS[case]) > 1e4 * NEWTON_MUON_TOLERANCE
