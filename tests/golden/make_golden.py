"""Make the golden figures of tests/test_golden.py from the original optimizers' own code, once:

    python tests/golden/make_golden.py [--originals .originals]

The originals are the user's copies (git-ignored, never committed), under --originals:
    modded-nanogpt/train_gpt2.py                  KellerJordan/modded-nanogpt at b9979e6 (Muon: OrthogonalNesterov
                                                  and zeroth_power_via_newtonschulz5)
    modded-nanogpt-SOAP/soap.py                   nikhilvyas/modded-nanogpt-SOAP at 618af27 (SOAP)
    Emerging-Optimizers/emerging_optimizers/      NVIDIA-NeMo/Emerging-Optimizers at fd77292 (PolarGrad)
    modded-nanogpt-track3/train_gpt_simple.py     KellerJordan/modded-nanogpt at f411b3d, records/
                                                  track_3_optimization/train_gpt_simple.py (the
                                                  optimization track: Muon, model, schedule)
    Newton-Muon/train_gpt_newton_muon_1.py        zhehangdu/Newton-Muon at df78af0 (Newton-Muon: its Muon class,
    Newton-Muon/triton_kernels.py                 the preconditioner on the GPT-2 124M run of the paper)
Each file must be the version named in ORIGINALS (its sha256 is checked). Each original optimizer runs in float64 on
CPU on one fixed gradient stream (stream(): seeded normal parameters and gradients of a few shapes, wide, tall and
square); what had to change in its code to run so is only the dtype, listed per file in PATCHES and in the data's
provenance. Writes tests/golden/<name>.json: provenance, settings, shapes, the initial parameters, the gradients and
the parameters after every step (and for SOAP the bases of its first step, which the project's run adopts: on the
null space of a rank-deficient first L or R the eigenbasis is arbitrary in both codes).
From train_gpt_simple.py also (its code above the Setup banner: the classes, loaded without CUDA or
torchrun): track3_model.json, the summed loss and each parameter's gradient norm of its GPT in fp32
for weights and tokens made by track3_weights / track3_tokens (splitmix64, no RNG: the test makes
the same ones); track3_schedule.json, the lr factor set_hparams gives at every step and the steps
its loop validates at, for 3250 and 400 steps (the function and the loop's two statements taken
from its source by ast).
Newton-Muon runs on its own
stream (newton_muon_stream(): the four block matrices of a model of width 3, gradients and, on the original's
refresh steps, each layer's input Gram C_new) for 96 steps (3 refreshes of C, every 32 steps), its parameters kept
after every 4th step.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHAPES = [(4, 6), (6, 4), (5, 5), (4, 6)]  # wide, tall, square, and a second wide one (the project batches by shape)
SEED = 20241004

# what each original's step is run with (the project's test builds its optimizer with the same values)
SETTINGS = {
    "muon": dict(steps=5, lr=0.02, momentum=0.95, nesterov=True),
    "soap": dict(steps=8, lr=0.01, betas=[0.95, 0.95], eps=1e-8, weight_decay=0.01, precondition_frequency=3),
    # gradients ~1e3 (Frobenius norms ~5e3), lr 2e-5: steps of the size lr 0.02 takes on unit gradients. The project
    # normalizes D by ||D||_F + 1e-7 (as modded-nanogpt), NVIDIA by max(||D||_F, 1e-15): a relative 1e-7 / ||D||_F
    # in O, which moves the parameters by ~1.7e-6 lr for these shapes whatever the gradients' scale (1.7e-8 at lr
    # 0.01 on unit gradients, and 9e-16 with NVIDIA's normalization put in); at this scale it is ~3e-11
    "polargrad": dict(steps=5, lr=2e-5, momentum=0.95, nesterov=False, weight_decay=0.01, ns_coeffs="quintic",
                      grad_scale=1000.0),
    # the track's Muon(lr=0.025, weight_decay=0.05), its mu default 0.95, Nesterov
    # (grad_spread: singular values over ~1e5, so the 12th step and the momentum's lerp form,
    # which reaches the update only through Newton-Schulz's 1e-7, still matter)
    "track3_muon": dict(steps=5, lr=0.025, weight_decay=0.05, momentum=0.95, nesterov=True,
                        grad_spread=5.0),
    # its GPT at a small size (model_dim a multiple of its head_dim 128), batch x sequence tokens
    "track3_model": dict(vocab_size=512, num_layers=2, model_dim=256, batch=2, sequence=64),
    "track3_schedule": dict(num_iterations=[3250, 400]),
    # the original's constructor defaults (precond_*) and its fixed schedule (refresh when (step + 1) % 32 == 0, C an
    # EMA with weight 0.95), at lr 0.02; its step is lr sqrt(max(rows, cols)) msign (sqrt(d) for each third of qkv)
    "newton_muon": dict(steps=96, lr=0.02, momentum=0.95, nesterov=True, backend_steps=5, precond_init_diag=0.001,
                        precond_ridge_mult=0.2, precond_eps=1e-8, refresh_every=32, ewma=0.95, d=3, tokens=8,
                        keep_every=4),
}

# repo, commit, path under --originals, path in the repo, sha256 of the copy these figures were made from
ORIGINALS = {
    "muon": [("KellerJordan/modded-nanogpt", "b9979e6df16c7e18c3bb4da0070ad88bae530de4",
              "modded-nanogpt/train_gpt2.py", "train_gpt2.py",
              "02b9a5723e63af85ccb41fae9925fd2e43b823837ff882e058607bf1a8a3b569")],
    "soap": [("nikhilvyas/modded-nanogpt-SOAP", "618af27156c1875ef028882f543bb1be04485eb2",
              "modded-nanogpt-SOAP/soap.py", "soap.py",
              "0057aeb7e20872787989c26fc66589d91c9782149435d2bfda0b9e9972e01ff3")],
    "polargrad": [("NVIDIA-NeMo/Emerging-Optimizers", "fd7729267109a8848709e9406bf19e53e970c3f4",
                   f"Emerging-Optimizers/emerging_optimizers/{p}", f"emerging_optimizers/{p}", sha) for p, sha in [
                       ("orthogonalized_optimizers/polargrad.py",
                        "3e0953de29e9a0f6cb901fbc0975019bdc66127eccbdbbef168a6a3154c615f8"),
                       ("orthogonalized_optimizers/orthogonalized_optimizer.py",
                        "96bc80d7075752ff14672d8e5460cfcb31d28b2faba6b25f7b8ce691255aff5c"),
                       ("orthogonalized_optimizers/muon_utils.py",
                        "c098769ecbf2f1dccba562863f388c8f24401d6fe76b64bd9653d7cc80714f50"),
                       ("mixin.py", "7453acd6013dec97b1cc160e486cb7e884d1d792f1db774e8b7cc659585d15cc")]],
    "newton_muon": [("zhehangdu/Newton-Muon", "df78af0db523d8bceb25af4919a3e3e7082b80f3", f"Newton-Muon/{p}", p, sha)
                    for p, sha in [
                        ("train_gpt_newton_muon_1.py",
                         "48383e333334e4f29bbae3365ac4142226c27750ede5739ab53c0dafbbcb7730"),
                        ("triton_kernels.py", "b51ac50c699b05306619d92cb9ec6edadd266d8118c53f5b9726db76480ea16d")]],
}

RULE = "# " + "-" * 77
# the part of a file that runs (start marker, end marker): the rest of it trains a model on CUDA at import
EXCERPTS = {
    "newton_muon": ("Newton-Muon/train_gpt_newton_muon_1.py",
                    RULE + "\n# Custom operators", RULE + "\n# Muon optimizer", RULE + "\n# PyTorch nn.Module",
                    "its imports and its Muon section (zeropower_via_newtonschulz5 and the Muon class), not the custom "
                    "ops that collect X^T X on CUDA (the stream gives C_new) nor the training script"),
}
TRACK3_FILE = "modded-nanogpt-track3/train_gpt_simple.py"
for _name in ("track3_muon", "track3_model", "track3_schedule"):
    ORIGINALS[_name] = [("KellerJordan/modded-nanogpt", "f411b3d346aa52d3504324ca93c230fd84c6c07f",
                         TRACK3_FILE, "records/track_3_optimization/train_gpt_simple.py",
                         "d39470e5b0535baf9c6caf7dbcd15efa79d8eacc9badf6e7c45b536e8537deec")]

# (file under --originals, old text, new text, times it occurs): all dtype changes, nothing else
PATCHES = {
    "muon": [("modded-nanogpt/train_gpt2.py", "@torch.compile\ndef zeroth_power_via_newtonschulz5",
              "def zeroth_power_via_newtonschulz5", 1,
              "no torch.compile (Inductor on CPU; the same math eagerly)"),
             ("modded-nanogpt/train_gpt2.py", "X = G.bfloat16() / (G.norm() + eps)",
              "X = G.double() / (G.norm() + eps)", 1, "Newton-Schulz in float64, not bfloat16")],
    "track3_muon": [(TRACK3_FILE, "@torch.compile\ndef muon_update", "def muon_update", 1,
                     "no torch.compile (Inductor on CPU; the same math eagerly)"),
                    (TRACK3_FILE, "X = G.bfloat16()", "X = G.double()", 1,
                     "Newton-Schulz in float64, not bfloat16")],
    "soap": [("modded-nanogpt-SOAP/soap.py", ".float()", ".double()", 5,
              "eigh and the refresh's QR in float64, not float32"),
             ("modded-nanogpt-SOAP/soap.py", "torch.zeros(sh, sh, device=grad.device)",
              "torch.zeros(sh, sh, device=grad.device, dtype=grad.dtype)", 1, "L and R in the gradient's dtype")],
    "polargrad": [("Emerging-Optimizers/emerging_optimizers/orthogonalized_optimizers/muon_utils.py",
                   "if x.dtype != torch.float32:", "if x.dtype != torch.float64:", 1,
                   "newton_schulz takes float64 (it refuses anything but float32)"),
                  ("Emerging-Optimizers/emerging_optimizers/orthogonalized_optimizers/muon_utils.py",
                   "X = X.to(torch.float32)", "X = X.to(torch.float64)", 1, "and returns float64")],
    "newton_muon": [("Newton-Muon/train_gpt_newton_muon_1.py", "@torch.compile\ndef zeropower_via_newtonschulz5",
                     "def zeropower_via_newtonschulz5", 1, "no torch.compile (Inductor on CPU; the same math eagerly)"),
                    ("Newton-Muon/train_gpt_newton_muon_1.py", "X = G.bfloat16() / (G.norm() + eps)",
                     "X = G.double() / (G.norm() + eps)", 1, "Newton-Schulz in float64, not bfloat16"),
                    ("Newton-Muon/train_gpt_newton_muon_1.py", "dtype=torch.float32", "dtype=torch.float64", 11,
                     "C, its inverse and the gradient buffers in float64, not float32"),
                    ("Newton-Muon/train_gpt_newton_muon_1.py", 'torch.bmm(G, plan["inv_',
                     'G.copy_(torch.bmm(G, plan["inv_', 3,
                     "G <- G R out of place: torch.bmm(G, R, out=G) writes G while reading it, which gives wrong "
                     "products on CPU (pytorch/pytorch#87551, #85852; cuBLAS leaves aliased operands undefined)"),
                    ("Newton-Muon/train_gpt_newton_muon_1.py", '"], out=G)', '"]))', 3, "(the same three calls)")],
}
TRACK3_SHIM = ("only the code above its Setup banner is run (the rest needs CUDA and "
               "torchrun); torch.distributed replaced by one process (get_world_size 1, "
               "get_rank 0, all_gather a no-op: its own parameter); sys.argv[0] its own path while "
               "it loads (it reads its code from there for its log)")
SHIMS = {"track3_muon": TRACK3_SHIM, "track3_model": TRACK3_SHIM,
         "track3_schedule": "set_hparams and the first two statements of the training loop "
                            "(val_step_freq and the condition validating) taken from its source "
                            "by ast and run with train_steps set and one optimizer group of "
                            "initial_lr 1",
         "polargrad": "absl.logging replaced by no-op functions (absl-py not needed: logging only); "
                      "emerging_optimizers.registry replaced by a decorator that returns the class (its PEP 695 "
                      "syntax needs Python >= 3.12; name registration only); typing.override = identity on "
                      "Python < 3.12",
         "newton_muon": "triton_kernels replaced by torch: XXT(A, out) is out = A A^T, "
                        "ba_plus_cAA(A, alpha, beta, out) is out = alpha A A^T + beta A (the Triton kernels' math, "
                        "there accumulated in fp32); torch's "
                        "default dtype float64, so that the EMA weight (count > 0) * (1 - 0.95) is not rounded to "
                        "float32"}


NOTES = {
    "muon": "b9979e6's Muon is OrthogonalNesterov(lr, momentum=0.95, nesterov=True) with "
            "zeroth_power_via_newtonschulz5 (a, b, c) = (3.4445, -4.7750, 2.0315), 5 steps; the project's Muon with "
            "coeffs simple and NS_DTYPE float64",
    "soap": "the fork keeps m in the parameter space and projects it each step, the project keeps it in the eigenbasis "
            "and carries it over at a refresh: the same rule; the fork's refresh QR is Householder's, the project's "
            "CholeskyQR3 (equal up to column signs, to which SOAP is invariant); first_bases: the fork's eigh bases "
            "after step 1, which the project adopts (arbitrary on the null space of the rank-deficient first L or R)",
    "newton_muon": "the original's Muon class (train_gpt_newton_muon_1.py) on the block matrices of a model of width "
                   "d = 3: qkv (3d x d, its three thirds orthogonalized apart, each stepped lr sqrt(d)), o (d x d), "
                   "c_fc (4d x d), c_proj (d x 4d, C block-diagonal: 4 blocks of d x d, as accum_xtx_blocks4), each "
                   "step lr sqrt(max(rows, cols)) msign. Before step k with (k + 1) % 32 == 0 each layer's accum is "
                   "grams[r] (C_new, count 1). The project matches it with newton_muon_precondition before, gram "
                   "block, gram_block d, gram_phase 1, gram_every 32, gram_beta 0.95, gram_start 0.001, gram_ridge "
                   "block, gram_damping 0.2, gram_damping_eps 1e-8, coeffs simple, shape_scale off and lr "
                   "0.02 sqrt(max(rows, cols)) per matrix, qkv as three d x d matrices sharing C. Not compared: the "
                   "original's fallback on a failed Cholesky (it writes the identity into K[bad], a copy, so the "
                   "inverse of the failed factor stays; the project retries with 10x, 100x, 1000x gamma)",
    "polargrad": "NVIDIA's default coefficient set quintic (5 steps), the project's quintic with nuclear inner; the "
                 "project's polar_express differs from NVIDIA's (theirs rounded to 4 decimals, all 5 divided by 1.01, "
                 "no 1.01 on the norm) and is not compared. The project normalizes D by ||D||_F + 1e-7, NVIDIA by "
                 "max(||D||_F, 1e-15): ~1.7e-6 lr on the parameters for this stream (3e-11 here; 1.7e-8 at lr 0.01 "
                 "on unit gradients; 9e-16 with NVIDIA's normalization put into the project)",
    "track3_muon": "the track's Muon: momentum m.lerp_(g, 1 - mu), Nesterov g.lerp_(m, mu), "
                   "Newton-Schulz (2, -1.5, 0.5) x 12, scale max(1, rows/cols)^0.5, "
                   "p <- p (1 - lr wd) - lr update; the project's Muon with lerp, weight_decay, "
                   "coeffs convergent, shape_scale and NS_DTYPE float64",
    "track3_model": "its GPT with the embedding cast to fp32 (it makes it bf16, so every "
                    "activation would be bf16), on CPU; loss_sum: its forward (cross-entropy "
                    "summed over tokens); grad_norms: the Frobenius norm of each parameter's "
                    "gradient of that sum, by its parameter names",
    "track3_schedule": "lr: set_hparams(step)'s factor on initial_lr for step 0 .. N-1; "
                       "val_steps: the steps 0 .. N at which its loop validates",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_copies(root: Path, name: str) -> None:
    """Refuse a missing copy or one that is not the version ORIGINALS names (its sha256)."""
    for repo, commit, rel, _, want in ORIGINALS[name]:
        path = root / rel
        if not path.is_file():
            raise SystemExit(f"{path}: missing; put {repo} at commit {commit[:7]} there (see this script's docstring)")
        if sha256(path) != want:
            raise SystemExit(f"{path}: sha256 {sha256(path)} is not that of {repo} at {commit[:7]} ({want}); "
                             f"check out that commit")


def patched_source(root: Path, rel: str, name: str) -> str:
    """The file's text (its EXCERPTS[name] if listed: the text before the first marker, then from the second to the
    third) with PATCHES[name] for it applied, each found exactly as often as listed."""
    text = (root / rel).read_text()
    if name in EXCERPTS and EXCERPTS[name][0] == rel:
        _, head, start, end, _ = EXCERPTS[name]
        if not all(text.count(m) == 1 for m in (head, start, end)):
            raise SystemExit(f"{root / rel}: an excerpt marker is not found exactly once")
        text = text[:text.index(head)] + text[text.index(start):text.index(end)]
    for path, old, new, count, _ in PATCHES.get(name, []):
        if path == rel:
            if text.count(old) != count:
                raise SystemExit(f"{root / rel}: {old!r} occurs {text.count(old)} times, expected {count}")
            text = text.replace(old, new)
    return text


def load_module(name: str, source: str, filename: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def stream(steps: int, scale: float = 1.0,
           spread: float = 0.0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Initial parameters and `steps` gradients per parameter, float64 normals from one seeded generator (gradients
    times scale; spread > 0: column j of an n-column gradient also times 10^(-spread j / (n - 1)),
    so its singular values span ~10^spread and Newton-Schulz leaves the small ones unconverged)."""
    gen = torch.Generator().manual_seed(SEED)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]
    if spread:
        grads = [[g * torch.logspace(0, -spread, g.size(-1), dtype=torch.float64) for g in step]
                 for step in grads]
    return params, grads


def run(make, steps: int, scale: float = 1.0, spread: float = 0.0):
    """Parameters after each step of an optimizer made by make(params) on stream(steps, scale,
    spread)."""
    init, grads = stream(steps, scale, spread)
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make(params)
    trajectory = []
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return init, grads, trajectory, opt


def original_muon(root: Path):
    rel = "modded-nanogpt/train_gpt2.py"
    mod = load_module("original_b9979e6", patched_source(root, rel, "muon"), str(root / rel))
    s = SETTINGS["muon"]
    return run(lambda ps: mod.OrthogonalNesterov(ps, lr=s["lr"], momentum=s["momentum"],
                                                       nesterov=s["nesterov"]), s["steps"])[:3], {}


def original_soap(root: Path):
    rel = "modded-nanogpt-SOAP/soap.py"
    mod = load_module("original_soap", patched_source(root, rel, "soap"), str(root / rel))
    s = SETTINGS["soap"]
    make = lambda ps: mod.SOAP(ps, lr=s["lr"], betas=tuple(s["betas"]), eps=s["eps"], weight_decay=s["weight_decay"],
                               precondition_frequency=s["precondition_frequency"])
    # its bases after the first step (eigh of L and R, no update yet), which the project's run adopts
    _, _, _, first = run(make, 1)
    bases = [[q.tolist() for q in first.state[p]["Q"]] for group in first.param_groups for p in group["params"]]
    return run(make, s["steps"])[:3], {"first_bases": bases}


def original_polargrad(root: Path):
    pkg = root / "Emerging-Optimizers"
    absl = types.ModuleType("absl")
    absl.logging = types.SimpleNamespace(debug=lambda *a, **k: None, info=lambda *a, **k: None,
                                         warning=lambda *a, **k: None, error=lambda *a, **k: None,
                                         log_first_n=lambda *a, **k: None, INFO=20, ERROR=40)
    sys.modules.setdefault("absl", absl)
    sys.modules.setdefault("absl.logging", absl.logging)
    if not hasattr(typing, "override"):
        typing.override = lambda f: f
    registry = types.ModuleType("emerging_optimizers.registry")
    registry.register_optimizer = lambda name: (lambda cls: cls)
    sys.modules["emerging_optimizers.registry"] = registry
    sys.path.insert(0, str(pkg))
    rel = "Emerging-Optimizers/emerging_optimizers/orthogonalized_optimizers/muon_utils.py"
    import emerging_optimizers  # noqa: F401  (the package; its orthogonalized_optimizers imports muon_utils first)
    emerging_optimizers.registry = registry
    load_module("emerging_optimizers.orthogonalized_optimizers.muon_utils", patched_source(root, rel, "polargrad"),
                str(root / rel))
    from emerging_optimizers.orthogonalized_optimizers.polargrad import PolarGrad
    s = SETTINGS["polargrad"]
    return run(lambda ps: PolarGrad(ps, lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"],
                                          nesterov=s["nesterov"], coefficient_type=s["ns_coeffs"], num_ns_steps=5),
               s["steps"], s["grad_scale"])[:3], {}


TRACK3_SETUP = "########################################\n#                Setup"


def track3_module(root: Path, name: str) -> types.ModuleType:
    """train_gpt_simple.py above its Setup banner (PATCHES[name] applied) as a module,
    torch.distributed replaced by one process."""
    text = patched_source(root, TRACK3_FILE, name)
    argv, sys.argv = sys.argv, [str(root / TRACK3_FILE)]  # it reads its own code for its log
    try:
        mod = load_module(f"original_track3_{name}", text[:text.index(TRACK3_SETUP)],
                          str(root / TRACK3_FILE))
    finally:
        sys.argv = argv
    mod.dist = types.SimpleNamespace(get_world_size=lambda: 1, get_rank=lambda: 0,
                                     all_gather=lambda out, x: None)
    return mod


def original_track3_muon(root: Path):
    mod = track3_module(root, "track3_muon")
    s = SETTINGS["track3_muon"]
    # its Muon sorts its parameters by size (an order only); Nesterov is muon_update's default
    make = lambda ps: mod.Muon(ps, lr=s["lr"], weight_decay=s["weight_decay"], mu=s["momentum"])
    return run(make, s["steps"], spread=s["grad_spread"])[:3], {}


def splitmix(i: np.ndarray) -> np.ndarray:
    """splitmix64 of each uint64 in i (wrapping arithmetic): a fixed pseudo-random hash, the same on
    any machine."""
    with np.errstate(over="ignore"):
        z = i + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform(n: int, k: int) -> np.ndarray:
    """n numbers in [0, 1) from splitmix64 of (k << 32) + 0 .. n-1 (53 bits each)."""
    return (splitmix(np.arange(n, dtype=np.uint64) + np.uint64(k << 32)) >> np.uint64(11)) / 2.0**53


def track3_weights(shapes: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """fp32 weights for (name, shape) by the original's names, k-th of them from uniform(., k):
    offset + std sqrt(3) (2u - 1): gains 1 + 0.1 u', biases std 0.1, the embedding std 1, the head
    (proj.weight) std 3 / sqrt(fan_in) (its logits reach the soft cap), other weights std 1 /
    sqrt(fan_in)."""
    out = {}
    for k, (name, shape) in enumerate(shapes):
        if name.endswith("gains") or name.endswith("bias"):
            offset, std = (1.0 if name.endswith("gains") else 0.0), 0.1
        else:
            offset = 0.0
            scale = 3.0 if name == "proj.weight" else 1.0
            std = 1.0 if name == "embed.weight" else scale / shape[-1] ** 0.5
        u = uniform(math.prod(shape), k)
        out[name] = torch.from_numpy(offset + std * 3**0.5 * (2 * u - 1)).view(*shape).float()
    return out


def track3_tokens(n: int, vocab: int) -> torch.Tensor:
    """n + 1 token ids < vocab (inputs are the first n, targets the last n)."""
    ids = splitmix(np.arange(n + 1, dtype=np.uint64) + np.uint64(7 << 40)) % np.uint64(vocab)
    return torch.from_numpy(ids.astype(np.int64))


def original_track3_model(root: Path):
    mod = track3_module(root, "track3_model")
    s = SETTINGS["track3_model"]
    model = mod.GPT(vocab_size=s["vocab_size"], num_layers=s["num_layers"],
                    model_dim=s["model_dim"]).float()
    shapes = [(name, list(p.shape)) for name, p in model.named_parameters()]
    weights = track3_weights(shapes)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    tokens = track3_tokens(s["batch"] * s["sequence"], s["vocab_size"])
    x, y = tokens[:-1].view(s["batch"], s["sequence"]), tokens[1:].view(s["batch"], s["sequence"])
    loss = model(x, y)
    loss.backward()
    return dict(shapes=shapes, loss_sum=loss.item(),
                grad_norms={n: p.grad.double().norm().item() for n, p in model.named_parameters()})


def original_track3_schedule(root: Path):
    tree = ast.parse((root / TRACK3_FILE).read_text())
    nodes = list(ast.walk(tree))
    (fn,) = [n for n in nodes if isinstance(n, ast.FunctionDef) and n.name == "set_hparams"]
    (loop,) = [n for n in nodes if isinstance(n, ast.For) and ast.unparse(n.target) == "step"]
    freq, due = loop.body[0], loop.body[1]
    assert ast.unparse(freq).startswith("val_step_freq =") and isinstance(due, ast.If), "changed"
    runs = []
    for n in SETTINGS["track3_schedule"]["num_iterations"]:
        group = {"initial_lr": 1.0}
        env = dict(train_steps=n, optimizers=[types.SimpleNamespace(param_groups=[group])])
        exec(compile(ast.Module([fn], []), TRACK3_FILE, "exec"), env)
        lr = []
        for step in range(n):
            env["set_hparams"](step)
            lr.append(group["lr"])
        val = []
        for step in range(n + 1):
            env["step"] = step
            exec(compile(ast.Module([freq], []), TRACK3_FILE, "exec"), env)
            if eval(compile(ast.Expression(due.test), TRACK3_FILE, "eval"), env):
                val.append(step)
        runs.append(dict(num_iterations=n, lr=lr, val_steps=val))
    return dict(runs=runs)
def newton_muon_stream() -> dict:
    """Newton-Muon's stream, float64 from one seeded generator: the block matrices of a width-d layer (kind, shape),
    initial parameters ~ N(0, 1), gradients ~ N(0, 1) rounded to 4 decimals, and before each refresh step r (k + 1 a
    multiple of refresh_every) each layer's C_new = X^T X / tokens of an input X of `tokens` rows with columns scaled
    by exp(linspace(-1.5, 1.5)) (c_proj: the 4 diagonal d x d blocks of its 4d-wide input's, as accum_xtx_blocks4)."""
    s = SETTINGS["newton_muon"]
    d, n = s["d"], s["tokens"]
    gen = torch.Generator().manual_seed(SEED)
    kinds = [("qkv", (3 * d, d)), ("o", (d, d)), ("c_fc", (4 * d, d)), ("c_proj", (d, 4 * d))]
    params = [torch.randn(shape, generator=gen, dtype=torch.float64) for _, shape in kinds]
    grads = [[torch.round(torch.randn(shape, generator=gen, dtype=torch.float64) * 1e4) / 1e4 for _, shape in kinds]
             for _ in range(s["steps"])]
    refreshes = [k for k in range(s["steps"]) if (k + 1) % s["refresh_every"] == 0]
    grams = []
    for _ in refreshes:
        step = {}
        for kind, width in [("qkv", d), ("o", d), ("c_fc", d), ("c_proj", 4 * d)]:
            X = torch.randn(n, width, generator=gen, dtype=torch.float64) * torch.linspace(
                -1.5, 1.5, width, dtype=torch.float64).exp()
            step[kind] = (X.T @ X / n if width == d else
                          torch.stack([X[:, j * d:(j + 1) * d].T @ X[:, j * d:(j + 1) * d] / n for j in range(4)]))
        grams.append(step)
    return dict(kinds=kinds, params=params, grads=grads, refreshes=refreshes, grams=grams)


def original_newton_muon(root: Path):
    kernels = types.ModuleType("triton_kernels")
    kernels.XXT = lambda A, out: out.copy_(A @ A.mT)
    kernels.ba_plus_cAA = lambda A, alpha, beta, out: out.copy_(alpha * (A @ A.mT) + beta * A)
    sys.modules["triton_kernels"] = kernels
    torch.set_default_dtype(torch.float64)
    rel = "Newton-Muon/train_gpt_newton_muon_1.py"
    mod = load_module("original_newton_muon", patched_source(root, rel, "newton_muon"), str(root / rel))
    s, st = SETTINGS["newton_muon"], newton_muon_stream()
    params = [torch.nn.Parameter(p.clone()) for p in st["params"]]
    stats = {}
    for (kind, _), p in zip(st["kinds"], params):
        shape = (4, s["d"], s["d"]) if kind == "c_proj" else (s["d"], s["d"])
        stats[kind] = dict(kind=kind, d=s["d"], accum=torch.zeros(shape), count=torch.zeros(()))
        p._stats_ref = stats[kind]
    opt = mod.Muon(params, lr=s["lr"], momentum=s["momentum"], nesterov=s["nesterov"], backend_steps=s["backend_steps"],
                   precond_init_diag=s["precond_init_diag"], precond_ridge_mult=s["precond_ridge_mult"],
                   precond_eps=s["precond_eps"])
    opt.attach_preconditioner()
    kept, refreshed = {}, []
    for k, g in enumerate(st["grads"]):
        opt.global_step = k  # as its training loop sets it
        if opt.precond_flag_for_step(k):  # the forward collects: here the stream's C_new, one micro-batch
            refreshed.append(k)
            for kind, ref in stats.items():
                ref["accum"].copy_(st["grams"][len(refreshed) - 1][kind])
                ref["count"].fill_(1.0)
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()
        if (k + 1) % s["keep_every"] == 0:
            kept[k] = [p.detach().clone() for p in params]
    torch.set_default_dtype(torch.float32)
    assert refreshed == st["refreshes"]
    return dict(kinds=[[kind, list(shape)] for kind, shape in st["kinds"]], init=[p.tolist() for p in st["params"]],
                grads=[[g.tolist() for g in step] for step in st["grads"]], refreshes=st["refreshes"],
                grams=[{kind: C.tolist() for kind, C in step.items()} for step in st["grams"]],
                kept_steps=list(kept), params=[[p.tolist() for p in ps] for ps in kept.values()])


def provenance(root: Path, name: str) -> dict:
    return dict(
        files=[dict(repo=repo, commit=commit, path=path, sha256=sha) for repo, commit, _, path, sha in ORIGINALS[name]],
        changed=[dict(file=rel.split("/", 1)[1], old=old, new=new, why=why) for rel, old, new, _, why in PATCHES.get(name, [])],
        excerpt=(dict(file=EXCERPTS[name][0].split("/", 1)[1], markers=list(EXCERPTS[name][1:4]),
                      runs=EXCERPTS[name][4]) if name in EXCERPTS else None),
        shims=SHIMS.get(name, ""), note=NOTES[name], run="float64 on CPU, torch " + torch.__version__,
        made_by="tests/golden/make_golden.py")


def write(name: str, root: Path, result, extra: dict) -> Path:
    init, grads, trajectory = result
    data = dict(provenance=provenance(root, name), settings=SETTINGS[name], seed=SEED, shapes=SHAPES,
                init=[p.tolist() for p in init], grads=[[g.tolist() for g in step] for step in grads],
                params=[[p.tolist() for p in step] for step in trajectory], **extra)
    path = HERE / f"{name}.json"
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return path


def write_track3(name: str, root: Path, data: dict) -> Path:
    path = HERE / f"{name}.json"
    fp32 = "fp32 on CPU, torch " + torch.__version__
    run_on = fp32 if name == "track3_model" else "Python floats"
    prov = dict(provenance(root, name), run=run_on)
    path.write_text(json.dumps(dict(provenance=prov, settings=SETTINGS[name], **data),
                               separators=(",", ":")) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--originals", default=str(HERE.parents[1] / ".originals"),
                        help="the folder holding the copies (default: .originals/ at the repo root)")
    parser.add_argument("--only", choices=list(ORIGINALS), action="append", help="make only these (repeatable)")
    args = parser.parse_args(argv)
    root = Path(args.originals)
    for name in args.only or list(ORIGINALS):
        check_copies(root, name)
        if name in ("track3_model", "track3_schedule"):
            make = original_track3_model if name == "track3_model" else original_track3_schedule
            data = make(root)
            print(f"{name}: {write_track3(name, root, data)}")
            continue
        if name == "newton_muon":
            data = dict(provenance=provenance(root, name), settings=SETTINGS[name], seed=SEED,
                        **original_newton_muon(root))
            path = HERE / f"{name}.json"
            path.write_text(json.dumps(data, separators=(",", ":")) + "\n")
            print(f"{name}: {path}")
            continue
        result, extra = {"muon": original_muon, "soap": original_soap, "polargrad": original_polargrad,
                         "track3_muon": original_track3_muon}[name](root)
        print(f"{name}: {write(name, root, result, extra)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
