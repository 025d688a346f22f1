"""GPT-2 (124M) speedrun trainer for optimizer research. One file, read top to bottom: settings ->
rules (the optimizers) -> model -> data -> train(); below a banner, what a rule author never needs:
the speed machinery and the run's infrastructure.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # the Muon record: 7000 steps
    python train_gpt2.py --preset smoke                      # tiny model, CPU: ~150 s of CPU time
    python train_gpt2.py --optimizer adamw --label x         # any setting: --name value"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import glob
import hashlib
import inspect
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# ships with torch's CUDA builds; without it (CPU builds) torch ops do the Triton kernels' work
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
# under Triton's interpreter (TRITON_INTERPRET=1) the kernels run on CPU tensors: how the tests
# check them without a GPU
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# ----------------------------------------------------------------------------- settings


@dataclass
class RunSettings:
    """The run's settings; Hyperparameters (end of the rules section) adds the optimizers'."""
    # data: glob patterns of shards in the FineWeb format (data/cached_fineweb10B.py fetches them)
    input_bin: str = "data/fineweb10B/fineweb_train_*.bin"  # train shards, read in name order
    input_val_bin: str = "data/fineweb10B/fineweb_val_*.bin"  # val shards: their first val_tokens
    # batch: batch_size sequences of sequence_length tokens a step
    # = world_size * device_batch_size * accumulation
    batch_size: int = 8 * 64  # sequences a step, all processes together
    device_batch_size: int = 64  # sequences a micro-batch on one process
    sequence_length: int = 1024  # tokens a sequence
    # schedule
    num_iterations: int = 7000  # optimizer steps of the run
    # > 0: stop after this many steps of the schedule (val, checkpoint; --resume goes on)
    stop_at: int = 0
    warmup_iters: int = 250  # steps of linear LR warmup from 1/warmup_iters
    warmdown_iters: int = 2000  # last steps of linear LR decay to 0
    val_loss_every: int = 125  # steps between validations; 0: only at the end
    # > 0: every this many steps from 0.9 num_iterations on (val_due; track3: 25)
    val_tail_every: int = 0
    val_tokens: int = 10485760  # tokens a validation reads (a multiple of the val batch)
    # the init's random draws, and only those (0 .. 2^32-1): data order, val tokens and the updates
    # draw nothing from it
    seed: int = 0
    # bit-identical reruns on one GPU: deterministic kernels (Determinism); off: fastest
    deterministic: bool = False
    # model (GPT-2 small, MODELS): gpt2, the 2024 speedrun's (GPT); track3, the optimization
    # track's (Track3GPT)
    model: str = "gpt2"
    vocab_size: int = 50257  # token ids 0 .. vocab_size-1 (GPT-2's)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads a block
    n_embd: int = 768  # model width
    # the block matrices' optimizer (OPTIMIZERS); each declares its settings beside its class
    optimizer: str = "muon"
    # speed (the math stays the same)
    loss_chunk: int = 8192  # logit rows at a time in the fused loss (LinearCrossEntropy); 0: all
    # scaled_dot_product_attention backend: auto | cudnn | flash | efficient | math
    attention: str = "auto"
    # < 1: torch.compile recomputes activations to keep about this fraction (memory)
    activation_budget: float = 1.0
    # keep the MLP's pre-GELU activation only, recompute GELU in the backward (memory)
    recompute_gelu: bool = True
    # CUDA: factor C on a side stream while the refresh step's last backward runs
    gram_overlap: bool = True
    # run
    compile: bool = True  # CUDA: torch.compile the model, and the rules' fast paths on
    # the model's torch.compile mode: default | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # before and after training, time an 8192^3 bf16 matmul (CPU: 512^3 fp32): the MFU
    matmul_check: bool = True
    records_dir: str = "runs"  # the run's record (and checkpoints/, by default); git-ignored
    label: str = ""  # a tag in the record: records/compare.py --by label groups by it
    preset: str = "speedrun"  # named settings applied first (PRESETS, PRESET_TUNED); given ones win
    # checkpoints (README: Checkpoints, resume, divergence): at the end (final_checkpoint) and on
    # SIGTERM/SIGINT
    save_every: int = 0  # also every this many steps; 0: never in between
    # 0: none at the end of the run (--save_every, --stop_at and stop signals still save)
    final_checkpoint: bool = True
    keep_checkpoints: int = 2  # the newest this many checkpoints of a run are kept
    checkpoint_dir: str = ""  # "": <records_dir>/checkpoints; one folder per record inside
    # a checkpoint folder, a run's folder of checkpoints, or "latest" (under checkpoint_dir)
    resume: str = ""


PRESETS: dict[str, dict] = {
    "speedrun": {},  # the record: the dataclass defaults
    # a tiny model on the sample shipped in data/sample/: the whole pipeline in ~150 s of CPU time
    # (2 cores), no checkpoint unless asked; 128-row logit chunks (records/smoke-cpu/README.md)
    "smoke": dict(
        input_bin="data/sample/sample_train_*.bin", input_val_bin="data/sample/sample_val_*.bin",
        n_layer=2, n_head=2, n_embd=64, batch_size=4, device_batch_size=2, sequence_length=128,
        num_iterations=60, warmup_iters=5, warmdown_iters=20, val_loss_every=20, val_tokens=4096,
        final_checkpoint=False, loss_chunk=128,
    ),
    # the benchmark: the record's model and batch for 50 steps (10 untimed + 40 timed), one
    # validation at the end
    "bench": dict(num_iterations=50, warmup_iters=10, warmdown_iters=10, val_loss_every=0,
                  val_tokens=1048576),
    # the optimizer-comparison protocol: the record's model, one 64 x 1024 micro-batch a step (26.2M
    # tokens), the record's schedule scaled to 400 steps; val every 25 steps (steps to a target to
    # 25 steps) on 1,048,576 tokens
    "compare": dict(batch_size=64, num_iterations=400, warmup_iters=15, warmdown_iters=115,
                    val_loss_every=25, val_tokens=1048576),
    # modded-nanogpt's optimization track, records/track_3_optimization/train_gpt_simple.py at
    # f411b3d: its model (Track3GPT), AdamW groups and Muon, 3250 steps of 512 x 1024 tokens, lr 1
    # then linear to 0 over the last 70%, val on 10,485,760 tokens every 125 steps, every 25 in the
    # last 10%
    "track3": dict(
        model="track3", vocab_size=50304, n_head=6, loss_chunk=0, num_iterations=3250,
        warmup_iters=0, warmdown_iters=2275, val_loss_every=125, val_tail_every=25, embed_lr=0.7,
        head_lr=0.004, scalar_lr=0.015, embed_betas=(0.8, 0.95), embed_eps=1e-10,
        embed_weight_decay=0.001, muon_lr=0.025, muon_weight_decay=0.05, muon_lerp=True,
        ns_coeffs="convergent", muon_shape_scale=True,
    ),
}

# a preset's settings per --optimizer, applied after the preset and before the given ones: the
# `compare` preset's learning rate of the block matrices is each optimizer's best of a grid a
# factor 2 apart under it (records/lr-sweep-400/README.md); an optimizer not listed keeps its
# declared default
PRESET_TUNED: dict[str, dict[str, dict]] = {
    "compare": {
        "muon": dict(muon_lr=0.036),
        "adamw": dict(adamw_lr=0.00015),
    },
}


def _parse_value(name: str, kind, text: str):
    kind = str(kind)
    try:
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind.startswith("tuple"):
            return tuple(float(t) for t in text.split(","))
        return {"int": int, "float": float, "str": str}[kind](text)
    except ValueError:
        raise SystemExit(f"--{name}: cannot read {text!r} as {kind}") from None


def run_setting_help() -> dict[str, str]:
    """Each RunSettings field's one line of --help: the comment on its line, else the comment lines
    right above it (read from this file's source)."""
    helps, above = {}, []
    for line in inspect.getsource(RunSettings).splitlines():
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = re.match(r"(\w+): [^=]+=.*?(?:\s+#\s*(.*))?$", text)
        if m:
            helps[m[1]] = m[2] or " ".join(above)
        above = []
    return helps


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--field value` for every Hyperparameters field; `--preset name` applies a named set first,
    then its PRESET_TUNED settings for the --optimizer; explicit fields win. With `--resume`, the
    checkpoint's settings are the base and only RESUME_MAY_CHANGE may differ (resume_settings)."""
    kinds = {f.name: f.type for f in fields(Hyperparameters)}
    given: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            declared = {s.name: s for s in declared_settings()}
            helps = run_setting_help()

            def shown(v):  # as it is written on the command line
                return ",".join(map(str, v)) if isinstance(v, tuple) else v
            print(__doc__ + "\nsettings (--name value or --name=value; the last of a repeated one "
                  "wins), each with its default:\n" + "\n".join(
                      f"  --{f.name} ({shown(f.default)}): {helps[f.name]}"
                      for f in fields(RunSettings))
                  + "\noptimizer settings:\n" + "\n".join(
                      f"  --{s.name} ({shown(s.default)}): {s.help}" for s in declared.values()))
            raise SystemExit(0)
        key, eq, val = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key not in kinds:
            hint = difflib.get_close_matches(key or arg, list(kinds), n=1)
            hint = f"; did you mean --{hint[0]}?" if hint else ""
            raise SystemExit(f"unknown setting {arg!r}{hint}\nsettings: "
                             f"{' '.join('--' + k for k in kinds)}")
        if not eq:  # the value is the next argument; --name= is the empty value
            if i + 1 >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            i, val = i + 1, argv[i + 1]
            if val.startswith("--"):
                raise SystemExit(f"--{key} needs a value, got the setting {val}; to pass {val!r} "
                                 f"as the value write --{key}={val}")
        given[key] = val
        i += 1
    preset = given.get("preset", "speedrun")
    if preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    typed = {k: _parse_value(k, kinds[k], v) for k, v in given.items()}
    optimizer = typed.get("optimizer", values.get("optimizer", Hyperparameters.optimizer))
    values.update(PRESET_TUNED.get(preset, {}).get(optimizer, {}))
    values.update(typed)
    if typed.get("resume"):  # the checkpoint's settings, with the few given ones that may change
        return resume_settings(Hyperparameters(**values), typed)
    return Hyperparameters(**values)


def lr_multiplier(it: int, args: Hyperparameters) -> float:
    """(it+1)/warmup for it < warmup; 1 until num_iterations - warmdown; then
    (num_iterations - it)/warmdown."""
    if it < args.warmup_iters:
        return (it + 1) / args.warmup_iters
    if it < args.num_iterations - args.warmdown_iters:
        return 1.0
    return (args.num_iterations - it) / args.warmdown_iters


def val_due(step: int, args: Hyperparameters) -> bool:
    """Whether step (before its update) validates: the last step; every val_loss_every steps (0:
    none), or from step / num_iterations >= 0.9 on every val_tail_every steps if > 0 (the track's
    loop: 125, then 25)."""
    tail = args.val_tail_every > 0 and not step / args.num_iterations < 0.9
    every = args.val_tail_every if tail else args.val_loss_every
    return step == args.num_iterations or (every > 0 and step % every == 0)

# ----------------------------------------------------------------------------- rules
# A rule: a MatrixOptimizer subclass registered with @optimizer(name), its settings declared beside
# it (Setting), its math in `update` (and in `rule`, the pure function its fast path runs:
# FAST_PATHS). Hyperparameters, the command line, the checks and the checkpoints all follow from
# these declarations.


@dataclass(frozen=True)
class Setting:
    """One optimizer setting: the field and command-line name `--name`, its default (its type: the
    setting's), a help line, and the values it allows: ok(value, args) holds; `want` (a text, or a
    function of args) names them in the refusal `--name: must be <want>, got <value>`."""
    name: str
    default: object
    help: str
    want: str | Callable = ""
    ok: Callable = lambda value, args: True

    @property
    def kind(self) -> str:
        """The field's type as Hyperparameters spells it: bool, int, float, str, tuple[float,
        float].
        """
        if isinstance(self.default, tuple):
            return "tuple[float, float]"
        return type(self.default).__name__

    def refusal(self, args) -> str:
        """'' if args' value is allowed, else the one-line refusal."""
        value = getattr(args, self.name)
        if self.ok(value, args):
            return ""
        want = self.want(args) if callable(self.want) else self.want
        return f"--{self.name}: must be {want}, got {value!r}"


def positive(name: str, default: float, help: str) -> Setting:
    return Setting(name, default, help, "positive and finite", lambda v, a: 0 < v < math.inf)


def fraction(name: str, default: float, help: str) -> Setting:
    return Setting(name, default, help, "in [0, 1)", lambda v, a: 0 <= v < 1)


def nonnegative(name: str, default: float, help: str) -> Setting:
    return Setting(name, default, help, ">= 0", lambda v, a: 0 <= v < math.inf)


def at_least(name: str, default: int, low: int, help: str) -> Setting:
    return Setting(name, default, help, f">= {low}", lambda v, a: v >= low)


def betas(name: str, default: tuple[float, float], help: str) -> Setting:
    return Setting(name, default, help, "two numbers in [0, 1), e.g. 0.9,0.95",
                   lambda v, a: len(v) == 2 and all(0 <= b < 1 for b in v))


def flag(name: str, default: bool, help: str) -> Setting:
    return Setting(name, default, help, "a bool (0 or 1)", lambda v, a: isinstance(v, bool))


def choice(name: str, default: str, choices, help: str, want: str = "") -> Setting:
    """One of `choices` (their names: a dict's keys)."""
    choices = tuple(choices)
    want = want or (", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1
                    else choices[0])
    return Setting(name, default, help, want, lambda v, a: v in choices)


OPTIMIZERS: dict[str, type] = {}  # --optimizer name -> the rule (its class), in registration order


def optimizer(name: str):
    """Class decorator: register a rule as `--optimizer name`."""
    def register(cls: type) -> type:
        OPTIMIZERS[name] = cls
        return cls
    return register


def optimizer_class(name: str) -> type:
    """The rule `--optimizer name` picks; SystemExit naming the choices if there is none."""
    if name not in OPTIMIZERS:
        raise SystemExit(f"--optimizer: unknown optimizer {name!r}; choose one of "
                         f"{', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


# (a, b, c) per Newton-Schulz step: X <- a X + b (X X^T) X + c (X X^T)^2 X, and the factor on
# ||X||_F before the first step
NS_COEFFS: dict[str, tuple[list[tuple[float, float, float]], float]] = {
    "simple": ([(3.4445, -4.7750, 2.0315)] * 5, 1.0),
    "convergent": ([(2.0, -1.5, 0.5)] * 12, 1.0),  # the optimization track's: p(1) = 1, p'(1) = 0
    "quintic": ([(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                 (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)], 1.0),
    # Polar Express (Amsel et al. 2025), the first 5 of the paper's code's coefficient list, each
    # divided by its safety factor (a / 1.01, b / 1.01^3, c / 1.01^5): the code exempts only the
    # list's last polynomial, which a 5-step run never reaches
    "polar_express": ([(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in [
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673)]], 1.01),
}


# Where orthogonalize(G) puts the singular values: if every singular value of G is >= x0 ||G||_F,
# every singular value of the bf16 result lies in NS_BANDS[set][x0] (the scalar polynomial in
# float64 over x in [x0, 1], widened by the bf16 noise seen on random 768x3072 matrices of many
# spectra; tests/test_optimizers.py checks it). Smaller singular values come out smaller: roughly x
# (a1 a2 ... a5) for x << x0, e.g. 487 x for "simple".
NS_BANDS: dict[str, dict[float, tuple[float, float]]] = {
    "simple": {1e-2: (0.67, 1.15), 2e-3: (0.67, 1.22)},
    "convergent": {1e-2: (0.99, 1.01), 2e-3: (0.99, 1.01)},
    "quintic": {1e-2: (0.96, 1.05), 2e-3: (0.84, 1.16)},
    "polar_express": {1e-2: (0.85, 1.15), 2e-3: (0.85, 1.15)},
}


def orthogonalize(G: torch.Tensor, coeffs: str = "simple") -> torch.Tensor:
    """msign(G) ~ U V^T for G = U S V^T, batched over leading dims, in bf16:
    X = G / (f ||G||_F + 1e-7); transposed so rows <= cols; per step
    {A = X X^T; X = (a I + b A + c A A) X} (= a X + b A X + c A (A X), the record's form, in
    4mmn + 2mmm flops instead of 6mmn for m x n; three GEMMs, the m x m polynomial summed in fp32
    between them, so no GEMM reads or copies X for an epilogue; X X^T and A A = A A^T are syrk's
    symmetric products, which compute only the tiles on and above the diagonal). The first step
    skips the normalizing pass over G: with G0 = bf16(G), A0 = G0 G0^T, s = f sqrt(tr A0) + 1e-7
    (= f ||G0||_F + 1e-7): A = A0 / s^2 and X = ((a I + b A + c A A) / s) G0 (so G's entries must
    stay below ~1e17, where A0 would overflow bf16's range; a gradient that large is a divergence).
    """
    steps, f = NS_COEFFS[coeffs]
    X = G.to(NS_DTYPE)
    # the sums between the GEMMs: fp32 (fp64 with NS_DTYPE fp64)
    acc = torch.promote_types(NS_DTYPE, torch.float32)
    if G.size(-2) > G.size(-1):
        X = X.mT
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])
    eye = torch.eye(X.size(-2), dtype=acc, device=X.device)
    for i, (a, b, c) in enumerate(steps):
        A = syrk(X)
        if i == 0:
            s = A.diagonal(dim1=-2, dim2=-1).to(acc).sum(-1).sqrt() * f + 1e-7
            A = (A / (s * s)[:, None, None]).to(NS_DTYPE)
        B = c * syrk(A).to(acc) + b * A.to(acc) + a * eye
        if i == 0:
            B = B / s[:, None, None]
        X = half_mm(B.to(NS_DTYPE), X)
    X = X.reshape(shape)
    return X.mT if G.size(-2) > G.size(-1) else X


def nuclear_norm(M: torch.Tensor, mode: str = "exact",
                 O: torch.Tensor | None = None) -> torch.Tensor:
    """||M||_* = sum_i s_i(M) per matrix, batched over leading dims, in fp32 (fp64 for fp64 M):
    exact: sum_i sqrt(max(l_i, 0)) over l = eigvalsh of the smaller Gram, M^T M or M M^T;
    inner: <O, M> = sum_ij O_ij M_ij with O = orthogonalize(M) ~ U V^T, as <U V^T, U S V^T> = tr S
    (off by NS_BANDS)."""
    M = M.to(torch.promote_types(M.dtype, torch.float32))
    if mode == "inner":
        # rows first: one reduction over m n per matrix ran on 12 blocks
        return (O.to(M.dtype) * M).sum(-1).sum(-1)
    gram = M.mT @ M if M.size(-2) >= M.size(-1) else M @ M.mT
    return torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().sum(-1)


def right_precondition(G: torch.Tensor, R: torch.Tensor, mode: str,
                       low_precision: bool = False) -> torch.Tensor:
    """G R for G (out, d) and gram_factor's R: full G @ R; block: each b-column block of G times its
    (b, b) block; diag: G * R. In fp32 (fp64 for fp64), or with bf16 operands (low_precision: the
    rules pass gram_low, --gram_apply bf16 on CUDA), returned in G's dtype."""
    if mode == "diag":
        return (G * R).to(G.dtype)
    dtype = torch.bfloat16 if low_precision else torch.promote_types(G.dtype, torch.float32)
    X, R = G.to(dtype), R.to(dtype)
    if mode == "block":  # (out, d) -> (d/b, out, b) @ (d/b, b, b) -> (out, d)
        out, d = G.shape
        return (X.view(out, R.size(0), -1).transpose(0, 1) @ R).transpose(0, 1).reshape(out,
                                                                                        d).to(
                                                                                            G.dtype)
    return (X @ R).to(G.dtype)


def trace_over_d(C: torch.Tensor, mode: str, per_block: bool = False) -> torch.Tensor:
    """tr(C) / d per matrix for C full (..., d, d), block (..., d/b, b, b) or diag (..., d); with
    per_block, for block C, tr(C_k) / b per block instead (..., d/b)."""
    if mode == "diag":
        return C.mean(-1)
    D = C.diagonal(dim1=-2, dim2=-1)
    if mode == "block" and not per_block:
        return D.flatten(-2).mean(-1)
    return D.mean(-1)


def scaled_identity(like: torch.Tensor, mode: str, s: float) -> torch.Tensor:
    """s I in the layout of C `like`: full (..., d, d), block (..., d/b, b, b) (s I per block), diag
    (..., d)."""
    if mode == "diag":
        return torch.full_like(like, s)
    out = torch.zeros_like(like)
    out.diagonal(dim1=-2, dim2=-1).fill_(s)
    return out


def eigenbasis(P: torch.Tensor) -> torch.Tensor:
    """Q of P = Q diag(l) Q^T for symmetric P (batched), columns by descending l; fp64 if fp32 eigh
    fails."""
    try:
        return torch.linalg.eigh(P).eigenvectors.flip(-1)
    except torch.linalg.LinAlgError:
        return torch.linalg.eigh(P.double()).eigenvectors.flip(-1).to(P.dtype)


def power_step(P: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One power iteration towards the eigenvectors of P from the basis Q (batched), sorted by the
    eigenvalue estimates: order = argsort(diag(Q^T P Q), descending); returns (P Q)[:, order],
    order. SOAP's refreshed basis is orthonormalize of it (the Q of its QR, up to column signs, to
    which SOAP is invariant)."""
    PQ = P @ Q
    order = torch.argsort((Q * PQ).sum(-2), dim=-1, descending=True)
    return PQ.gather(-1, order[..., None, :].expand_as(PQ)), order


def _rotate(X: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None,
            back: bool = False) -> torch.Tensor:
    """Q_L^T X Q_R (into the eigenbasis) or Q_L X Q_R^T (back); a missing side (None) is the
    identity."""
    if QL is not None:
        X = (QL if back else QL.mT) @ X
    if QR is not None:
        X = X @ (QR.mT if back else QR)
    return X


def cannot_fail(R: torch.Tensor, wait: bool):
    """A factor without a Cholesky, as gram_factor returns it: R, or (R, a false failure flag) with
    wait=False."""
    return R if wait else (R, torch.zeros((), dtype=torch.bool, device=R.device))


FALLBACK_BOOSTS = (10, 100, 1000)  # gram_factor's retries of a failed Cholesky: C + boost gamma I


def gram_factor(C: torch.Tensor, gamma, mode: str, f: str = "solve", wait: bool = True,
                boosts: list[torch.Tensor] | None = None):
    """The cached right preconditioner R of A = C + gamma I (computed once per refresh), batched
    over leading dims; C: full (..., d, d), block (..., d/b, b, b), diag (..., d); gamma: a number
    or one per matrix (...).
      solve: R = A^-1 = L^-T L^-1, L = cholesky_blocked(A), each matrix (or block) whose Cholesky
        fails retried with 10x, 100x, 1000x gamma;
      inverse_sqrt: R = A^(-1/2) = V diag(l + gamma)^(-1/2) V^T from eigh(C);
      diag: R = 1 / (C + gamma) (solve) or (C + gamma)^(-1/2) (inverse_sqrt), elementwise.
    boosts (solve, full or block, wait=True): a list that gets the factor gamma was multiplied by
    for each Cholesky (1, 10, 100 or 1000; one per matrix, or per block). wait=False: one attempt
    and no host sync (a refresh queued on a side stream), returning (R, failed): failed is a 0-dim
    bool tensor, true if any Cholesky failed (R is then not usable: call again with wait=True)."""
    gamma = torch.as_tensor(gamma, dtype=C.dtype, device=C.device)
    # one per matrix, broadcast over its entries
    gamma = gamma.reshape(gamma.shape + (1,) * (C.dim() - gamma.dim()))
    if mode == "diag":
        return cannot_fail((C + gamma).rsqrt() if f == "inverse_sqrt" else 1 / (C + gamma), wait)
    if f == "inverse_sqrt":
        l, V = torch.linalg.eigh(C)
        return cannot_fail((V * (l.clamp(min=0) + gamma.squeeze(-1)).rsqrt().unsqueeze(-2)) @ V.mT,
                           wait)
    eye = torch.eye(C.size(-1), device=C.device, dtype=C.dtype)
    L, info = cholesky_blocked(C + gamma * eye)
    if not wait:
        return gram_upper(tri_inverse(L), lower=True), (info > 0).any()
    used = torch.ones(info.shape, dtype=torch.int32, device=info.device)
    for boost in FALLBACK_BOOSTS:
        failed = info > 0  # one flag per Cholesky (per matrix, or per block)
        if not failed.any():
            break
        L2, info2 = cholesky_blocked(C + boost * gamma * eye)
        L, info = torch.where(failed[..., None, None], L2, L), torch.where(failed, info2, info)
        used = torch.where(failed, boost, used)
    if boosts is not None:
        boosts.append(used)
    if (info > 0).any():
        raise torch.linalg.LinAlgError("Cholesky of C + 1000 gamma I failed: C is not finite")
    return gram_upper(tri_inverse(L), lower=True)  # A^-1 = L^-T L^-1


def eigenvalue_bound(C: torch.Tensor, mode: str, squarings: int = 4) -> torch.Tensor:
    """L >= lambda_max(C) per matrix for symmetric positive semidefinite C, batched: full (..., d,
    d); block (..., d/b, b, b), the max over its blocks; diag (..., d), max_i C_i (exact). Full and
    block: the Schatten norm L = tr(C^(2^k))^(1/2^k) = ||l||_(2^k) >= ||l||_inf = lambda_max over
    C's eigenvalues l, at most d^(1/2^k) lambda_max (k = 4: 1.51x at d = 768, 1.65x at 3072; how
    close on this model's C: records/feature-gram-sweep/README.md), by repeated squaring at unit
    trace so nothing overflows: B_0 = C / tr(C); t_j = tr(B_(j-1)^2) = ||B_(j-1)||_F^2, B_j =
    B_(j-1)^2 / t_j; L = tr(C) t_1^(1/2) t_2^(1/4) ... t_k^(1/2^k) (k - 1 matmuls)."""
    if mode == "diag":
        return C.amax(-1)
    tiny = torch.finfo(C.dtype).tiny
    tr = C.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny)
    B, log_L = C / tr[..., None, None], tr.log()
    for j in range(1, squarings + 1):
        t = B.square().sum((-2, -1)).clamp_min(tiny)
        log_L = log_L + t.log() / 2**j
        if j < squarings:
            B = B @ B / t[..., None, None]
    L = log_L.exp()
    return L.amax(-1) if mode == "block" else L


def inner_steps_polynomial(C: torch.Tensor, lam, nu, K: int, mode: str) -> torch.Tensor:
    """P_K = nu sum_{j<K} (I - nu (C + lam I))^j (full/block: matrices; diag: a vector; batched over
    leading dims; lam and nu numbers or one per matrix), by P <- nu I + (I - nu A) P; applied like
    A^-1 (right_precondition)."""
    lam, nu = (torch.as_tensor(x, dtype=C.dtype, device=C.device) for x in (lam, nu))
    # per matrix, over its entries
    lam, nu = (x.reshape(x.shape + (1,) * (C.dim() - x.dim())) for x in (lam, nu))
    if mode == "diag":
        B = 1 - nu * (C + lam)
        P = torch.zeros_like(C)
        for _ in range(K):
            P = nu + B * P
        return P
    eye = torch.eye(C.size(-1), device=C.device, dtype=C.dtype)
    B = eye - nu * (C + lam * eye)
    P = torch.zeros_like(C)
    for _ in range(K):
        P = nu * eye + B @ P
    return P


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the rules, and what a rule may rely on. build_optimizers gives every matrix inside
    the blocks (the model's block_matrices) to one rule (train's `blocks`); each matrix is owned by
    one process (greedy by `cost`), which runs `update` on all its matrices of one batch_key as a
    batch; then one all_gather shares the new parameters, so every process ends the step identical
    and the work falls ~W-fold with W processes. Declared per class, merged over its bases:
      settings          group key -> Setting: the constructor's keywords, each group's entries,
                        Hyperparameters' fields and the command line (build reads them from args)
      fast_path         the FAST_PATHS entry that runs `rule` once fast paths are on (CUDA and
                        --compile 1)
      state_like_param  the state entries shaped like their parameter, which a resume shape-checks
      refresh_every     steps between refreshes of the feature Gram C (refresh_gram); 0: never
      linear_in_g       the step is linear in G (not scale-free): with a loss summed over the
                        step's n tokens (the model's loss_sum) build_optimizers gives it lr / n and
                        weight_decay x n, so its step and decay are those of the mean loss
    Checkpoints save self.state as a state_dict: each process saves and loads the state of the
    matrices it owns (holds); any tensor state is saved, whatever its name."""
    settings: dict[str, Setting] = {}
    fast_path = "eager"
    state_like_param: tuple[str, ...] = ("momentum_buffer",)
    refresh_every = 0
    linear_in_g = False

    def __init__(self, params, **settings):
        declared = self.declared()
        unknown = sorted(set(settings) - set(declared))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting {', '.join(unknown)}")
        super().__init__(params, {k: settings.get(k, s.default) for k, s in declared.items()})
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.owner: dict[torch.Tensor, int] = dict(zip(self._params(), assign_owners(
            [self.cost(p) for p in self._params()], self.world)))
        self._gather_buf: torch.Tensor | None = None
        self._lr: dict[tuple, torch.Tensor] = {}
        self.fast = False  # use_fast_paths turns it on

    @classmethod
    def declared(cls) -> dict[str, Setting]:
        """Every setting of the rule: its class's and its bases' `settings`, the bases' first."""
        return {k: s for c in reversed(cls.__mro__) for k, s in vars(c).get("settings", {}).items()}

    @classmethod
    def build(cls, model: nn.Module, args) -> MatrixOptimizer:
        """The rule on the model's block_matrices (every matrix inside its blocks), its settings
        from args."""
        return cls(model.block_matrices(), **setting_values(cls.declared(), args))

    def _params(self) -> list[torch.Tensor]:
        return optimizer_params(self)

    def holds(self, p: torch.Tensor) -> bool:
        """Whether this process owns p: updates it, saves and loads its state."""
        return self.owner[p] == self.rank

    @staticmethod
    def cost(p: torch.Tensor) -> float:
        m, n = p.shape
        return m * n * min(m, n)

    @staticmethod
    def batch_key(p: torch.Tensor) -> tuple:
        """Matrices with one key share a batch of `update` (here: one shape)."""
        return tuple(p.shape)

    def update(self, params: list[torch.Tensor], group: dict) -> None:
        """Apply the rule in place to `params`, all of one batch_key and one group, with their
        .grad."""
        raise NotImplementedError

    def run_rule(self, rule: Callable, *args) -> None:
        """rule(*args), through FAST_PATHS[self.fast_path] once fast paths are on."""
        (fast_rule(rule, self.fast_path) if self.fast else rule)(*args)

    def momentum_buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each matrix's state["momentum_buffer"], zeros on first use (made once, not each step)."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return [self.state[p]["momentum_buffer"] for p in params]

    def gradients(self, params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """The gradients the rule starts from (a subclass may precondition them)."""
        return [p.grad for p in params]

    def lr_tensor(self, group: dict, like: torch.Tensor) -> torch.Tensor:
        """group["lr"] as a 0-dim tensor of like's device and dtype, refilled in place each step
        (compiled steps take it as data, so the schedule never recompiles them)."""
        key = (id(group), like.device, like.dtype)
        if key not in self._lr:
            self._lr[key] = torch.empty((), device=like.device, dtype=like.dtype)
        return self._lr[key].fill_(group["lr"])

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            batches: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if self.holds(p) and p.grad is not None:
                    batches.setdefault(self.batch_key(p), []).append(p)
            for ps in batches.values():
                self.update(ps, group)
        if self.world > 1:
            all_gather_owned(self)


def setting_values(settings: dict[str, Setting], args) -> dict:
    """key -> args' value of each setting."""
    return {k: getattr(args, s.name) for k, s in settings.items()}


@optimizer("muon")
class Muon(MatrixOptimizer):
    """Muon (modded-nanogpt b9979e6's OrthogonalNesterov), per matrix:
    buf = m buf + G;  D = G + m buf (Nesterov) or buf;  p -= lr s msign(D),
    s = max(1, rows/cols)^0.5 with shape_scale, else 1. lerp (the optimization track's
    train_gpt_simple.py): buf = lerp(buf, G, 1 - m), D = lerp(G, buf, m) (Nesterov) or buf.
    weight_decay: p <- p (1 - lr wd) first."""
    settings = dict(
        lr=positive("muon_lr", 0.018, "step size"),
        momentum=fraction("muon_momentum", 0.95, "m of buf = m buf + G"),
        nesterov=flag("muon_nesterov", True, "orthogonalize G + m buf (else buf)"),
        coeffs=choice("ns_coeffs", "simple", NS_COEFFS, "Newton-Schulz coefficients (NS_COEFFS)",
                      want=f"a Newton-Schulz set: choose one of {', '.join(NS_COEFFS)}"),
        shape_scale=flag("muon_shape_scale", False, "multiply the step by max(1, rows/cols)^0.5"),
        lerp=flag("muon_lerp", False, "buf = lerp(buf, G, 1 - m), D = lerp(G, buf, m) (track3's)"),
        weight_decay=nonnegative("muon_weight_decay", 0.0, "p <- p (1 - lr wd) before the step"),
    )
    fast_path = "compiled"

    @staticmethod
    def batch_key(p: torch.Tensor) -> tuple:
        return wide_key(p)  # m x n and n x m matrices in one batch

    def update(self, params, group):
        grads, bufs = self.gradients(params, group), self.momentum_buffers(params)
        self.run_rule(Muon.rule, params, grads, bufs, self.lr_tensor(group, params[0]),
                      *Muon.hyper(params, group))

    @staticmethod
    def hyper(params: list[torch.Tensor], group: dict) -> tuple:
        """Muon.rule's arguments after lr: momentum, nesterov, coeffs, scales, lerp,
        weight_decay."""
        return (group["momentum"], group["nesterov"], group["coeffs"], Muon.scales(params, group),
                group["lerp"], group["weight_decay"])

    @staticmethod
    def scales(params: list[torch.Tensor], group: dict) -> list[float]:
        """s per matrix: max(1, rows/cols)^0.5 with shape_scale, else 1."""
        return [max(1.0, p.size(0) / p.size(1)) ** 0.5 if group["shape_scale"] else 1.0
                for p in params]

    @staticmethod
    def rule(params, grads, bufs, lr, momentum, nesterov, coeffs, scales, lerp=False,
             weight_decay=0.0, transform=None) -> None:
        """Muon on matrices of one transposition class: momentum and Nesterov (nesterov_stack:
        buf = m buf + G; D = G + m buf or buf; or their lerp forms), D <- transform(i, D) if given
        (Newton-Muon), O = orthogonalize(D), p <- p (1 - lr wd), p -= lr s O. One graph per class
        when compiled (lr a tensor: the schedule never recompiles it)."""
        D = Muon.nesterov_stack(grads, bufs, momentum, nesterov, transform, lerp)
        O = orthogonalize(D, coeffs).to(params[0].dtype)
        s = torch.tensor(scales, dtype=O.dtype, device=O.device)
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, unstack_like(O * (-lr * s)[:, None, None], params))

    @staticmethod
    def nesterov_stack(grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float,
                       nesterov: bool, transform: Callable | None = None,
                       lerp: bool = False) -> torch.Tensor:
        """buf = m buf + G in place; returns stack_wide of D = G + m buf (Nesterov) or buf, each D
        first through transform(i, D) if given, in NS_DTYPE. lerp: buf = lerp(buf, G, 1 - m),
        D = lerp(G, buf, m) (Nesterov) or buf. Wide matrices one at a time (compiled: one kernel
        each, reading G and buf, writing buf and the bf16 slice); tall ones by foreach ops, then the
        transposing stack."""
        post = transform or (lambda i, x: x)
        xs: list[torch.Tensor | None] = [None] * len(grads)
        tall = [i for i, g in enumerate(grads) if g.size(-2) > g.size(-1)]
        if tall:
            tb, tg = [bufs[i] for i in tall], [grads[i] for i in tall]
            if lerp:
                torch._foreach_lerp_(tb, tg, 1 - momentum)
                ds = torch._foreach_lerp(tg, tb, momentum) if nesterov else tb
            else:
                torch._foreach_mul_(tb, momentum)
                torch._foreach_add_(tb, tg)
                ds = torch._foreach_add(tg, tb, alpha=momentum) if nesterov else tb
            for i, x in zip(tall, ds):
                xs[i] = post(i, x).to(NS_DTYPE)
        for i, (b, g) in enumerate(zip(bufs, grads)):
            if xs[i] is None:
                if lerp:
                    b.lerp_(g, 1 - momentum)
                    d = torch.lerp(g, b, momentum) if nesterov else b
                else:
                    b.mul_(momentum).add_(g)
                    d = torch.add(g, b, alpha=momentum) if nesterov else b
                xs[i] = post(i, d).to(NS_DTYPE)
        return stack_wide(xs)


@optimizer("polargrad")
class PolarGrad(MatrixOptimizer):
    """PolarGrad (Lau, Long & Su 2025, arXiv:2505.21799): Muon's direction scaled by its nuclear
    norm (steepest descent in the spectral norm rather than its LMO):
    M = b M + (1 - b) G;  D = b M + (1 - b) G (Nesterov) or M;  O = orthogonalize(D);
    p = (1 - lr wd) p - lr ||D||_* O,  ||D||_* = nuclear_norm(D, nuclear, O).
    The rule of NVIDIA Emerging-Optimizers' PolarGrad (fd77292): with its default coefficients,
    quintic, and nuclear inner, to 1e-10 in float64 (tests/golden/polargrad.json). The default here,
    polar_express, is not its polar_express: the paper's coefficients with the 1.01 safety factor on
    the norm, where Emerging-Optimizers' are rounded to 4 decimals with none on the norm: their O
    differ by 2-3% (float64, matrices 192 to 3072 wide; tests/test_audit.py)."""
    settings = dict(
        lr=positive("polargrad_lr", 0.3, "step size: best of 0.03 ... 3 "
                    "(records/polargrad-lr-sweep)"),
        momentum=fraction("polargrad_momentum", 0.95, "b of M = b M + (1 - b) G"),
        nesterov=flag("polargrad_nesterov", False, "D = b M + (1 - b) G (else M)"),
        weight_decay=nonnegative("polargrad_weight_decay", 0.0, "decoupled weight decay"),
        nuclear=choice("polargrad_nuclear", "inner", ("exact", "inner"),
                       "||D||_*: exact (eigvalsh) or inner <O, D> (nuclear_norm; README)"),
        coeffs=choice("polargrad_ns_coeffs", "polar_express", NS_COEFFS,
                      "PolarGrad's own set: <O, D> needs O close to U V^T",
                      want=f"a Newton-Schulz set: choose one of {', '.join(NS_COEFFS)}"),
    )
    fast_path = "compiled"
    linear_in_g = True  # ||D||_* O

    @staticmethod
    def batch_key(p: torch.Tensor) -> tuple:
        return wide_key(p)  # m x n and n x m matrices in one batch

    def update(self, params: list[torch.Tensor], group: dict) -> None:
        self.run_rule(PolarGrad.rule, params, self.gradients(params, group),
                      self.momentum_buffers(params),
                      self.lr_tensor(group, params[0]), group["momentum"], group["nesterov"],
                      group["weight_decay"], group["nuclear"], group["coeffs"])

    @staticmethod
    def rule(params, grads, bufs, lr, momentum, nesterov, weight_decay, nuclear, coeffs) -> None:
        """PolarGrad on matrices of one transposition class (the class docstring's formulas)."""
        torch._foreach_lerp_(bufs, grads, 1 - momentum)
        D = stack_wide(torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs)
        O = orthogonalize(D, coeffs)
        scale = nuclear_norm(D, nuclear, O)
        if weight_decay:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        U = unstack_like(O.to(scale.dtype) * (-lr * scale)[:, None, None], params)
        torch._foreach_add_(params, [u.to(p.dtype) for u, p in zip(U, params)])


@optimizer("soap")
class SOAP(MatrixOptimizer):
    """SOAP (Vyas et al. 2024, arXiv:2409.11321): Adam in the eigenbasis of Shampoo's
    preconditioner. Checked against soap.py of the modded-nanogpt SOAP fork
    (nikhilvyas/modded-nanogpt-SOAP 618af27; tests/golden/soap.json: to 1e-10 in float64), which
    keeps the first moment m in the parameter space and projects it into the eigenbasis each step.
    Here m lives in the eigenbasis, as in nikhilvyas/SOAP's soap.py at f42d296 (which maps it back
    and forth at every step), and is carried over only when the basis changes:
    m <- Q_L'^T (Q_L m Q_R^T) Q_R'. The three are one rule: the projection is linear and the bases
    change only at a refresh. Per matrix, with s = shampoo_beta (b2 if < 0):
      first step: L = (1-s) G G^T, R = (1-s) G^T G, (Q_L, Q_R) = eigenbasis(L, R); no update, so G
        never preconditions itself;
      step t = 1, 2, ...: G~ = Q_L^T G Q_R;  m = b1 m + (1-b1) G~;  v = b2 v + (1-b2) G~^2;
        p = p - lr sqrt(1-b2^t)/(1-b1^t) Q_L (m / (sqrt(v) + eps)) Q_R^T;  p = p - lr wd p;
        L = s L + (1-s) G G^T;  R = s R + (1-s) G^T G;
        t % precondition_frequency == 0: refresh.
    A side longer than max_precond_dim gets no preconditioner (Q = I). All state and math in fp32
    (fp64 for fp64 parameters; the refresh's QR in fp64); tf32: the step's fp32 matmuls on TF32
    tensor cores (CUDA; ~1e-3 relative rounding in the rotations, L, R and the power iteration). The
    matrices of one shape keep each state entry stacked (soap_state), so eigh, QR and the rotations
    run batched; self.state[p][name] is a view of p's slice, so state dicts stay per matrix."""
    settings = dict(
        lr=positive("soap_lr", 0.0018, "step size"),
        betas=betas("soap_betas", (0.95, 0.95), "Adam's b1, b2"),
        shampoo_beta=Setting("soap_shampoo_beta", -1.0, "s of L, R = s L + (1-s) G G^T; < 0: "
                             "soap_betas[1]",
                             "in [0, 1), or negative for soap_betas[1]", lambda v, a: v < 1),
        eps=positive("soap_eps", 1e-8, "Adam's eps"),
        weight_decay=nonnegative("soap_weight_decay", 0.0, "decoupled weight decay"),
        precondition_frequency=at_least("soap_precondition_frequency", 10, 1, "steps between basis "
                                        "refreshes"),
        max_precond_dim=at_least("soap_max_precond_dim", 10000, 1, "a longer side gets no "
                                 "preconditioner"),
        tf32=flag("soap_tf32", False, "SOAP's fp32 matmuls on TF32 tensor cores (CUDA; the QR "
                  "stays fp64)"),
    )
    state_like_param = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, **settings):
        super().__init__(params, **settings)
        # (stacked state, group) to refresh now
        self._due: list[tuple[dict[str, torch.Tensor], dict]] = []
        # ids of a batch's params -> (stacked state, the per-matrix views handed to self.state)
        self._stacks: dict[tuple[int, ...], tuple[dict, list[dict[str, torch.Tensor]]]] = {}

    @torch.no_grad()
    def step(self) -> None:
        self._due = []
        super().step()
        if self._due:
            SOAP.refresh(self._due)

    def update(self, params: list[torch.Tensor], group: dict) -> None:
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_step.setdefault(self.state[p].get("step", -1), []).append(p)
        if len(by_step) > 1:  # matrices that missed a step (no grad) are batched apart, each once
            for ps in by_step.values():
                self.update(ps, group)
            return
        (b1, b2), lr = group["betas"], group["lr"]
        s = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else b2
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        G = torch.stack(self.gradients(params, group)).to(dtype)
        S = soap_state(self, params, G, group["max_precond_dim"])
        t = next(iter(by_step)) + 1
        QL, QR = S.get("QL"), S.get("QR")
        with tf32_matmuls(group["tf32"]):
            if t > 0:
                Gr = _rotate(G, QL, QR)
                S["exp_avg"].lerp_(Gr, 1 - b1)
                S["exp_avg_sq"].mul_(b2).addcmul_(Gr, Gr, value=1 - b2)
                adam = S["exp_avg"] / S["exp_avg_sq"].sqrt().add_(group["eps"])
                U = _rotate(adam, QL, QR, back=True)
                torch._foreach_add_(params, list(U.unbind(0)),
                                    alpha=-lr * (1 - b2**t) ** 0.5 / (1 - b1**t))
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            for side, X in (("L", G), ("R", G.mT)):
                # L = s L + (1-s) G G^T, R = s R + (1-s) G^T G, the EMA in the matmul's epilogue
                if side in S:
                    S[side].baddbmm_(X, X.mT, beta=s, alpha=1 - s)
            if t == 0:
                for side in ("L", "R"):
                    if side in S:
                        S["Q" + side].copy_(eigenbasis(S[side]))
            elif t % group["precondition_frequency"] == 0:
                # refreshed in step(), after every batch: one orthonormalize per size
                self._due.append((S, group))
        for p in params:
            self.state[p]["step"] = t

    @staticmethod
    def refresh(due: list[tuple[dict[str, torch.Tensor], dict]]) -> None:
        """The refresh of each stacked state S in `due`: m to the parameter space by the old bases;
        per side (A, o) = power_step(L, Q_L), Q_L = orthonormalize(A) (the same for R), all sides of
        one size orthonormalized as one batch; v = v[o_L, :][:, o_R] (v follows its sorted basis
        vectors); m into the new bases."""
        ms, steps = [], []  # m in the parameter space; (S, side, A = sorted P Q, order)
        for S, group in due:
            with tf32_matmuls(group["tf32"]):
                ms.append(_rotate(S["exp_avg"], S.get("QL"), S.get("QR"), back=True))
                steps += [(S, side, *power_step(S[side], S["Q" + side])) for side in ("L",
                                                                                      "R")
                                                                                      if side in S]
        by_size: dict[int, list[int]] = {}
        for i, (_, _, A, _) in enumerate(steps):
            by_size.setdefault(A.size(-1), []).append(i)
        for idx in by_size.values():
            Qs = orthonormalize(torch.cat([steps[i][2] for i in idx])).split([steps[i][2].size(0)
                                                                              for i in idx])
            for i, Q in zip(idx, Qs):
                S, side, _, o = steps[i]
                S["Q" + side].copy_(Q)
                v = S["exp_avg_sq"]  # its rows (L) or columns (R) follow their sorted basis vectors
                v.copy_(v.gather(-2, o[..., :, None].expand_as(v)) if side == "L" else
                        v.gather(-1, o[..., None, :].expand_as(v)))
        for (S, group), m in zip(due, ms):
            with tf32_matmuls(group["tf32"]):
                S["exp_avg"].copy_(_rotate(m, S.get("QL"), S.get("QR")))


class FeatureGram(MatrixOptimizer):
    """Base of the feature-gram rules: each block matrix W (out x d) is preconditioned on the right
    by the Gram matrix of its layer's input X, C = X^T X / n_tokens (full, block-diagonal or
    diagonal), which the model collects on refresh steps, the steps with (step + gram_phase) %
    gram_every == 0 (GPT.collect_gram). On a refresh, refresh_gram averages the collected sums over
    processes (one all-reduce), keeps C <- beta C + (1 - beta) C_new (beta = 0: replace; C before
    the first refresh: gram_start I, or none) and caches the right preconditioner
    R = factor(C) (batched over the matrices of one shape; stored in the operand dtype of its
    application, gram_low: fp32, or bf16 with gram_apply bf16 on CUDA) for the matrices this
    process owns; each step then costs one matmul per matrix (right_precondition). Before the first
    refresh R is the identity."""
    settings = dict(
        gram=choice("gram", "full", ("full", "block", "diag"),
                    "C full, block-diagonal or diagonal"),
        gram_block=Setting(
            "gram_block", 128, "block size of --gram block",
            lambda a: f"a divisor of every layer's input width ({a.n_embd} and {4 * a.n_embd})",
            lambda v, a: a.gram != "block" or (v >= 1 and a.n_embd % v == 0)),
        gram_every=at_least("gram_every", 8, 1, "steps between refreshes of C (and at step 0)"),
        gram_phase=Setting(
            "gram_phase", 0, "refresh on the steps with (step + phase) % gram_every == 0 (0: steps "
            "0, E, 2E, ...; 1: E - 1, 2E - 1, ..., as the Newton-Muon paper's code)",
            lambda a: f"in [0, {a.gram_every}) (--gram_every)",
            lambda v, a: 0 <= v < a.gram_every),
        gram_beta=fraction("gram_beta", 0.0, "C <- beta C + (1 - beta) C_new; 0: replace"),
        gram_start=nonnegative("gram_start", 0.0, "C before the first refresh: s I (per block), so "
                               "the first C = beta s I + (1 - beta) C_new; 0: the first C_new"),
        gram_apply=choice("gram_apply", "fp32", ("bf16", "fp32"),
                          "G R in fp32 (R stored fp32, IEEE fp32 matmul: the trainer leaves TF32 "
                          "off) or with bf16 operands on CUDA (R stored bf16; fp32 on CPU)"),
    )

    def __init__(self, params, layers: list[nn.Module], **settings):
        super().__init__(params, **settings)
        self.layers = dict(zip([id(p) for p in params], layers))
        assert all(self.layers[id(p)].weight is p for p in self._params())
        # refresh_gram's batches, each with its failure flag, for finish_refresh
        self._pending: list = []
        # set when refresh_gram ran on a side stream
        self._refreshed: torch.cuda.Event | None = None
        # matrices of this process whose Cholesky of C + gamma I failed at the last refresh, by the
        # factor on gamma that held (finish_refresh); the training loop writes them to the record
        # (`gram_fallbacks:`)
        self.fallbacks: dict[int, int] = dict.fromkeys(FALLBACK_BOOSTS, 0)

    @classmethod
    def build(cls, model: nn.Module, args) -> FeatureGram:
        """The rule on the block matrices, with their layers, which collect C from now on
        (GPT.setup_gram)."""
        model.setup_gram(args.gram, args.gram_block)
        layers = model.gram_layers()
        return cls([m.weight for m in layers], layers, **setting_values(cls.declared(), args))

    @property
    def refresh_every(self) -> int:
        return self.param_groups[0]["gram_every"]

    @property
    def refresh_phase(self) -> int:
        return self.param_groups[0]["gram_phase"]

    def damping(self, C: torch.Tensor, group: dict) -> torch.Tensor | float:
        """gamma of C + gamma I, for C batched over its first dim."""
        raise NotImplementedError

    def factor(self, C: torch.Tensor, group: dict, wait: bool = True, boosts: list | None = None):
        """The cached right preconditioner for a batch of C's of one shape (wait, boosts: as
        gram_factor's)."""
        raise NotImplementedError

    def _store_factors(self, ps: list[torch.Tensor], Rs: torch.Tensor, group: dict) -> None:
        for p, R in zip(ps, Rs):
            # stored as right_precondition's operand
            low = gram_low(p, group["gram_apply"]) and group["gram"] != "diag"
            self.state[p]["factor"] = R.bfloat16() if low else R

    def _stacked_grams(self, ps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self.state[p]["gram"] for p in ps])

    def refresh_gram(self, n_tokens: int, stream: torch.cuda.Stream | None = None) -> None:
        """Take the Gram sums the model collected over n_tokens tokens (all processes): C, then the
        cached factors, one attempt per batch without a host sync; finish_refresh() (or the next
        step()) redoes a batch whose Cholesky failed. With a CUDA `stream`, everything after the
        all-reduce is queued on it behind the current stream's work, so the factorization overlaps
        what the current stream does next (the backward)."""
        refresh_gram_factors(self, n_tokens, stream)

    def finish_refresh(self) -> None:
        """Join a refresh_gram(stream=...): the current stream waits for it; a batch whose Cholesky
        failed is redone here with gram_factor's damping boosts (host syncs, only then; LinAlgError
        if C is not finite)."""
        finish_gram_refresh(self)

    def step(self) -> None:
        self.finish_refresh()  # a no-op unless a refresh_gram is still pending
        # not super(): for NewtonMuon that is Muon.step, which torch wraps with the step hooks
        # once a Muon is built, so the hooks would run twice a step
        MatrixOptimizer.step(self)

    def gradients(self, params: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """G R for each matrix that has a factor R; G itself before the first refresh."""
        return [right_precondition(p.grad, self.state[p]["factor"], group["gram"],
                                   gram_low(p, group["gram_apply"]))
                if "factor" in self.state[p] else p.grad for p in params]


@optimizer("newton_muon")
class NewtonMuon(FeatureGram, Muon):
    """Newton-Muon (arXiv:2604.01472): Muon (its settings too) on the right-preconditioned gradient,
    R = (C + gamma I)^-1 (or its square root, f) with gamma = damping tr(C)/d + damping_eps (ridge
    block: on each block C_k of a block-diagonal C its own, damping tr(C_k)/b + damping_eps), R the
    one of the last refresh;
      precondition before:  buf = m buf + G R;  p -= lr s msign(G R + m buf)
                            (Nesterov; msign(buf) without);
      precondition after:   buf = m buf + G;  p -= lr s msign((G + m buf) R)
                            (Nesterov; msign(buf R) without).
    They differ only after a refresh (before: buf's older terms keep their older R). With C = c I
    both are Muon (msign is scale-free). The paper's code (zhehangdu/Newton-Muon) is, per
    tests/golden/newton_muon.json: precondition before, gram block with gram_block = n_embd,
    gram_every 32, gram_phase 1, gram_beta 0.95, gram_start 0.001, gram_ridge block, gram_damping
    0.2, gram_damping_eps 1e-8."""
    settings = dict(
        damping=positive("gram_damping", 0.2, "delta of gamma = delta tr(C)/d"),
        ridge=choice("gram_ridge", "matrix", ("matrix", "block"),
                     "gamma one per matrix, delta tr(C)/d, or per block of --gram block, delta "
                     "tr(C_k)/b (the paper's code)"),
        damping_eps=nonnegative("gram_damping_eps", 0.0,
                                "gamma + eps (the paper's code: 1e-8)"),
        f=choice("gram_f", "solve", ("solve", "inverse_sqrt"),
                 "R = (C + gamma I)^-1 or its square root"),
        precondition=choice("newton_muon_precondition", "before", ("before", "after"),
                            "momentum of G R (before) or of G, msign(D R) (after)"),
    )

    def damping(self, C, group):
        gamma = group["damping"] * trace_over_d(C, group["gram"], group["ridge"] == "block")
        return gamma + group["damping_eps"] if group["damping_eps"] else gamma

    def factor(self, C, group, wait=True, boosts=None):
        return gram_factor(C, self.damping(C, group), group["gram"], group["f"], wait, boosts)

    def update(self, params, group):
        factors = [self.state[p].get("factor") for p in params]
        lr, muon = self.lr_tensor(group, params[0]), Muon.hyper(params, group)
        bufs = self.momentum_buffers(params)
        if not all(f is not None for f in factors):  # before the first refresh: Muon's rule
            return self.run_rule(Muon.rule, params, self.gradients(params, group), bufs, lr, *muon)
        self.run_rule(NewtonMuon.rule, params, [p.grad for p in params], bufs, lr, *muon,
                      factors, group["gram"], group["precondition"], group["gram_apply"])

    @staticmethod
    def rule(params, grads, bufs, lr, momentum, nesterov, coeffs, scales, lerp, weight_decay,
             factors, gram, precondition, apply) -> None:
        """Muon's rule on G R (before), or with D R in place of D (after), G R's operands by
        gram_low(G, apply); in one graph when compiled, so on CUDA the product feeds the momentum
        update (before) or Newton-Schulz (after) directly."""
        muon = (momentum, nesterov, coeffs, scales, lerp, weight_decay)
        low = [gram_low(g, apply) for g in grads]
        if precondition == "before":
            grads = [right_precondition(g, R, gram, lo) for g, R, lo in zip(grads, factors, low)]
            return Muon.rule(params, grads, bufs, lr, *muon)
        return Muon.rule(params, grads, bufs, lr, *muon,
                         lambda i, D: right_precondition(D, factors[i], gram, low[i]))


@optimizer("locoprop")
class LocoPropS(FeatureGram):
    """LocoProp-S (Amid, Anil & Warmuth, AISTATS 2022), square-loss local problems: the layer's
    local loss 1/2 ||X W^T - (X W0^T - eta dY)||^2 + lam/2 ||W - W0||^2 (means over tokens) has
    gradient (W - W0)(C + lam I) + eta G, so with A = C + lam I (lam: lambda, or lambda tr(C)/d with
    lambda_mode relative) its minimizer is dW = -eta G A^-1 (steps = 0), and K inner gradient steps
    of size s = nu / L from W0, with L = eigenvalue_bound(C) + lam >= lambda_max(A), give
    dW = -s eta G sum_{j<K} (I - s A)^j (steps = K). On A's eigenvector i (eigenvalue a_i) that is
    -eta G's component / a_i times 1 - (1 - nu a_i / L)^K: for nu in (0, 2) it converges to the
    minimizer for every C (|1 - nu a_i / L| < 1), for nu <= 1 monotonically in K. (A step nu not
    scaled by 1/L diverges: records/feature-gram-sweep/README.md.) G may first go through heavy-ball
    momentum M = mu M + G. Diagonal and block C give the diagonal and block-diagonal A.
    weight_decay: p <- p (1 - lr wd) first."""
    settings = dict(
        lr=positive("locoprop_lr", 0.3, "eta: best of 0.3 / 1 / 3 (records/feature-gram-sweep)"),
        lam=positive("locoprop_lambda", 1.0, "lambda of C + lambda I"),
        lambda_mode=choice("locoprop_lambda_mode", "absolute", ("absolute", "relative"),
                           "C + lambda I (absolute) or C + lambda tr(C)/d I (relative)"),
        steps=at_least("locoprop_steps", 0, 0,
                       "0: the exact minimizer; K: K inner steps of size nu / L"),
        nu=Setting("locoprop_nu", 1.0, "the inner step nu / L, L >= lambda_max(C + lambda I)",
                   "in (0, 2) (the inner step is locoprop_nu / L, L >= lambda_max(C + lambda I))",
                   lambda v, a: 0 < v < 2),
        momentum=fraction("locoprop_momentum", 0.0, "heavy-ball momentum on G; 0: none"),
        weight_decay=nonnegative("locoprop_weight_decay", 0.0, "p <- p (1 - lr wd) before the "
                                 "step"),
    )
    linear_in_g = True  # eta G A^-1

    def damping(self, C, group):
        """lambda of A = C + lambda I: absolute, the setting itself; relative, setting * tr(C)/d
        per matrix."""
        if group["lambda_mode"] == "relative":
            return group["lam"] * trace_over_d(C, group["gram"])
        return group["lam"]

    def factor(self, C, group, wait=True, boosts=None):
        """A^-1 (steps = 0) or the K-step polynomial P_K (inner_steps_polynomial)."""
        lam = self.damping(C, group)
        if group["steps"] == 0:
            return gram_factor(C, lam, group["gram"], "solve", wait, boosts)
        step = group["nu"] / (eigenvalue_bound(C, group["gram"]) + lam)
        P = inner_steps_polynomial(C, lam, step, group["steps"], group["gram"])
        return cannot_fail(P, wait)

    def update(self, params, group):
        grads = [p.grad for p in params]
        if group["momentum"]:
            bufs = self.momentum_buffers(params)
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            grads = bufs
        # G R, the identity before the first refresh
        dirs = [right_precondition(g, self.state[p]["factor"], group["gram"],
                                   gram_low(p, group["gram_apply"]))
                if "factor" in self.state[p] else g for p, g in zip(params, grads)]
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, dirs, alpha=-group["lr"])


@optimizer("adamw")
class AdamW:
    """torch's AdamW on the block matrices (fused on CUDA): the control. A declaration, not a class
    of its own: build returns a torch.optim.AdamW."""
    settings = dict(
        lr=positive("adamw_lr", 0.0018, "step size"),
        betas=betas("adamw_betas", (0.9, 0.95), "b1, b2"),
        weight_decay=nonnegative("adamw_weight_decay", 0.0, "decoupled weight decay"),
    )

    @classmethod
    def declared(cls) -> dict[str, Setting]:
        return cls.settings

    @classmethod
    def build(cls, model: nn.Module, args) -> torch.optim.AdamW:
        fused = next(model.parameters()).is_cuda
        return torch.optim.AdamW(model.block_matrices(), fused=fused,
                                 **setting_values(cls.settings, args))


# The fast paths a rule may name (its `fast_path`): how its `rule` function runs once fast paths
# are on, on CUDA with --compile 1 (compile_for_cuda). "compiled": torch.compile, one graph per
# transposition class (compile_rule). A rule with a fast path of its own adds it here.
FAST_PATHS: dict[str, Callable[[Callable], Callable]] = {
    "eager": lambda rule: rule,
    "compiled": lambda rule: compile_rule(rule),
}


def fast_rule(rule: Callable, path: str) -> Callable:
    """FAST_PATHS[path](rule), made once per process."""
    if (rule, path) not in FAST_RULES:
        FAST_RULES[rule, path] = FAST_PATHS[path](rule)
    return FAST_RULES[rule, path]


FAST_RULES: dict[tuple[Callable, str], Callable] = {}


# the AdamW on the model's other parameters (whatever --optimizer is): its adam_groups, the 2024
# model's tied embedding/head; track3's embedding, head and 1-D parameters
EMBEDDING = dict(
    lr=positive("embed_lr", 0.0018, "the embedding/head's AdamW step size"),
    betas=betas("embed_betas", (0.9, 0.95), "the embedding/head's AdamW b1, b2"),
    eps=positive("embed_eps", 1e-8, "the embedding/head's AdamW eps"),
    weight_decay=nonnegative("embed_weight_decay", 0.0, "the embedding/head's AdamW weight decay"),
    head_lr=positive("head_lr", 0.004, "track3: its untied head's AdamW step size"),
    scalar_lr=positive("scalar_lr", 0.015, "track3: every 1-D parameter's AdamW step size"),
)


def build_optimizers(model: nn.Module, args) -> list[torch.optim.Optimizer]:
    """[AdamW on the model's adam_groups, the --optimizer rule on its block_matrices (every matrix
    inside the blocks)]; each group's base_lr is its lr, which the schedule multiplies. With the
    model's loss_sum, G is a sum over the step's n = batch_size x sequence_length tokens: a
    linear_in_g rule takes lr / n and weight_decay x n (the others are scale-free but for their
    eps)."""
    rule = optimizer_class(args.optimizer)
    fused = next(model.parameters()).is_cuda
    embed = torch.optim.AdamW(model.adam_groups(args), betas=args.embed_betas, eps=args.embed_eps,
                              weight_decay=args.embed_weight_decay, fused=fused)
    blocks = rule.build(model, args)
    if model.loss_sum and getattr(rule, "linear_in_g", False):  # AdamW's declaration has none
        n = args.batch_size * args.sequence_length
        for g in blocks.param_groups:
            g["lr"], g["weight_decay"] = g["lr"] / n, g["weight_decay"] * n
    for opt in (embed, blocks):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [embed, blocks]


def declared_settings() -> list[Setting]:
    """Every optimizer setting: the embedding's, then each rule's, each name once."""
    found: dict[str, Setting] = {s.name: s for s in EMBEDDING.values()}
    for cls in OPTIMIZERS.values():
        for s in cls.declared().values():
            assert found.setdefault(s.name, s) is s, f"--{s.name} declared twice"
    return list(found.values())


def check_optimizer_args(args) -> None:
    """Refuse an unknown --optimizer, and any optimizer setting out of its declared range
    (Setting.refusal)."""
    optimizer_class(args.optimizer)
    for s in declared_settings():
        refusal = s.refusal(args)
        if refusal:
            raise SystemExit(refusal)


# Every setting: the run's (RunSettings) and each optimizer's, as declared above
Hyperparameters = dataclasses.make_dataclass(
    "Hyperparameters", [(s.name, s.kind, dataclasses.field(default=s.default))
                        for s in declared_settings()], bases=(RunSettings,))
Hyperparameters.__module__ = __name__
Hyperparameters.__doc__ = "Every setting: RunSettings' fields, then each optimizer's (Setting)."

# ----------------------------------------------------------------------------- model


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + 1e-6), in fp32, no weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)


class Linear(nn.Linear):
    """nn.Linear (bias-free unless asked) that, while `collect` is on, also adds the Gram matrix
    X^T X of its input into its `gram` buffer (GPT.setup_gram makes it; see gram_sum). With
    `collect` off it is nn.Linear: no extra kernels."""

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__(d_in, d_out, bias=bias)
        self.collect, self.gram_mode = False, "full"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.collect_input(x)
        return super().forward(x)

    def collect_input(self, x: torch.Tensor) -> None:
        """While `collect` is on: gram += X^T X of this layer's input x as the matmul takes it:
        under autocast, x cast to its dtype (the cast the matmul makes, which torch.compile
        shares)."""
        if self.collect:
            self.add_gram(gram_sum(x.to(matmul_dtype(x)), self.gram_mode, self.gram_blocks()))

    def gram_blocks(self) -> int:
        return self.gram.size(0) if self.gram_mode == "block" else 1

    @torch.no_grad()
    def add_gram(self, part: torch.Tensor) -> None:
        self.gram += part


class Rotary(nn.Module):
    """cos, sin of t * inv_freq with inv_freq = 1 / 10000^(arange(0, d, 2) / d) (or the given
    inv_freq) for t < max_len, made once in fp32 as buffers (not saved; why:
    records/speed/README.md, Measurements behind the code)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0,
                 inv_freq: torch.Tensor | None = None):
        super().__init__()
        if inv_freq is None:
            inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin()[None, :, None, :], persistent=False)

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.cos.size(1):
            raise ValueError(f"sequence of {T} tokens: the rotary tables hold {self.cos.size(1)} "
                             "(--sequence_length)")
        return self.cos[:, :T], self.sin[:, :T]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x (B, T, H, D): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], 3).type_as(x)


# --attention: the scaled_dot_product_attention kernel (None: PyTorch's own choice, flash on Hopper
# in bf16)
ATTENTION_BACKENDS = {"auto": None, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "flash": SDPBackend.FLASH_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, max_len: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Linear(n_embd, 3 * n_embd)  # q, k and v share one input, so one Gram matrix
        self.c_proj = Linear(n_embd, n_embd)
        self.rotary = Rotary(n_embd // n_head, max_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        cos, sin = self.rotary(T)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def gelu_linear(h: torch.Tensor, w: torch.Tensor, gram_mode: str | None = None,
                gram_blocks: int = 1):
    """gelu(h) W^T: the MLP's second half, one checkpointed region when GELU is recomputed; with
    gram_mode also gram_sum(gelu(h)), c_proj's input Gram from the same GELU (a refresh step of the
    feature-gram optimizers)."""
    g = F.gelu(h)
    y = F.linear(g, w)
    return y if gram_mode is None else (y, gram_sum(g, gram_mode, gram_blocks))


class MLP(nn.Module):
    """c_proj(gelu(c_fc(x))). recompute: GELU's output is not saved for c_proj's weight gradient
    but recomputed from c_fc's output in the backward: GELU and c_proj's matmul as one checkpointed
    region, which torch.compile's partitioner honours (the backward recomputes GELU, not the matmul;
    eager autograd still saves GELU's output). In the region c_proj is F.linear on its weight, not a
    module call: forward hooks on it fire only with recompute off. On refresh steps of the
    feature-gram rules the region also returns the Gram sum of GELU's output, from the same GELU.
    Why one region: records/speed/README.md."""

    def __init__(self, n_embd: int, recompute: bool = False):
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd)
        self.c_proj = Linear(4 * n_embd, n_embd)
        self.recompute = recompute

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.recompute and torch.is_grad_enabled():
            proj = self.c_proj
            if not proj.collect:
                return checkpoint(gelu_linear, h, proj.weight, use_reentrant=False)
            y, part = checkpoint(gelu_linear, h, proj.weight, proj.gram_mode, proj.gram_blocks(),
                                 use_reentrant=False)
            proj.add_gram(part)
            return y
        return self.c_proj(F.gelu(h))


class Block(nn.Module):
    """x = x + attn(norm(x)) / sqrt(2 n_layer); x = x + mlp(norm(x))."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.attn = CausalSelfAttention(args.n_embd, args.n_head, args.sequence_length)
        self.mlp = MLP(args.n_embd, args.recompute_gelu)
        self.attn_scale = 1 / math.sqrt(2 * args.n_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """Token embedding tied to lm_head (Linear init), rotary attention, no positional embedding,
    biases or norm weights. The loss is the mean over tokens; the optimizers take the mean's
    gradient (loss_sum False)."""
    loss_sum = False

    @staticmethod
    def refusal(args: Hyperparameters) -> str:
        """'' if the model can be built with args, else the one-line refusal (validate_args)."""
        return ""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(args.vocab_size, args.n_embd),
            h=nn.ModuleList([Block(args) for _ in range(args.n_layer)]),
        ))
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        # tied, as upstream: the Linear's init wins
        self.transformer.wte.weight = self.lm_head.weight
        self.loss_chunk = args.loss_chunk
        make_loss_eager()

    def adam_groups(self, args: Hyperparameters) -> list[dict]:
        """The AdamW's parameter groups (build_optimizers): the tied embedding/head at embed_lr."""
        return [dict(params=[self.lm_head.weight], lr=args.embed_lr)]

    def block_matrices(self) -> list[nn.Parameter]:
        """What --optimizer updates: every parameter inside the blocks (all matrices)."""
        return list(self.transformer.h.parameters())

    def gram_layers(self) -> list[Linear]:
        """The block matrices' layers, in parameter order; each one's input Gram matrix
        preconditions its weight."""
        return [m for m in self.transformer.h.modules() if isinstance(m, Linear)]

    def setup_gram(self, mode: str, block: int) -> None:
        """A zeroed fp32 `gram` buffer on every block layer: (d, d) full, (d/block, block, block)
        block, (d,) diag.
        Not persistent: collected C lives in the optimizer's state."""
        for m in self.gram_layers():
            d = m.in_features
            shape = {"full": (d, d), "block": (d // block, block, block), "diag": (d,)}[mode]
            m.register_buffer("gram", torch.zeros(shape, device=m.weight.device), persistent=False)
            m.gram_mode = mode

    def collect_gram(self, on: bool) -> None:
        """Turn collection on (after zeroing the buffers) or off (the sums complete:
        symmetric_gram), for every block layer."""
        for m in self.gram_layers():
            if on:
                m.gram.zero_()
            elif m.collect:
                symmetric_gram(m.gram, m.gram_mode)
            m.collect = on

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all tokens, logits in fp32."""
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        x = rms_norm(x)
        if self.loss_chunk:  # the same loss without the (B T) x V logits
            return linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight,
                                        targets.view(-1),
                                        self.loss_chunk)
        logits = self.lm_head(x).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


# --model track3: the optimization track's GPT (modded-nanogpt
# records/track_3_optimization/train_gpt_simple.py at f411b3d): all that differs from GPT above is
# in the five classes below; Linear, Rotary, the Gram collection, the data and the training loop are
# shared. Its original runs every activation in bf16 (a bf16 embedding); here the weights are fp32
# under bf16 autocast on CUDA, and the norms take the eps torch gives the original's bf16 (RMSNorm).


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * gains, eps = torch's default for the dtype the matmuls take x in
    (finfo.eps: 2^-7 under bf16 autocast, as the original's bf16 activations get; fp32's on CPU)."""

    def __init__(self, d: int):
        super().__init__()
        self.gains = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(matmul_dtype(x)).eps
        return F.rms_norm(x, (x.size(-1),), self.gains.type_as(x), eps=eps)


class Track3Attention(nn.Module):
    """q, k, v, proj with biases; q and k RMS-normed (no gains); rotary of d/2 frequencies (d the
    head dim), (1/1024)^(i / (d/4 - 1)) for i < d/4 and 0 for the other d/4 (their pairs not
    rotated); softmax scale 0.12."""

    def __init__(self, n_embd: int, n_head: int, max_len: int):
        super().__init__()
        self.n_head, d = n_head, n_embd // n_head
        self.q, self.k, self.v, self.proj = (Linear(n_embd, n_embd, bias=True) for _ in range(4))
        freqs = (1 / 1024) ** torch.linspace(0, 1, steps=d // 4, dtype=torch.float32)
        self.rotary = Rotary(d, max_len, inv_freq=torch.cat([freqs, freqs.new_zeros(d // 4)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (m(x).view(B, T, self.n_head, C // self.n_head) for m in (self.q, self.k, self.v))
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        cos, sin = self.rotary(T)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=0.12, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Track3MLP(nn.Module):
    """proj(relu(fc(x))^2), both with biases."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.fc = Linear(n_embd, 4 * n_embd, bias=True)
        self.proj = Linear(4 * n_embd, n_embd, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Track3Block(nn.Module):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x)) (norms with gains, no residual scale)."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.attn = Track3Attention(args.n_embd, args.n_head, args.sequence_length)
        self.mlp = Track3MLP(args.n_embd)
        self.norm1, self.norm2 = RMSNorm(args.n_embd), RMSNorm(args.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Track3GPT(GPT):
    """The track's model: untied embedding and head (with a bias), RMSNorm with gains on the
    embedding's output and before the head, Track3Blocks, logits soft-capped 15 z / sqrt(z^2 +
    15^2), in fp32. Init: every proj weight (attention's, the MLP's) and the head zero, the
    embedding N(0, 1), other weights N(0, 0.33 / fan_in), biases 0, gains 1. Its original sums the
    loss over tokens: the forward returns the mean, and the trainer's backward takes the sum
    (loss_sum), so the optimizers see the original's gradient. AdamW groups: the embedding
    (embed_lr), the head (head_lr), every 1-D parameter (scalar_lr); --optimizer updates the blocks'
    matrices."""
    loss_sum = True

    @staticmethod
    def refusal(args: Hyperparameters) -> str:
        """A head dim divisible by 4 (the rotary uses a quarter of it)."""
        if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 4:
            return (f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head} with a "
                    f"head dim divisible by 4 (--model track3's rotary uses a quarter of it)")
        return ""

    def __init__(self, args: Hyperparameters):
        nn.Module.__init__(self)
        d = args.n_embd
        blocks = nn.ModuleList([Track3Block(args) for _ in range(args.n_layer)])
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(args.vocab_size, d), h=blocks))
        self.lm_head = nn.Linear(d, args.vocab_size, bias=True)
        self.norm_in, self.norm_out = RMSNorm(d), RMSNorm(d)
        self.loss_chunk = args.loss_chunk
        make_loss_eager()
        zero = {id(m.weight) for b in blocks for m in (b.attn.proj, b.mlp.proj)}
        zero.add(id(self.lm_head.weight))
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("gains"):
                    p.fill_(1)
                elif name.endswith("bias") or id(p) in zero:
                    p.zero_()
                elif p is self.transformer.wte.weight:
                    p.normal_()
                else:
                    p.normal_(std=0.33**0.5 / p.size(-1)**0.5)

    def adam_groups(self, args: Hyperparameters) -> list[dict]:
        """The embedding at embed_lr, the head at head_lr, every 1-D parameter at scalar_lr."""
        return [dict(params=[self.transformer.wte.weight], lr=args.embed_lr),
                dict(params=[self.lm_head.weight], lr=args.head_lr),
                dict(params=[p for p in self.parameters() if p.ndim < 2], lr=args.scalar_lr)]

    def block_matrices(self) -> list[nn.Parameter]:
        """The blocks' matrices (their biases and gains are adam_groups')."""
        return [p for p in self.transformer.h.parameters() if p.ndim >= 2]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of cross-entropy(15 z / sqrt(z^2 + 15^2)), z the head's fp32 logits
        (with loss_chunk: the fused loss, soft cap and bias included, without the logits)."""
        x = self.norm_in(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x)
        x = self.norm_out(x)
        if self.loss_chunk:
            return linear_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight,
                                        targets.view(-1), self.loss_chunk, self.lm_head.bias, 15.0)
        z = self.lm_head(x).float()
        z = 15 * z * (z.square() + 15**2).rsqrt()
        return F.cross_entropy(z.view(-1, z.size(-1)), targets.view(-1))


MODELS = {"gpt2": GPT, "track3": Track3GPT}  # --model

# ----------------------------------------------------------------------------- data


SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


FIX_FINEWEB = "python data/cached_fineweb10B.py  (or data/fineweb.py to tokenize your own text)"


class ShardError(ValueError):
    def __init__(self, path: str, fault: str, fix: str = FIX_FINEWEB):
        super().__init__(f"{path}: {fault}\n  fix: {fix}")


def shard_token_count(path: str) -> int:
    """Token count from a shard's 256-int32 header (magic 20240520, version 1, count), checked
    against the file size."""
    if not os.path.isfile(path):
        raise ShardError(path, "not a file (a folder?): the pattern must match shard files, e.g. "
                         "'dir/*_train_*.bin'")
    try:
        size = os.path.getsize(path)
        if size < HEADER_INTS * 4:
            raise ShardError(path, f"{size} bytes, shorter than the {HEADER_INTS * 4}-byte header")
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    except OSError as e:
        raise ShardError(path, f"cannot read it ({e.strerror or e})") from None
    if header[0] != SHARD_MAGIC:
        raise ShardError(path, f"magic number {header[0]}, expected {SHARD_MAGIC}: not a "
                         "FineWeb-format shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(path, f"version {header[1]}, expected {SHARD_VERSION}")
    ntok = int(header[2])
    if size != HEADER_INTS * 4 + 2 * ntok:
        raise ShardError(path, f"header says {ntok} tokens ({HEADER_INTS * 4 + 2 * ntok} bytes) "
                         "but the file has "
                               f"{size} bytes: truncated or corrupt; delete it and fetch it again")
    return ntok


def check_shards(pattern: str, min_tokens: int, what: str) -> list[str]:
    """Sorted shard paths matching `pattern`, each with a valid header and at least `min_tokens`
    tokens."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ShardError(pattern, f"no {what} shards match this pattern")
    for f in files:
        if shard_token_count(f) < min_tokens:
            raise ShardError(f, f"{shard_token_count(f)} tokens, fewer than the {min_tokens} one "
                             f"{what} step needs")
    return files


def load_shard(path: str, vocab_size: int) -> np.ndarray:
    """Memory-mapped uint16 tokens of one shard; token ids >= vocab_size are refused (one vectorized
    max over the map)."""
    try:
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4,
                           shape=(shard_token_count(path),))
        top = int(tokens.max()) if len(tokens) else -1
    except OSError as e:
        raise ShardError(path, f"cannot read it ({e.strerror or e})") from None
    if top >= vocab_size:
        raise ShardError(path, f"token id {top} >= vocab size {vocab_size}: not GPT-2 tokens",
                         fix="re-tokenize with data/fineweb.py")
    return tokens


def check_token_ids(files: list[str], vocab_size: int) -> None:
    """Every token id of every shard below vocab_size (load_shard of each), before the first step: a
    bad id in a later shard stops the run here, not at the step that reaches it."""
    for f in files:
        load_shard(f, vocab_size)


class DataLoader:
    """Each step reads one contiguous span of batch_size * T (+1) tokens; micro-step m of process r
    takes sequences [(m W + r) B, (m W + r + 1) B) of it, so any W with W * B * accum = batch_size
    sees the same tokens per step. A span never crosses a shard: the tail of a shard too short for a
    step is skipped, then the next shard starts."""

    def __init__(self, files: list[str], B: int, T: int, rank: int, world: int, accum: int,
                 vocab_size: int,
                 device: torch.device):
        self.files, self.B, self.T = files, B, T
        self.rank, self.world, self.accum = rank, world, accum
        self.vocab_size, self.device = vocab_size, device
        self.span = B * T * world * accum
        self.shard, self.tokens = 0, load_shard(files[0], vocab_size)
        self.pos, self.micro = 0, 0
        self.last = dict(shard=0, pos=0, micro=0)

    def state(self) -> dict[str, int]:
        """Where the batch last returned was read: load_state(state()) makes next_batch() return it
        again."""
        return dict(self.last)

    def load_state(self, state: dict[str, int]) -> None:
        """Continue from a state() (of a loader over the same files; micro 0 if the world size
        differs)."""
        if not 0 <= state["shard"] < len(self.files) or state["micro"] >= self.accum:
            raise ValueError(f"data loader state {state} does not fit {len(self.files)} shards, "
                             "accumulation "
                             f"{self.accum}")
        self.shard, self.pos, self.micro = state["shard"], state["pos"], state["micro"]
        self.tokens = load_shard(self.files[self.shard], self.vocab_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.micro == 0 and self.pos + self.span + 1 > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.files)
            self.tokens, self.pos = load_shard(self.files[self.shard], self.vocab_size), 0
        self.last = dict(shard=self.shard, pos=self.pos, micro=self.micro)
        start = self.pos + (self.micro * self.world + self.rank) * self.B * self.T
        buf = torch.from_numpy(self.tokens[start: start + self.B * self.T + 1].astype(np.int64))
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.pos = 0, self.pos + self.span
        if self.device.type == "cuda":  # pinned + non_blocking: the copy overlaps the GPU's work
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        return x, y


def passes_line(files: list[str], args: Hyperparameters) -> str:
    """How often the run reads its train data: a pass is sum over shards of (tokens - 1) // span
    steps (DataLoader skips each shard's tail), span = batch_size * sequence_length; passes =
    num_iterations / that. Above 1, the steps after the first pass repeat tokens."""
    span = args.batch_size * args.sequence_length
    counts = [shard_token_count(f) for f in files]
    per_pass = sum((n - 1) // span for n in counts)
    passes = args.num_iterations / per_pass
    return (f"train data: {sum(counts)} tokens in {len(files)} shard{'s' * (len(files) > 1)} for "
            f"{args.num_iterations * span} tokens of steps: {passes:.2f} passes"
            + (f" (steps after {per_pass} read the same tokens again)" if passes > 1 else ""))


def load_val_tokens(files: list[str], val_tokens: int, vocab_size: int) -> np.ndarray:
    """The first val_tokens + 1 tokens of the val shards, in order (read once per run)."""
    parts, have = [], 0
    for f in files:
        parts.append(np.array(load_shard(f, vocab_size)[: val_tokens + 1 - have]))
        have += len(parts[-1])
        if have == val_tokens + 1:
            break
    return np.concatenate(parts)


def val_batches(tokens: np.ndarray, B: int, T: int, rank: int, world: int, device: torch.device):
    """Batches of B sequences of `tokens`; process r takes batches r, r + W, ...: the same tokens
    whatever W."""
    for i in range(rank, (len(tokens) - 1) // (B * T), world):
        buf = torch.from_numpy(tokens[i * B * T: (i + 1) * B * T + 1].astype(np.int64)).to(device)
        yield buf[:-1].view(B, T), buf[1:].view(B, T)

# ----------------------------------------------------------------------------- training


def train(args: Hyperparameters) -> tuple[str, nn.Module]:
    """Train, validate, write a record and checkpoints; returns the record's path on process 0 (''
    elsewhere) and the model. Per step: a validation when due (val_due),
    `accum` micro-batches forward and backward, the schedule, every optimizer's step, the divergence
    check, the record's step line, a checkpoint when due. Stops early on SIGTERM/SIGINT with a
    checkpoint (exit code 128 + the signal; a second SIGINT: at once, without), and when the train
    loss, a parameter or a Gram factor stops being finite, without one (exit code 1; the record says
    diverged)."""
    with StopSignals() as signals, Determinism(args.deterministic) as determinism, run_errors(), \
            contextlib.ExitStack() as held:
        # processes, then every check before a model is built or a step taken
        rank, world, device = setup_distributed()
        master, cuda = rank == 0, device.type == "cuda"
        accum = validate_args(args, world)
        check_attention(args, device)
        B, T = args.device_batch_size, args.sequence_length
        train_files, val_files, resume, meta = check_inputs(args, world)
        val_tokens = load_val_tokens(val_files, args.val_tokens, args.vocab_size)
        step_tokens = args.batch_size * T  # over every process
        run_name = [record_name(args) if master else ""]
        if world > 1:
            dist.broadcast_object_list(run_name, src=0)

        # the seeded model and its optimizers (the rule on the block matrices: blocks), the data,
        # the checkpoints; numpy's and python's seeds too, so a checkpoint's RNG states reproduce
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        model = raw_model = MODELS[args.model](args).to(device)
        optimizers = build_optimizers(raw_model, args)  # before compiling: they may add buffers
        blocks = optimizers[1]
        gram_every = getattr(blocks, "refresh_every", 0)  # torch's AdamW has none
        gram_phase = getattr(blocks, "refresh_phase", 0)
        loader = DataLoader(train_files, B, T, rank, world, accum, args.vocab_size, device)
        record_path = (checkpoint_record(resume, meta, args.records_dir) if resume else
                       os.path.join(args.records_dir, run_name[0] + ".txt"))
        folder = (os.path.dirname(resume) if resume else
                  os.path.join(checkpoint_root(args), run_name[0]))
        # room for one checkpoint (a stop signal saves one), once the model is known to fit
        check_room(os.path.dirname(folder), checkpoint_floor(args))
        if resume and master:  # one run at a time continues a record (released when the run ends)
            held.enter_context(run_lock(folder))
        checkpoints = Checkpoints(folder, args, rank, world, device, raw_model, optimizers, loader,
                                  record_path if master else "", train_files, val_files)
        signals.last = lambda: checkpoints.last
        progress = (checkpoints.load(resume) if resume else
                    dict(step=0, training_ms=0.0, timed_steps=0, losses=[]))

        # the record (written once the load succeeded), then how steps run: compiled, DDP, autocast
        record = Record(args, world, device, record_path, resume) if master else None
        log = record.log if master else (lambda *a, **k: None)
        log(f"world_size {world}, device_batch {B} x {T}, accumulation {accum}, "
            f"{args.batch_size * T} tokens/step")
        log(passes_line(train_files, args))
        log(determinism.describe())
        determinism.attach(log)
        if cuda and args.compile:
            model = compile_for_cuda(model, args, optimizers)
        if world > 1:  # buffers (the Gram sums) stay per process until refresh_gram reduces them
            model = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda else
                    contextlib.nullcontext())
        backends = DETERMINISTIC_ATTENTION if args.deterministic else ATTENTION_BACKENDS
        backend = backends[args.attention]
        attention = ((lambda: sdpa_kernel(backend)) if backend is not None else
                     contextlib.nullcontext)
        # a high-priority side stream for the Gram factors (refresh_gram): their small kernels slot
        # in between the backward's
        overlap = cuda and args.gram_overlap and gram_every
        gram_stream = torch.cuda.Stream(priority=-1) if overlap else None
        # all optimizers; the block matrices' rule alone
        opt_timer, blocks_timer = Timer(cuda), Timer(cuda)

        losses = progress["losses"]
        rate_before = matmul_rate(device, world) if args.matmul_check else 0.0  # on a cool GPU
        x, y = loader.next_batch()
        clock = Clock(progress, cuda)
        for step in range(progress["step"], args.num_iterations + 1):
            last = step == args.num_iterations or step == args.stop_at > 0
            clock.start_step(step)
            if last or val_due(step, args):
                clock.pause(step)
                val_loss = mean_val_loss(model, val_tokens, args, rank, world, device, autocast,
                                         attention)
                log(f"step:{step}/{args.num_iterations} val_loss:{val_loss:.4f} {clock.line(step)}")
                clock.resume(sync=True)
            if last:
                break

            # accum micro-batches forward and backward; on a refresh step the block layers also
            # collect their input's Gram C, factored during the last backward (on gram_stream)
            train_loss = torch.zeros((), device=device)
            refresh = gram_every > 0 and (step + gram_phase) % gram_every == 0
            if refresh:
                raw_model.collect_gram(True)
            for micro in range(accum):
                reduce = world == 1 or micro == accum - 1  # DDP all-reduces the last backward only
                with contextlib.nullcontext() if reduce else model.no_sync():
                    with autocast, attention():
                        loss = model(x, y)
                    if refresh and micro == accum - 1:  # C is complete
                        raw_model.collect_gram(False)
                        blocks.refresh_gram(n_tokens=args.batch_size * args.sequence_length,
                                            stream=gram_stream)
                    x, y = loader.next_batch()  # the next batch is read while the GPU works
                    # the gradient of the step's mean loss, or of its sum (loss_sum)
                    scaled = loss * step_tokens if raw_model.loss_sum else loss
                    with determinism.backward():
                        (scaled / accum).backward()
                train_loss += loss.detach() / accum

            # the schedule, then every optimizer's step
            mult = lr_multiplier(step, args)
            opt_timer.start()
            refresh_error = ""
            if refresh:
                try:
                    blocks.finish_refresh()
                except torch.linalg.LinAlgError as e:  # C is not finite: a divergence, see below
                    refresh_error = str(e)
            for opt in optimizers:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
                if opt is blocks:
                    blocks_timer.start()
                opt.step()
            blocks_timer.stop()
            opt_timer.stop()
            model.zero_grad(set_to_none=True)

            # what every process agrees on (one all-reduce), then the record's lines and a
            # checkpoint when due
            out = agree(train_loss, refresh_error, signals.signum > 0, refresh, blocks, raw_model,
                        world, device)
            if not (math.isfinite(out.train_loss) and out.finite) or out.refresh_failed:
                why = out.refresh_error or ("a Gram refresh failed on another process"
                                            if out.refresh_failed else "")
                stop_diverged(step + 1, out.train_loss, why, raw_model, optimizers, args, record,
                              checkpoints.last)
            losses.append(out.train_loss)
            done = step + 1
            if sum(out.fallbacks):
                log(fallbacks_line(done, args, out.fallbacks, blocks))
            log(f"step:{done}/{args.num_iterations} train_loss:{out.train_loss:.4f} "
                f"{clock.line(step, done)} opt_ms:{opt_timer.ms():.2f} "
                f"blocks_ms:{blocks_timer.ms():.2f}")
            at_end = done in (args.num_iterations, args.stop_at)  # saved after the last lines
            stop = out.stop and not at_end  # a signal in the last step: the run ends as planned
            if stop or (args.save_every and done % args.save_every == 0 and not at_end):
                clock.pause(step)  # saving is not training time
                save_logged(checkpoints, done, clock.progress(done, losses), args, log)
                clock.resume()
            if stop:
                how = (signal.Signals(signals.signum).name if signals.signum else
                       "a signal to another process")
                log(f"stopped: step:{done}/{args.num_iterations} by {how}; "
                    f"{resume_hint(checkpoints.last)}")
                if record is not None:
                    record.close()
                raise SystemExit(128 + (signals.signum or signal.SIGTERM))

        # the closing lines (model FLOP rate, the MFU, params_sha256), then the last checkpoint: a
        # failed save loses no result
        timed = clock.timed(step)
        if timed > 0:  # the loop ended on a validation: clock.ms holds every timed step
            tokens = args.batch_size * T * timed
            log(f"model_flops: {flops_per_token(args) / 1e9:.4f} GFLOP/token, "
                f"{flops_per_token(args) * tokens / clock.ms / 1e9:.1f} TFLOP/s")
            if args.matmul_check:
                log(matmul_check(args, clock.ms / timed, device, world, rate_before))
        log(f"params_sha256: {params_digest(raw_model)}")
        due = args.save_every and step % args.save_every == 0
        if args.final_checkpoint or step == args.stop_at > 0 or due:
            save_logged(checkpoints, step, clock.progress(step, losses), args, log)
        if step == args.stop_at > 0:
            log(f"stopped: step:{step}/{args.num_iterations} by --stop_at; "
                f"{resume_hint(checkpoints.last)}")
        if world > 1:  # once train returns, what process 0 published is there for every process
            dist.barrier()
        if record is None:
            return "", raw_model
        record.finish(torch.cuda.max_memory_allocated() // 2**20 if cuda else  # CPU: peak RSS
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        return record.path, raw_model


# ==============================================================================================
# Below here, nothing a rule author needs: the speed machinery (kernels, blocked linear algebra,
# the fused loss, stacking), then the run's infrastructure (checks, checkpoints, determinism,
# signals, records, MFU).
# ==============================================================================================


# ----------------------------------------------------------------------------- speed machinery


# what Newton-Schulz runs in (the momentum rule hands it its input already cast)
NS_DTYPE = torch.bfloat16


# syrk's tiles (BS x BS outputs, BK-deep loads)
SYRK_TILE = dict(BS=128, BK=64, num_warps=8, num_stages=3)


if triton is not None:
    @triton.jit
    def _syrk_kernel(X, C, M, K, sxb, sxm, sxk, scb, scm, scn, BS: tl.constexpr, BK: tl.constexpr):
        """C[b] = X[b] X[b]^T for X (B, M, K): program (i, j, b) computes output tile (i, j) only if
        i <= j, in fp32, and stores it at (i, j) and, transposed, at (j, i)."""
        i, j, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if i > j:
            return
        X += b.to(tl.int64) * sxb
        C += b.to(tl.int64) * scb
        rm, rn, rk = i * BS + tl.arange(0, BS), j * BS + tl.arange(0, BS), tl.arange(0, BK)
        # rows of tile i and of tile j, each read along K
        pa = X + rm[:, None] * sxm + rk[None, :] * sxk
        pb = X + rn[:, None] * sxm + rk[None, :] * sxk
        acc = tl.zeros((BS, BS), tl.float32)
        for k in range(0, K, BK):
            in_k = rk[None, :] < K - k
            a = tl.load(pa, mask=(rm[:, None] < M) & in_k, other=0.0)
            bt = tl.load(pb, mask=(rn[:, None] < M) & in_k, other=0.0)
            acc = tl.dot(a, tl.trans(bt), acc)
            pa += BK * sxk
            pb += BK * sxk
        out = acc.to(C.dtype.element_ty)
        mask = (rm[:, None] < M) & (rn[None, :] < M)
        tl.store(C + rm[:, None] * scm + rn[None, :] * scn, out, mask=mask)
        if i != j:
            tl.store(C + rn[:, None] * scm + rm[None, :] * scn, tl.trans(out), mask=tl.trans(mask))


def syrk(X: torch.Tensor) -> torch.Tensor:
    """X X^T for X (B, m, k), in X's dtype with fp32 accumulation. With Triton, on CUDA (or
    interpreted): only the t(t+1)/2 tiles on and above the diagonal of the t x t tile grid (t =
    ceil(m / BS)) are multiplied, each stored twice, 58% of the products for m = 768 (t = 6), for
    bf16 and fp16 X; else X @ X^T (fp32 included, where Triton's dot would round to TF32)."""
    half = X.is_cuda and X.dtype in (torch.bfloat16, torch.float16)
    if triton is None or not (half or TRITON_INTERPRETED):
        return half_mm(X, X.mT)
    X = X if X.stride(-1) == 1 else X.contiguous()  # the kernel reads rows along K
    B, M, K = X.shape
    C = torch.empty(B, M, M, dtype=X.dtype, device=X.device)
    t = triton.cdiv(M, SYRK_TILE["BS"])
    _syrk_kernel[(t, t, B)](X, C, M, K, *X.stride(), *C.stride(), **SYRK_TILE)
    return C


def half_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation, in a's dtype. On CPU, bf16/fp16 operands are multiplied in fp32
    and the result rounded once (a product of two bf16 or fp16 numbers is exact in fp32: the same up
    to the order of the sums): CPU half GEMMs without AVX-512 BF16 are over 100x slower
    (records/speed/README.md)."""
    if a.is_cuda or a.dtype not in (torch.bfloat16, torch.float16):
        return a @ b
    return (a.float() @ b.float()).to(a.dtype)


def bf16_operands(G: torch.Tensor) -> bool:
    """Whether --gram_apply bf16 multiplies in bf16: on CUDA (there a bf16 matmul)."""
    return G.is_cuda


def gram_low(G: torch.Tensor, apply: str) -> bool:
    """Whether the feature-gram rules apply R (G R, right_precondition) with bf16 operands:
    --gram_apply bf16 where bf16_operands (CUDA). fp32: R kept fp32 and G R an IEEE fp32 matmul
    (fp64 for fp64 G), not TF32: nothing in the trainer sets torch.backends.cuda.matmul.allow_tf32
    outside SOAP's tf32_matmuls. Each one's error on real gradients and C, and its cost:
    records/bf16-preconditioner/README.md."""
    return apply == "bf16" and bf16_operands(G)


def wide_key(p: torch.Tensor) -> tuple:
    """One batch for m x n and n x m matrices (Muon, PolarGrad, Newton-Muon): the MLP's 3072 x 768
    and 768 x 3072."""
    return tuple(sorted(p.shape))


def stack_wide(ts: list[torch.Tensor]) -> torch.Tensor:
    """The matrices of one transposition class (m x n and n x m, see wide_key) as one
    (k, min, max) batch: tall ones transposed. orthogonalize(G^T) = orthogonalize(G)^T, so Muon-like
    rules batch both shapes together."""
    return torch.stack([x.mT if x.size(-2) > x.size(-1) else x for x in ts])


def unstack_like(X: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """stack_wide undone: X[i] in like[i]'s orientation."""
    return [x.mT if p.size(-2) > p.size(-1) else x for x, p in zip(X.unbind(0), like)]


def optimizer_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """opt's parameters in the order of its state_dict()'s indices."""
    return [p for g in opt.param_groups for p in g["params"]]


def assign_owners(costs: list[float], world: int) -> list[int]:
    """The process that owns each matrix: largest cost first, each to the least-loaded process
    (ties: lowest rank), so the busiest process carries at most sum(costs)/W + max(costs).
    Deterministic: the same on every process."""
    load, owner = [0.0] * world, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: costs[i], reverse=True):  # stable sort
        r = min(range(world), key=lambda j: load[j])
        owner[i], load[r] = r, load[r] + costs[i]
    return owner


def all_gather_owned(opt: MatrixOptimizer) -> None:
    """All processes receive every owner's updated parameters: one all_gather of padded flat
    buffers."""
    mine = [[p for p in opt._params() if opt.owner[p] == r] for r in range(opt.world)]
    sizes = [[p.numel() for p in ps] for ps in mine]
    size = max(sum(s) for s in sizes)
    p0 = opt._params()[0]
    if opt._gather_buf is None:
        opt._gather_buf = torch.empty(opt.world * size, dtype=p0.dtype, device=p0.device)
    flat = torch.zeros(size, dtype=p0.dtype, device=p0.device)
    if mine[opt.rank]:
        torch.cat([p.reshape(-1) for p in mine[opt.rank]], out=flat[: sum(sizes[opt.rank])])
    # newer name first
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    all_gather(opt._gather_buf, flat)
    for r, ps in enumerate(mine):
        if r != opt.rank and ps:
            chunks = opt._gather_buf[r * size: r * size + sum(sizes[r])].split(sizes[r])
            torch._foreach_copy_(ps, [c.view_as(p) for c, p in zip(chunks, ps)])


def compile_rule(rule: Callable) -> Callable:
    """torch.compile of a rule function: one graph per transposition class, no dynamic kernels,
    without Inductor's loop reordering after fusion, whose pass failed an assertion (torch 2.11,
    CUDA) on Muon's stack of transposed foreach outputs."""
    no_reorder = {k: False for k in ("loop_ordering_after_fusion", "loop_reindexing_after_fusion")
                  if hasattr(torch._inductor.config, k)}
    return torch.compile(rule, dynamic=False, options=no_reorder)


@contextlib.contextmanager
def tf32_matmuls(on: bool = True):
    """Within: CUDA fp32 matmuls may use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32 =
    True); on exit the flag and its fp32_precision spelling are as they were, even after an
    exception. No-op if off or already allowed."""
    mm = torch.backends.cuda.matmul
    if not on or mm.allow_tf32:
        yield
        return
    # "none" (never set) reads as allow_tf32 False, but setting False spells it "ieee"
    spelling = mm.fp32_precision
    # the legacy setter sets both spellings (a new-API "tf32" alone would make matmuls raise)
    mm.allow_tf32 = True
    try:
        yield
    finally:
        mm.allow_tf32 = False
        mm.fp32_precision = spelling


def soap_state(opt: SOAP, params: list[torch.Tensor], G: torch.Tensor,
               max_dim: int) -> dict[str, torch.Tensor]:
    """The state of `params` (same shape and step) as one tensor per entry, made the first time
    (zeros), or by stacking when opt.state no longer holds the views made here (a loaded state dict,
    another batching)."""
    key, states = tuple(map(id, params)), [opt.state[p] for p in params]
    S, views = opt._stacks.get(key, (None, []))
    if S is not None and all(st.get(k) is v for st, vs in zip(states, views)
                             for k, v in vs.items()):
        return S
    if "step" in states[0]:
        S = {k: torch.stack([st[k] for st in states]).to(G.dtype) for k in states[0] if k != "step"}
    else:
        S = {"exp_avg": torch.zeros_like(G), "exp_avg_sq": torch.zeros_like(G)}
        for side, n in (("L", G.size(-2)), ("R", G.size(-1))):
            if n <= max_dim:
                S[side] = G.new_zeros(len(params), n, n)
                S["Q" + side] = G.new_zeros(len(params), n, n)
    views = [{k: v[i] for k, v in S.items()} for i in range(len(params))]
    for st, vs in zip(states, views):
        st.update(vs)
    # superseded stacks
    opt._stacks = {k: v for k, v in opt._stacks.items() if not set(k) & set(key)}
    opt._stacks[key] = S, views
    return S


LINALG_BLOCK = 512  # the column panel of cholesky_blocked and tri_inverse


def cholesky_blocked(A: torch.Tensor, b: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower L with L L^T = A for SPD A (..., n, n), and info (..., as torch.linalg.cholesky_ex: 0,
    or the order of the first leading minor that is not positive definite), right-looking over
    b-column panels k:
    L_kk = chol(A_kk);  L_ik = A_ik L_kk^-T;  A_ij -= L_ik L_jk^T for i >= j > k, by block columns j
    (the upper triangle is never read; ~n^3/3 flops), all but n/b small Choleskys in batched GEMMs:
    on CUDA torch.linalg.cholesky runs cuSOLVER, whose potrf launches thousands of tiny kernels for
    one 3072 x 3072 fp64 matrix, and potrfBatched is made for small ones."""
    A, b, n = A.clone(), b or LINALG_BLOCK, A.size(-1)
    L = torch.zeros_like(A)
    info = torch.zeros(A.shape[:-2], dtype=torch.int32, device=A.device)
    for k in range(0, n, b):
        e = min(k + b, n)
        Lkk, fail = torch.linalg.cholesky_ex(A[..., k:e, k:e])
        info = torch.where((info == 0) & (fail > 0), fail + k, info)
        L[..., k:e, k:e] = Lkk
        if e < n:
            L[..., e:, k:e] = Lik = A[..., e:, k:e] @ tri_inverse(Lkk, b).mT
            for j in range(e, n, b):
                f = min(j + b, n)
                A[..., j:, j:f] -= Lik[..., j - e:, :] @ Lik[..., j - e:f - e, :].mT
    return L, info


def tri_inverse(L: torch.Tensor, b: int | None = None) -> torch.Tensor:
    """X = L^-1 for lower triangular L (..., n, n), by b-column blocks k: X_kk = L_kk^-1 (small
    triangular solves, all up front), then down the column, X_ik = -X_ii (L_i,k:i X_k:i,k) for i > k
    (two GEMMs per block; ~n^3/3 flops)."""
    b, n = b or LINALG_BLOCK, L.size(-1)
    X = torch.zeros_like(L)
    starts = range(0, n, b)
    for i in starts:
        e = min(i + b, n)
        eye = torch.eye(e - i, dtype=L.dtype, device=L.device)
        X[..., i:e, i:e] = torch.linalg.solve_triangular(L[..., i:e, i:e], eye, upper=False)
    for k in starts:
        e = min(k + b, n)
        for i in range(e, n, b):
            f = min(i + b, n)
            X[..., i:f, k:e] = -X[..., i:f, i:f] @ (L[..., i:f, k:i] @ X[..., k:i, k:e])
    return X


def gram_upper(X: torch.Tensor, lower: bool = False, b: int | None = None) -> torch.Tensor:
    """X^T X for X (..., m, n) from its upper block triangle: block row i = X_{:, i}^T X_{:, i:},
    mirrored once (at n = 6b, 21 of 36 block products; a plain X^T X below n = 4b); lower: X is
    lower triangular (square), so rows above i of block column i are zero and block row
    i = X_{i:, i}^T X_{i:, i:} (~n^3/3 + n^3/2 flops, not 2 n^3)."""
    b, n = b or LINALG_BLOCK, X.size(-1)
    if not lower and n < 4 * b:  # too few blocks to gain (records/speed/README.md)
        return X.mT @ X
    G = torch.empty(X.shape[:-2] + (n, n), dtype=X.dtype, device=X.device)
    for i in range(0, n, b):
        e, r = min(i + b, n), i if lower else 0
        G[..., i:e, i:] = X[..., r:, i:e].mT @ X[..., r:, i:]
    return G.triu() + G.triu(1).mT


def matmul_upper(X: torch.Tensor, U: torch.Tensor, b: int | None = None) -> torch.Tensor:
    """X U for upper triangular U (..., n, n), by b-column blocks j: (X U)_{:, j} = X_{:, :e} U_{:e,
    j} (e = the block's end; the rows of U below it are zero), at n = 6b 21 of 36 block products (a
    plain X U below n = 4b)."""
    b, n = b or LINALG_BLOCK, U.size(-1)
    if n < 4 * b:
        return X @ U
    Y = torch.empty(X.shape[:-1] + (n,), dtype=X.dtype, device=X.device)
    for j in range(0, n, b):
        e = min(j + b, n)
        Y[..., j:e] = X[..., :e] @ U[..., :e, j:e]
    return Y


def orthonormalize(A: torch.Tensor) -> torch.Tensor:
    """Q of A = Q R with diag(R) > 0 (batched; A square or tall, full column rank), by column-scaled
    shifted CholeskyQR3 in float64 (Fukaya et al. 2020, SIAM J. Sci. Comput. 42(1)):
    X = A diag(1/||a_j||); then {R = chol(X^T X + s I), upper; X = X R^-1} with
    s = 11 (mn + n(n+1)) u ||X||_F^2 (u = 2^-53; ||X||_F^2 = n bounds ||X||_2^2), then twice more
    with s = 0. Then X = A T with T upper triangular and X^T X = I, which makes X the unique Q
    (Householder's up to column signs). The shift keeps the first Cholesky alive for cond(scaled A)
    up to ~1/u and leaves cond(X) <~ sqrt(n/s) (~7e3 at n = 3072), which the two plain passes bring
    to X^T X - I ~ 1e-16. SOAP needs this: the power step P Q of a rank-deficient L (the 3072-wide
    side of an MLP matrix) has fp32-noise columns and condition numbers plain CholeskyQR2 cannot
    factor. A matrix whose third Gram is off I by >= 0.5 in Frobenius norm gets a fourth pass; one
    whose Cholesky fails (a zero column), or whose last Gram is still that far off, gets
    torch.linalg.qr(A).Q instead (two host syncs per call to decide).
    Cost per n x n matrix and pass: ~1.2n^3 Gram (gram_upper) + ~n^3 cholesky_blocked + ~n^3
    tri_inverse + ~1.2n^3 for X R^-1 (matmul_upper) flops (at n = 6b), all but n/b small Choleskys
    and solves in batched fp64 GEMMs (Householder's geqrf + orgqr: 2.7 n^3, but BLAS-2 panels).
    Measured against the alternatives: records/speed/README.md."""
    X = A.double()
    # a zero column stays zero
    X = X / X.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    m, n = X.shape[-2:]

    def cholqr(X: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
        """X R^-1 with R = chol(X^T X + shift I), upper; whether the Cholesky held; ||X^T X - I||_F
        before it."""
        gram = gram_upper(X)
        # ||gram - I||_F^2 = ||gram||_F^2 - 2 tr(gram) + n, without an n x n temporary (fine in fp64
        # near 0.5^2); NaN (a failed earlier pass) compares False below
        off = torch.linalg.matrix_norm(gram) ** 2 - 2 * gram.diagonal(dim1=-2, dim2=-1).sum(-1) + n
        off = off.clamp_min(0).sqrt()
        if shift:
            gram.diagonal(dim1=-2, dim2=-1).add_(shift)
        L, info = cholesky_blocked(gram)
        return matmul_upper(X, tri_inverse(L).mT), info == 0, off

    X, ok, _ = cholqr(X, 11 * (m * n + n * (n + 1)) * 2.0**-53 * n)
    for _ in range(2):  # off: of the third pass's input
        X, held, off = cholqr(X)
        ok &= held
    again = ok & ~(off < 0.5)  # X was not yet near orthonormal before the third pass: one pass more
    if again.any():
        X[again], held, off[again] = cholqr(X[again])
        ok[again] &= held
    ok &= off < 0.5
    Q = X.to(A.dtype)
    if not ok.all():
        Q[~ok] = torch.linalg.qr(A[~ok]).Q
    return Q


@torch.no_grad()
def refresh_gram_factors(opt: FeatureGram, n_tokens: int,
                         stream: torch.cuda.Stream | None = None) -> None:
    """FeatureGram.refresh_gram: C from the collected sums, then the cached factors (see there)."""
    grams = [opt.layers[id(p)].gram for p in opt._params()]
    if opt.world > 1:
        flat = torch.cat([g.reshape(-1) for g in grams])
        dist.all_reduce(flat)
        parts = flat.split([g.numel() for g in grams])
        torch._foreach_copy_(grams, [c.view_as(g) for c, g in zip(parts, grams)])
    opt._pending = []
    opt.fallbacks = dict.fromkeys(FALLBACK_BOOSTS, 0)
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for group in opt.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if opt.owner[p] == opt.rank:
                    st, new = opt.state[p], opt.layers[id(p)].gram / n_tokens
                    if "gram" not in st and group["gram_start"] > 0:
                        st["gram"] = scaled_identity(new, group["gram"], group["gram_start"])
                    st["gram"] = (new if "gram" not in st else
                                  st["gram"].lerp_(new, 1 - group["gram_beta"]))
                    by_shape.setdefault(st["gram"].shape, []).append(p)
            for ps in by_shape.values():
                Rs, failed = opt.factor(opt._stacked_grams(ps), group, wait=False)
                opt._store_factors(ps, Rs, group)
                if failed.is_cuda:  # to the host without a sync: read once the stream is done
                    flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                    failed = flag.copy_(failed, non_blocking=True)
                opt._pending.append((ps, group, failed))
    opt._refreshed = None
    if stream is not None:
        opt._refreshed = torch.cuda.Event()
        opt._refreshed.record(stream)


@torch.no_grad()
def finish_gram_refresh(opt: FeatureGram) -> None:
    """FeatureGram.finish_refresh: join the side stream; redo a failed batch with more damping (see
    there)."""
    pending, opt._pending = opt._pending, []  # taken once, also when a redo raises
    if not pending:
        return
    if opt._refreshed is not None:
        torch.cuda.current_stream().wait_event(opt._refreshed)
        # the failure flags are on the host: waits for the side stream only
        opt._refreshed.synchronize()
    for ps, group, flag in pending:
        if flag.item():
            boosts: list[torch.Tensor] = []
            opt._store_factors(ps, opt.factor(opt._stacked_grams(ps), group, boosts=boosts), group)
            # a matrix's largest (block mode)
            for b in boosts[0].reshape(len(ps), -1).amax(-1).tolist():
                if b > 1:
                    opt.fallbacks[b] += 1


# full C of a layer input at least twice this wide (and a multiple of it) is summed as its upper
# block triangle only, in column blocks of this width, and symmetric_gram mirrors it: 3 of 4 block
# products for the 768-wide inputs, 36 of 64 (56%) for the 3072-wide MLP hidden input (timings:
# records/speed/README.md)
GRAM_TRIANGLE_BLOCK = 384


def gram_triangle(mode: str, d: int) -> bool:
    """Whether a d-wide input's C is summed as its upper block triangle (full mode, d a multiple of
    GRAM_TRIANGLE_BLOCK, at least two blocks)."""
    return mode == "full" and d >= 2 * GRAM_TRIANGLE_BLOCK and d % GRAM_TRIANGLE_BLOCK == 0


def gram_sum(x: torch.Tensor, mode: str, blocks: int = 1) -> torch.Tensor:
    """X^T X over the rows of x (..., d), in fp32: full (d, d); block (blocks, d/blocks, d/blocks),
    the diagonal blocks; diag (d,), the column sums of x^2. On CUDA the bf16 products come out of
    the matmul in fp32; autocast is off here (under it, an fp32 x's matmul would round X^T X to
    bf16). Where gram_triangle: only the blocks on and above the block diagonal (syrk-style, zeros
    below); symmetric_gram completes the sum."""
    x = x.detach().reshape(-1, x.size(-1))
    if mode == "diag":
        return x.float().square().sum(0)
    if mode == "block":
        x = x.view(x.size(0), blocks, -1).transpose(0, 1)  # (d/b, n, b)
    low = x.is_cuda and x.dtype == torch.bfloat16
    if not low:
        x = x.float()
    def gram_mm(a, b):
        if not low:
            return a @ b
        return (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out_dtype=torch.float32)

    d = x.size(-1)
    with torch.autocast(x.device.type, enabled=False):
        # row block i: columns i.. (its diagonal block and the blocks right of it)
        if gram_triangle(mode, d):
            b = GRAM_TRIANGLE_BLOCK
            return torch.cat([F.pad(gram_mm(x[:, i:i + b].mT, x[:, i:]), (i, 0))
                              for i in range(0, d, b)])
        return gram_mm(x.mT, x)


def symmetric_gram(gram: torch.Tensor, mode: str) -> None:
    """Complete what gram_sum summed as an upper block triangle: gram = triu(gram) + triu(gram,
    1)^T."""
    if gram_triangle(mode, gram.size(-1)):
        gram.copy_(gram.triu() + gram.triu(1).mT)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul takes x in: autocast's on x's device while it is on, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


# the loss kernel's columns per load and warps (one row per program)
LOSS_TILE = dict(BLOCK=4096, num_warps=16)


if triton is not None:
    @triton.jit
    def _softmax_xent_kernel(Z, T, L, V, Vp, stride, scale, cap, BLOCK: tl.constexpr,
                             CAP: tl.constexpr = False):
        """Row r of Z (N, Vp), logits in columns < V (the rest padding), target T[r]: L[r] = lse(z)
        - z[T[r]] in fp32, and in place Z[r] <- scale (softmax(z) - onehot(T[r])) (0 in the
        padding). CAP: z soft-capped first, z <- cap u / sqrt(u^2 + cap^2) of the stored u, and the
        written gradient times its derivative cap^3 / (u^2 + cap^2)^(3/2). Two passes over the row
        (the second reads it back from L2): an online max m and sum s = sum exp(z - m) per lane, one
        exp per element (a new max: s <- s e^(m - z) + 1; else s <- s + e^(z - m)), combined across
        lanes at the end, and z[T[r]] taken from the lane that holds it; then the write. z[T[r]] is
        read in the first pass: read after it, a warp could see the dz another warp of the row has
        already written there."""
        r = tl.program_id(0).to(tl.int64)
        Z += r * stride
        cols = tl.arange(0, BLOCK)
        t = tl.load(T + r)
        m = tl.full((BLOCK,), -float("inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        zt = tl.zeros((BLOCK,), tl.float32)
        for c in range(0, V, BLOCK):
            valid = cols < V - c
            z = tl.load(Z + c + cols, mask=valid, other=0.0).to(tl.float32)
            if CAP:
                z = cap * z * tl.rsqrt(z * z + cap * cap)
            z = tl.where(valid, z, -float("inf"))
            # e^(m - z) past a new max, else e^(z - m)
            e = tl.where(valid, tl.exp(-tl.abs(z - m)), 0.0)
            s = tl.where(z > m, s * e + 1.0, s + e)
            m = tl.maximum(m, z)
            zt = tl.where(cols == t - c, z, zt)
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(tl.where(m > -float("inf"), s * tl.exp(m - mx), 0.0), 0))
        tl.store(L + r, lse - tl.sum(zt, 0))
        for c in range(0, Vp, BLOCK):
            z = tl.load(Z + c + cols, mask=cols < Vp - c, other=0.0).to(tl.float32)
            if CAP:
                r = tl.rsqrt(z * z + cap * cap)
                z, dcap = cap * z * r, cap * cap * cap * r * r * r
            p = tl.where(cols < V - c, tl.exp(z - lse), 0.0)
            p = tl.where(cols == t - c, p - 1.0, p) * scale
            if CAP:
                p = p * dcap
            tl.store(Z + c + cols, p.to(Z.dtype.element_ty), mask=cols < Vp - c)


def _ce_chunk(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: float, V: int,
              b: torch.Tensor | None = None, cap: float = 0.0):
    """One chunk of linear_cross_entropy, W's rows (and b) zero-padded from V to w.size(0):
    u = x W^T (+ b) in x's dtype, read in fp32, z = u or, with cap > 0, cap u / sqrt(u^2 + cap^2),
    its padded columns out of the softmax; returns (sum_i lse(z_i) - z_i[t_i], du W, (du^T x)[:V],
    sum_i du_i[:V] in fp32 or None) with du = scale (softmax(z) - onehot(t)) dz/du in x's dtype (0
    in the padded columns). With Triton on CUDA (or interpreted) the softmax is one kernel
    (_softmax_xent_kernel) that writes du over u; else (CPU builds) these torch ops."""
    u = x @ w.mT if b is None else torch.addmm(b, x, w.mT)
    if triton is not None and (x.is_cuda or TRITON_INTERPRETED):
        rows = torch.empty(u.size(0), dtype=torch.float32, device=u.device)
        _softmax_xent_kernel[(u.size(0),)](u, t, rows, V, u.size(1), u.stride(0), scale,
                                           float(cap), CAP=cap > 0, **LOSS_TILE)
        du = u  # overwritten in place
        loss = rows.sum()
    else:
        z = u.float()
        if cap:
            r = (z.square() + cap**2).rsqrt()
            z = cap * z * r
        cols = torch.arange(z.size(-1), device=z.device)
        z = z.masked_fill(cols >= V, float("-inf"))
        lse = z.logsumexp(-1, keepdim=True)
        hit = cols == t[:, None]
        loss = (lse.squeeze(-1) - z.masked_fill(~hit, 0).sum(-1)).sum()
        dz = ((z - lse).exp() - hit.float()).mul(scale)
        du = (dz * (cap**3 * r**3) if cap else dz).to(x.dtype)
    db = None if b is None else du[:, :V].float().sum(0)
    return loss, du @ w, (du.mT @ x)[:V], db


# the fused loss pads W's rows (the vocabulary) to a multiple of this, so the logits' rows start at
# aligned offsets (why: records/speed/README.md)
LOSS_VOCAB_PAD = 128


class LinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(z_i, t_i), z_i = x_i W^T (+ b), soft-capped cap z / sqrt(z^2 + cap^2) if cap > 0,
    for x (N, d), W (V, d) without the N x V logits: `chunk` rows at a time, the forward also forms
    dL/dx, dL/dW and dL/db (operands in x's dtype, bf16 under autocast, logits and softmax in fp32,
    dL/dW and dL/db summed in fp32), and the backward scales them by the incoming gradient. Under
    no_grad only the loss is computed. W's rows (and b) are zero-padded to a multiple of
    LOSS_VOCAB_PAD, and the padded logits left out of the softmax (_ce_chunk)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int,
                b: torch.Tensor | None = None, cap: float = 0.0) -> torch.Tensor:
        dtype, (V, N) = matmul_dtype(x), (w.size(0), x.size(0))
        Vp = V + -V % LOSS_VOCAB_PAD
        xc, wc = x.to(dtype), w.new_empty((Vp, w.size(1)), dtype=dtype)
        wc[:V], wc[V:] = w, 0  # W in the operand dtype and its padding, in one pass over W
        bc = None if b is None else torch.cat([b.to(dtype), b.new_zeros(Vp - V, dtype=dtype)])
        needs = ctx.needs_input_grad
        grads = needs[0] or needs[1] or (b is not None and needs[4])
        loss = torch.zeros((), device=x.device)
        dx = torch.empty_like(xc) if grads else None
        dw = torch.zeros(w.shape, device=w.device) if grads else None
        db = torch.zeros(V, device=w.device) if grads and b is not None else None
        with torch.autocast(x.device.type, enabled=False):
            for s in range(0, N, chunk):
                if grads:
                    l, dxs, dws, dbs = _ce_chunk(xc[s: s + chunk], wc, t[s: s + chunk], 1.0 / N, V,
                                                 bc, cap)
                    dx[s: s + chunk] = dxs
                    dw += dws
                    if db is not None:
                        db += dbs
                else:
                    u = xc[s: s + chunk] @ wc.mT if bc is None else \
                        torch.addmm(bc, xc[s: s + chunk], wc.mT)
                    z = u.float()[:, :V]
                    z = cap * z * (z.square() + cap**2).rsqrt() if cap else z
                    l = F.cross_entropy(z, t[s: s + chunk], reduction="sum")
                loss += l
        if grads:
            ctx.save_for_backward(dx, dw, db)
            ctx.dtypes = x.dtype, w.dtype, None if b is None else b.dtype
        return loss / N

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx, dw, db = ctx.saved_tensors
        db = None if db is None else (db * grad).to(ctx.dtypes[2])
        return dx.to(ctx.dtypes[0]) * grad, (dw * grad).to(ctx.dtypes[1]), None, None, db, None


def linear_cross_entropy(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, chunk: int,
                         b: torch.Tensor | None = None, cap: float = 0.0) -> torch.Tensor:
    """mean_i CE(x_i W^T (+ b), soft-capped by cap if > 0, t_i), `chunk` rows of logits at a time
    (LinearCrossEntropy). Eager under torch.compile once a GPT is built (make_loss_eager)."""
    return LinearCrossEntropy.apply(x, w, t, chunk, b, cap)


def make_loss_eager() -> None:
    """linear_cross_entropy = torch.compiler.disable(linear_cross_entropy): a graph break, so under
    torch.compile the chunk loop runs eagerly (CUDA: cuBLAS GEMMs and the softmax kernel). Called by
    GPT() rather than at import, where it would load torch._dynamo (~1 s) in every process importing
    this file, the downloader's included."""
    global linear_cross_entropy
    if not getattr(linear_cross_entropy, "_torchdynamo_disable", False):
        linear_cross_entropy = torch.compiler.disable(linear_cross_entropy)

# ----------------------------------------------------------------------------- infra: checks


def validate_args(args: Hyperparameters, world: int) -> int:
    """Refuse bad settings before any model is built; returns the gradient accumulation steps."""
    if args.model not in MODELS:
        raise SystemExit(f"--model: unknown model {args.model!r}; choose one of "
                         f"{', '.join(MODELS)}")
    refusal = MODELS[args.model].refusal(args)
    if refusal:
        raise SystemExit(refusal)
    check_optimizer_args(args)
    if args.compile_mode not in COMPILE_MODES:
        raise SystemExit(f"--compile_mode: unknown {args.compile_mode!r}; choose one of "
                         f"{', '.join(COMPILE_MODES)}")
    if args.attention not in ATTENTION_BACKENDS:
        raise SystemExit(f"--attention: unknown backend {args.attention!r}; choose one of "
                         f"{', '.join(ATTENTION_BACKENDS)}")
    if not 0 < args.activation_budget <= 1:
        raise SystemExit(f"--activation_budget: must be in (0, 1], got {args.activation_budget}")
    if args.loss_chunk < 0:
        raise SystemExit(f"--loss_chunk: must be >= 0 (0: whole logits), got {args.loss_chunk}")
    for name in ("batch_size", "device_batch_size", "sequence_length", "num_iterations",
                 "val_tokens", "n_layer",
                 "n_head", "n_embd", "vocab_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name}: must be positive, got {getattr(args, name)}")
    for name, what in (("input_bin", "a glob pattern of train shards"), ("input_val_bin",
                                                                         "a glob pattern of val "
                       "shards"), ("records_dir", "the folder of the records")):
        if not getattr(args, name).strip():
            raise SystemExit(f"--{name}: must not be empty ({what})")
    per_micro = world * args.device_batch_size
    if args.batch_size % per_micro:
        divisor_of = args.batch_size // world if args.batch_size % world == 0 else args.batch_size
        raise SystemExit(f"--device_batch_size {args.device_batch_size} x {world} processes = "
                         f"{per_micro} sequences does not divide the step's --batch_size "
                         f"{args.batch_size}; pick a divisor of {divisor_of}")
    val_bt = world * args.device_batch_size * args.sequence_length
    if args.val_tokens % val_bt:
        below = args.val_tokens // val_bt * val_bt
        near = " or ".join(str(v) for v in (below, below + val_bt) if v > 0)
        raise SystemExit(f"--val_tokens {args.val_tokens} is not a multiple of {world} processes x "
                         f"--device_batch_size {args.device_batch_size} x --sequence_length "
                         f"{args.sequence_length} "
                         f"= {val_bt}: pass {near}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise SystemExit(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head} "
                         "with an even head dim")
    if not 0 <= args.seed < 2**32:
        raise SystemExit(f"--seed: must be in 0 .. {2**32 - 1} (numpy's seed range), got "
                         f"{args.seed}")
    if args.deterministic and args.attention not in DETERMINISTIC_ATTENTION:
        raise SystemExit(f"--attention {args.attention}: its backward is not deterministic; with "
                         "--deterministic 1 "
                         f"choose one of {', '.join(DETERMINISTIC_ATTENTION)}")
    check_run_args(args)
    return args.batch_size // per_micro


def check_run_args(args: Hyperparameters) -> None:
    """Refuse a schedule or checkpoint setting out of range: learning rates below the float32
    maximum; warmup, warmdown >= 0 with warmup + warmdown <= num_iterations; val_loss_every,
    val_tail_every, save_every >= 0; keep_checkpoints >= 1; a --resume checkpoint that exists, is
    complete, has its record, and was saved with the same settings except RESUME_MAY_CHANGE, and
    not at the run's last step already (RunComplete)."""
    f32_max = torch.finfo(torch.float32).max
    for name in (f.name for f in fields(Hyperparameters) if f.name.endswith("_lr")):
        if not getattr(args, name) < f32_max:  # check_optimizer_args refuses the non-positive ones
            raise SystemExit(f"--{name}: must be below {f32_max:.4g} (the float32 maximum), got "
                             f"{getattr(args, name)}")
    for name in ("warmup_iters", "warmdown_iters", "val_loss_every", "val_tail_every", "save_every",
                 "stop_at"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name}: must be >= 0, got {getattr(args, name)}")
    if args.warmup_iters + args.warmdown_iters > args.num_iterations:
        raise SystemExit(f"--warmup_iters {args.warmup_iters} + --warmdown_iters "
                         f"{args.warmdown_iters} = "
                         f"{args.warmup_iters + args.warmdown_iters} is longer than the run "
                         "(--num_iterations "
                         f"{args.num_iterations}): their sum must be <= {args.num_iterations}")
    if args.stop_at >= args.num_iterations:
        raise SystemExit(f"--stop_at {args.stop_at}: must be below --num_iterations "
                         f"{args.num_iterations} (0: run to "
                         f"the end)")
    if args.keep_checkpoints < 1:
        raise SystemExit(f"--keep_checkpoints: must be >= 1, got {args.keep_checkpoints}")
    if args.resume:
        path = find_checkpoint(args.resume, checkpoint_root(args))
        saved, meta = checkpoint_settings(path), read_checkpoint_meta(path)
        record, step = checkpoint_record(path, meta, args.records_dir), meta["step"]
        refuse_resume_changes(path, saved, {f.name: getattr(args, f.name)
                                            for f in fields(Hyperparameters)})
        if 0 < args.stop_at <= step:
            raise SystemExit(f"--stop_at {args.stop_at}: {path} is at step {step} already; stop "
                             "later (0: the end)")
        if step == args.num_iterations:
            raise RunComplete(f"--resume {path}: the run is complete (step {step}/{step}, record "
                              f"{record}); nothing "
                              f"to do")


class RunComplete(SystemExit):
    """--resume of a checkpoint at the last step of its run: nothing to do, nothing written. Exit
    status 0 (a job that resumes until done succeeds), the message on stdout."""

    def __init__(self, message: str):
        super().__init__(0)
        self.message = message


def check_attention(args: Hyperparameters, device: torch.device) -> None:
    """Refuse an --attention backend this device cannot run: one causal attention of the run's head
    size (bf16 on CUDA, fp32 on CPU) tried under it before the run starts."""
    backend = ATTENTION_BACKENDS[args.attention]
    if backend is None:
        return
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.zeros(1, args.n_head, 16, args.n_embd // args.n_head, device=device, dtype=dtype)
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
    except RuntimeError as e:
        why = first_line(e).split('. ')[0]
        raise SystemExit(f"--attention {args.attention}: not available on {device.type} for head "
                         f"size {q.size(-1)} ({why}); use --attention auto") from None


def check_inputs(args: Hyperparameters, world: int) -> tuple[list[str], list[str], str,
                                                             dict | None]:
    """Refuse, before any training work, shards that are missing, too small or out of the
    vocabulary, a checkpoint saved on other shards, and folders that cannot be written. Returns
    (train files, val files, the checkpoint to resume or "", its meta or None)."""
    B, T = args.device_batch_size, args.sequence_length
    train_files = check_shards(args.input_bin, args.batch_size * T + 1, "train")
    val_files = check_shards(args.input_val_bin, 0, "val")
    val_ids = {(os.stat(f).st_dev, os.stat(f).st_ino): f for f in val_files}
    for f in train_files:
        if (os.stat(f).st_dev, os.stat(f).st_ino) in val_ids:
            raise ShardError(args.input_bin, f"the train shards include the val shard {f} (also "
                             f"matched by --input_val_bin {args.input_val_bin}): the run would "
                             "train on the tokens it validates on",
                             fix="pass an --input_bin that matches train shards only")
    have = sum(shard_token_count(f) for f in val_files)
    if have < args.val_tokens + 1:
        unit = world * B * T  # one val batch
        most = max(have - 1, 0) // unit * unit
        fix = (f"pass --val_tokens {most} (the most whole val batches of {world} processes x "
               f"--device_batch_size {B} x --sequence_length {T} = {unit} tokens they hold)"
               if most else
               f"one val batch ({world} processes x --device_batch_size {B} x --sequence_length "
               f"{T} = {unit} tokens) needs val shards of {unit + 1} tokens or more: use larger "
               "val shards, or a smaller --device_batch_size or --sequence_length")
        raise ShardError(args.input_val_bin, f"val shards hold {have} tokens, fewer than "
                         f"--val_tokens {args.val_tokens} + 1", fix=fix)
    resume = find_checkpoint(args.resume, checkpoint_root(args)) if args.resume else ""
    meta = read_checkpoint_meta(resume) if resume else None
    if resume:
        for pattern, files, what in ((args.input_bin, train_files, "train"), (args.input_val_bin,
                                                                              val_files, "val")):
            saved, now = meta[f"{what}_files"], shard_list(files)
            if [e[:2] for e in saved] != [e[:2] for e in now]:
                raise ShardError(pattern, f"the {what} shards (names and token counts) differ from "
                                 "the "
                                          f"{len(meta[what + '_files'])} the checkpoint {resume} "
                                          "was saved with",
                                 fix="resume on the same shards")
            changed = [e[0] for e, n in zip(saved, now) if len(e) == 3 and e != n]
            if changed:  # a checkpoint saved before fingerprints were kept: names and counts only
                raise ShardError(pattern, f"{what} shard {changed[0]} has the name and token count "
                                 f"the checkpoint {resume} was saved with but other contents "
                                 "(size and sha256 of its first and last MiB)",
                                 fix="resume on the same shards")
    check_token_ids(train_files + val_files, args.vocab_size)
    for folder, setting in ([] if resume else [(args.records_dir, "records_dir")]) + [
            (os.path.dirname(resume) if resume else checkpoint_root(args), "checkpoint_dir")]:
        check_writable(folder, setting)
    return train_files, val_files, resume, meta


def out_of_memory(e: BaseException) -> bool:
    """Whether e is an allocation the device or host could not make (CUDA OOM, numpy's MemoryError,
    the CPU allocator's RuntimeError)."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


@contextlib.contextmanager
def run_errors():
    """Around a run: an allocation that fails ends it with one line naming the settings that size
    it; the process group is destroyed at the end, whatever happened."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        detail = first_line(e)
        # past the CPU allocator's source location
        detail = detail[max(detail.find("DefaultCPUAllocator"), 0):]
        raise SystemExit(f"out of memory ({detail}): the model (--n_layer, --n_embd, --vocab_size) "
                         "or the "
                         "batch (--device_batch_size x --sequence_length, --val_tokens) does not "
                         "fit this "
                         "device; a smaller --device_batch_size keeps the step (accumulation "
                         "makes up the rest)"
                         ) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

# ----------------------------------------------------------------------------- infra: steps


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE: NCCL on CUDA, gloo on CPU; otherwise one process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


# --compile_mode: torch.compile's mode for the model. max-autotune-no-cudagraphs benchmarks Triton
# matmul templates against cuBLAS per shape and can fuse pointwise epilogues (GELU, casts) into the
# chosen matmul; CUDA graphs stay off (the Gram buffers are mutated on refresh steps).
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_model(model: nn.Module, args: Hyperparameters) -> nn.Module:
    """torch.compile(model) in args.compile_mode."""
    return torch.compile(model, mode=args.compile_mode)


def compile_for_cuda(model: nn.Module, args: Hyperparameters, optimizers: list) -> nn.Module:
    """The compiled model; the rules' fast paths on (FAST_PATHS)."""
    # the partitioner saves less and recomputes the rest in the backward
    if args.activation_budget < 1:
        torch._functorch.config.activation_memory_budget = args.activation_budget
    for opt in optimizers:
        if isinstance(opt, MatrixOptimizer):
            opt.fast = True
    return compile_model(model, args)


class Clock:
    """Training time: the steps' wall time, without validations, checkpoint saves and the first 10
    steps of each start (compile warm-up). ms: the time banked so far (the checkpoint's before a
    resume)."""

    def __init__(self, progress: dict, cuda: bool):
        self.start, self.ms = progress["step"], progress["training_ms"]
        self.before = progress["timed_steps"]
        self.warm_until = self.start + 10
        self.sync = torch.cuda.synchronize if cuda else (lambda: None)
        self.t0, self.paused = time.perf_counter(), False

    def start_step(self, step: int) -> None:
        """At the top of each step: the clock starts once the warm-up steps are done."""
        if step == self.warm_until:
            self.sync()
            self.t0 = time.perf_counter()

    def elapsed(self, step: int) -> float:
        """ms of training time up to now, in step `step` (0-based)."""
        running = step >= self.warm_until and not self.paused
        return self.ms + (1000 * (time.perf_counter() - self.t0) if running else 0.0)

    def timed(self, done: int) -> int:
        """Timed steps once `done` steps are done."""
        return self.before + max(done - self.warm_until, 0)

    def line(self, step: int, done: int | None = None) -> str:
        """'train_time:...ms step_avg:...ms' at step `step`, `done` steps done (default: step)."""
        done = step if done is None else done
        now, timed = self.elapsed(step), self.timed(done)
        return f"train_time:{now:.0f}ms step_avg:{now / timed if timed else float('nan'):.2f}ms"

    def pause(self, step: int) -> None:
        """Before a validation or a save: wait for the device, bank the time so far."""
        self.sync()
        self.ms, self.paused = self.elapsed(step), True

    def resume(self, sync: bool = False) -> None:
        """After it: the clock runs again (sync: once the device is done)."""
        if sync:
            self.sync()
        self.t0, self.paused = time.perf_counter(), False

    def progress(self, done: int, losses: list[float]) -> dict:
        """A checkpoint's progress once `done` steps are done."""
        return dict(step=done, training_ms=self.ms, timed_steps=self.timed(done), losses=losses)


class Timer:
    """Milliseconds of one region of a step: CUDA events on the GPU (no sync until read), the host
    clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)

    def start(self) -> None:
        self.begin.record() if self.cuda else setattr(self, "t", time.perf_counter())

    def stop(self) -> None:
        self.end.record() if self.cuda else setattr(self, "elapsed", 1000 * (time.perf_counter()
                                                                             - self.t))

    def ms(self) -> float:
        return self.begin.elapsed_time(self.end) if self.cuda else self.elapsed


def mean_val_loss(model: nn.Module, tokens: np.ndarray, args: Hyperparameters, rank: int,
                  world: int,
                  device: torch.device, autocast, attention) -> float:
    """The mean loss over the val tokens (each process its share of the batches; averaged over
    processes)."""
    B, T = args.device_batch_size, args.sequence_length
    model.eval()
    val_loss, n = torch.zeros((), device=device), 0
    with torch.no_grad():
        for vx, vy in val_batches(tokens, B, T, rank, world, device):
            with autocast, attention():
                val_loss += model(vx, vy)
            n += 1
    val_loss /= n
    if world > 1:
        dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
    model.train()
    return val_loss.item()


@dataclass
class StepOutcome:
    """A step as every process sees it (agree): the mean train loss, whether the parameters are all
    finite, the Gram refresh's error here ("" if none) and whether any process had one, whether a
    stop signal came, and the Cholesky fallbacks of the refresh by boost (summed over processes)."""
    train_loss: float
    finite: bool
    refresh_error: str
    refresh_failed: bool
    stop: bool
    fallbacks: list[int]


def agree(train_loss: torch.Tensor, refresh_error: str, stop: bool, refresh: bool,
          blocks: torch.optim.Optimizer,
          model: nn.Module, world: int, device: torch.device) -> StepOutcome:
    """The step's outcome as every process sees it: with several processes one all-reduce carries
    the train loss, whether any process failed a refresh or got a signal, and the Cholesky fallbacks
    of all processes; the parameters' finiteness is identical everywhere. Waits for the step, so the
    timers are complete after it."""
    n_boosts = len(FALLBACK_BOOSTS)
    fallbacks = list(blocks.fallbacks.values()) if refresh else [0] * n_boosts
    stats = train_loss.view(1)
    if world > 1:
        flags = torch.tensor([float(bool(refresh_error)), float(stop)] + fallbacks, device=device)
        stats = torch.cat([stats, flags])
        dist.all_reduce(stats, op=dist.ReduceOp.AVG)
    params = list(model.parameters())
    finite = torch.stack(torch._foreach_norm(params, float("inf"))).isfinite().all()
    stats = torch.cat([stats, finite.view(1).float()]).tolist()
    refresh_failed = bool(refresh_error)
    # every process decides on the all-reduced flags alone, so all stop (or go on) together
    if world > 1:
        refresh_failed, stop = stats[1] > 0, stats[2] > 0
        fallbacks = [round(x * world) for x in stats[3:3 + n_boosts]]  # means of counts: sums
    return StepOutcome(stats[0], stats[-1] == 1.0, refresh_error, refresh_failed, stop, fallbacks)


def fallbacks_line(done: int, args: Hyperparameters, fallbacks: list[int],
                   blocks: torch.optim.Optimizer) -> str:
    """The record's `gram_fallbacks:` line of a refresh whose Choleskys of C + damping I needed more
    damping."""
    return (f"gram_fallbacks: step:{done}/{args.num_iterations} {sum(fallbacks)} of "
            f"{len(optimizer_params(blocks))} matrices failed the Cholesky of C + damping I and "
            "were refactored "
            f"with more damping: " + ", ".join(f"x{b}: {n}" for b, n in zip(FALLBACK_BOOSTS,
                                                                            fallbacks)))


def first_nonfinite_parameter(model: nn.Module, optimizers: list[torch.optim.Optimizer],
                              optimizer: str) -> str:
    """'name (shape), updated by <optimizer>' of the first parameter, in model order, with a
    non-finite value; ''."""
    owner = {p: "the embedding/head AdamW" if i == 0 else optimizer
             for i, opt in enumerate(optimizers) for p in optimizer_params(opt)}
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return f"{name} {tuple(p.shape)}, updated by {owner.get(p, '?')}"
    return ""


def stop_diverged(step: int, loss: float, refresh_error: str, model: nn.Module,
                  optimizers: list[torch.optim.Optimizer],
                  args: Hyperparameters, record: Record | None, checkpoint: str) -> None:
    """End the run at a non-finite train loss or parameter: name the step, the optimizer and the
    first non-finite parameter, mark the record diverged with its last good step (the last
    checkpoint stays), exit with code 1."""
    bad = first_nonfinite_parameter(model, optimizers, args.optimizer)
    what = "; ".join(filter(None, [f"train loss {loss}", refresh_error and "Gram refresh: "
                                   f"{refresh_error}",
                                   f"first non-finite parameter: {bad}" if bad else "all "
                                   "parameters finite"]))
    message = (f"diverged at step {step}/{args.num_iterations} (optimizer {args.optimizer}): "
               f"{what}. Last good step "
               f"{step - 1}; last checkpoint: {checkpoint or 'none'} (kept)")
    if record is not None:
        record.log(f"diverged: step:{step}/{args.num_iterations} last_good_step:{step - 1} "
                   f"optimizer:{args.optimizer} "
                   f"{what}")
        record.close()
    raise SystemExit(message if record is not None else 1)


def params_digest(model: nn.Module) -> str:
    """sha256 of the model's parameters (named_parameters order, a tied one once, each its raw
    bytes): equal in two records iff their final parameters are bit-identical (e.g. --deterministic
    1 reruns, or an edit that should not change the math)."""
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

# ----------------------------------------------------------------------------- infra: checkpoints


# checkpoints: <checkpoint_dir>/<record name>/step_<n>/ after n optimizer steps (see Checkpoints)
CHECKPOINT_FORMAT = 1


# what a resumed run may change: where it stops, where and how often it saves, how it runs, where
# the same shards are (checked by name and token count) and where records go (it continues its own);
# every other setting is the checkpoint's
RESUME_MAY_CHANGE = ("resume", "stop_at", "save_every", "keep_checkpoints", "checkpoint_dir",
                     "final_checkpoint",
                     "compile", "compile_mode",
                     "device_batch_size", "loss_chunk", "attention", "activation_budget",
                     "recompute_gelu",
                     "gram_overlap", "matmul_check", "input_bin", "input_val_bin",
                     "records_dir", "deterministic")


def checkpoint_root(args: Hyperparameters) -> str:
    """The folder of the runs' checkpoint folders: --checkpoint_dir, or <records_dir>/checkpoints.
    """
    return args.checkpoint_dir or os.path.join(args.records_dir, "checkpoints")


def _saved_at(path: str) -> float:
    try:
        with open(os.path.join(path, "meta.json")) as f:
            return float(json.load(f)["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.getmtime(os.path.join(path, "meta.json"))


def checkpoints_in(folder: str) -> list[str]:
    """The complete checkpoints in a run's folder (step_<n>/ with meta.json, never the step_<n>.tmp/
    of an unfinished save), oldest save first."""
    found = [p for p in glob.glob(os.path.join(glob.escape(folder), "step_*"))
             if not p.endswith(".tmp") and os.path.isfile(os.path.join(p, "meta.json"))]
    return sorted(found, key=lambda p: (_saved_at(p), p))


def find_checkpoint(spec: str, root: str) -> str:
    """The absolute path of the checkpoint `spec` names: "latest" (the newest save in any run folder
    under root), a checkpoint folder, or a run's folder of checkpoints (its newest)."""
    if spec == "latest":
        found = [c for run in glob.glob(os.path.join(glob.escape(root),
                                                     "*")) for c in checkpoints_in(run)]
        if not found:
            raise SystemExit(f"--resume latest: no checkpoint under {root} (folders "
                             "<run>/step_<n>/ with meta.json); "
                             "pass the --checkpoint_dir (or --records_dir) the run used, or a "
                             "checkpoint folder")
        return os.path.abspath(max(found, key=lambda p: (_saved_at(p), p)))
    if os.path.isfile(os.path.join(spec, "meta.json")):
        return os.path.abspath(spec)
    found = checkpoints_in(spec) if os.path.isdir(spec) else []
    if not found:
        raise SystemExit(f"--resume {spec}: not a checkpoint (a step_<n>/ folder with meta.json), "
                         "nor a run's folder "
                         f"of them, nor 'latest'")
    return os.path.abspath(found[-1])


# meta.json's keys and their types (bool is not an int here)
CHECKPOINT_META = {"format": int, "step": int, "num_iterations": int, "world_size": int,
                   "record": str, "args": dict,
                   "train_files": list, "val_files": list}


def read_checkpoint_meta(path: str) -> dict:
    """meta.json of a checkpoint folder, checked: this format, every key of CHECKPOINT_META with its
    type, 0 <= step <= num_iterations, world_size >= 1, shard lists of [name, token count], and
    main.pt plus one rank<r>.pt per saving process present."""
    def damaged(what: str):
        raise SystemExit(f"--resume {path}: its meta.json {what}: damaged, or not written by "
                         "train_gpt2.py; resume "
                         f"another checkpoint of the run (a step_<n>/ folder beside it)")

    try:
        with open(os.path.join(path, "meta.json"), "rb") as f:
            meta = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SystemExit(f"--resume {path}: cannot read its meta.json ({e})") from None
    if not isinstance(meta, dict):
        damaged(f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"--resume {path}: checkpoint format {meta.get('format')!r}; this "
                         "train_gpt2.py reads format "
                         f"{CHECKPOINT_FORMAT}")
    for key, kind in CHECKPOINT_META.items():
        if not isinstance(meta.get(key), kind) or (kind is int and isinstance(meta[key], bool)):
            damaged(f"has no {key!r} ({kind.__name__})" if key not in meta else
                    f"has {key!r} = {meta[key]!r}, not a {kind.__name__}")
    if meta["world_size"] < 1 or not 0 <= meta["step"] <= meta["num_iterations"]:
        damaged(f"says step {meta['step']} of {meta['num_iterations']} on {meta['world_size']} "
                "processes")
    for key in ("train_files", "val_files"):
        if not all(isinstance(e, list) and len(e) in (2, 3) and isinstance(e[0], str)
                   and type(e[1]) is int and all(isinstance(x, str) for x in e[2:])
                   for e in meta[key]):
            damaged(f"has {key!r} that is not a list of [shard name, token count, fingerprint]")
    missing = [n for n in ["main.pt"] + [f"rank{r}.pt" for r in range(meta["world_size"])]
               if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise SystemExit(f"--resume {path}: incomplete checkpoint, missing {', '.join(missing)}")
    return meta


def _saved_value_fits(kind: str, v) -> bool:
    """Whether a value from meta.json's args is of the setting's type (kind as in Hyperparameters'
    annotations)."""
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return type(v) is int
    if kind == "float":
        return type(v) in (int, float)
    if kind == "str":
        return isinstance(v, str)
    return isinstance(v, list) and all(type(x) in (int, float) for x in v)  # tuple[float, float]


def checkpoint_settings(path: str) -> Hyperparameters:
    """The settings a checkpoint was saved with (each of its setting's type; settings it lacks: the
    defaults)."""
    saved, kinds = read_checkpoint_meta(path)["args"], {f.name: str(f.type)
                                                        for f in fields(Hyperparameters)}
    unknown = sorted(set(saved) - set(kinds))
    if unknown:
        raise SystemExit(f"--resume {path}: saved with settings this train_gpt2.py does not have "
                         f"({', '.join(unknown)}); resume it with the version that saved it")
    for k, v in saved.items():
        if not _saved_value_fits(kinds[k], v):
            raise SystemExit(f"--resume {path}: its meta.json has args.{k} = {v!r}, not a "
                             f"{kinds[k]}: damaged, or not written by train_gpt2.py; resume "
                             f"another checkpoint of the run")
    return Hyperparameters(**{k: tuple(v) if kinds[k].startswith("tuple") else v
                              for k, v in saved.items()})


# a record's file name (record_name + .txt)
RECORD_FILE = re.compile(r"\d{8}-\d{6}-[\w.-]+-[0-9a-f]{8}\.txt")


def checkpoint_record(path: str, meta: dict, records_dir: str) -> str:
    """The record the checkpoint at `path` continues (meta.json's "record"), confined to its own
    run: the file must be named <run folder>.txt (the folder holding the checkpoint is named after
    its record) like a record (RECORD_FILE), lie in records_dir itself, and be a train_gpt2.py
    record (first line RECORD_MARK), so a crafted meta.json cannot make a resumed run append to any
    other file."""
    record, run = meta["record"], os.path.basename(os.path.dirname(path))
    if os.path.basename(record) != run + ".txt" or not RECORD_FILE.fullmatch(run + ".txt"):
        raise SystemExit(f"--resume {path}: its meta.json names {record} as its record, not "
                         f"{run}.txt: a checkpoint "
                         f"continues only its own run's record; refused")
    if os.path.dirname(os.path.realpath(record)) != os.path.realpath(records_dir):
        raise SystemExit(f"--resume {path}: its meta.json names {record} as its record, outside "
                         f"--records_dir {records_dir}: a resumed run appends only to a record "
                         "there; refused (pass the --records_dir the run used)")
    if not os.path.isfile(record):
        raise SystemExit(f"--resume {path}: the record it continues, {record}, is missing: put it "
                         "back")
    try:
        with open(record, "rb") as f:
            first = f.read(len(RECORD_MARK) + 1)
    except OSError as e:
        raise SystemExit(f"--resume {path}: cannot read its record ({os_error(e)})") from None
    if first != (RECORD_MARK + "\n").encode():
        raise SystemExit(f"--resume {path}: {record}, which its meta.json names as its record, is "
                         "not a train_gpt2.py "
                         f"record (no record mark on its first line); refused")
    return record


def refuse_resume_changes(path: str, saved: Hyperparameters, values: dict) -> None:
    """Refuse any setting in `values` (name -> value) outside RESUME_MAY_CHANGE that differs from
    the checkpoint's."""
    for name, value in values.items():
        if name not in RESUME_MAY_CHANGE and value != getattr(saved, name):
            raise SystemExit(f"--{name}: the checkpoint {path} was saved with "
                             f"{getattr(saved, name)!r}, got {value!r}; "
                             "a resumed run keeps the checkpoint's model, optimizer and schedule: "
                             f"leave --{name} out "
                             "(or start a new run). Only "
                             f"{', '.join('--' + k for k in RESUME_MAY_CHANGE[1:])} may "
                             f"change on resume")


def resume_settings(base: Hyperparameters, given: dict) -> Hyperparameters:
    """The settings of the checkpoint that given["resume"] names (looked up under base's checkpoint
    root), plus the given RESUME_MAY_CHANGE settings; any other given setting must equal the
    checkpoint's. stop_at is 0 (run to the end) unless given again."""
    path = find_checkpoint(given["resume"], checkpoint_root(base))
    saved = checkpoint_settings(path)
    refuse_resume_changes(path, saved, given)
    kept = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE[1:]}
    return dataclasses.replace(saved, resume=path, **({"stop_at": 0} | kept))


def rng_state(device: torch.device) -> dict:
    """Every random generator of this process: torch (CPU, and this CUDA device), numpy, python's
    random."""
    name, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type
            == "cuda" else None,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), *rest],
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


def check_writable(folder: str, setting: str) -> None:
    """Refuse a folder that cannot be made or written in (read-only, full, a file in its path):
    before any model, record or step. Creates it."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--{setting} {folder}: cannot write there ({os_error(e)}); pass a "
                         "writable folder") from None


def checkpoint_floor(args: Hyperparameters) -> int:
    """Bytes one checkpoint of this run needs at least: the fp32 weights, N = 12 L d^2 + V d, and
    the embedding's two AdamW moments, 2 V d (the block matrices' state comes on top)."""
    L, d, V = args.n_layer, args.n_embd, args.vocab_size
    return 4 * (12 * L * d * d + 3 * V * d)


def check_room(folder: str, need: int) -> None:
    """Refuse a checkpoint folder with less free space than one checkpoint needs (checkpoint_floor),
    before the record and the first step: a run that can never save would lose every step to a stop
    signal."""
    free = shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"--checkpoint_dir {folder}: {free / 2**20:.1f} MiB free, a checkpoint of "
                         f"this run needs {need / 2**20:.1f} MiB or more; free space there or pass "
                         "another --checkpoint_dir")


def os_error(e: OSError) -> str:
    """One line for an OS error: 'Read-only file system: /path' (the errno's text and the file)."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


class _Writes:
    """A file object's write and flush that keep the OSError behind a failed torch.save, which
    raises only a RuntimeError ('unexpected pos ...') when the disk is full or read-only."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_synced(obj, path: str) -> None:
    """torch.save, flushed to the disk before returning; a failed write raises its OSError (ENOSPC,
    EROFS, ...)."""
    with open(path, "wb") as f:
        out = _Writes(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise OSError(out.error.errno, out.error.strerror, path) from None
        f.flush()
        os.fsync(f.fileno())


def folder_bytes(path: str) -> int:
    """The bytes of the files in a folder (0 if it is not there)."""
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def make_room(folder: str, last: str) -> str:
    """Before a save into `folder` (a run's checkpoints) of about the size of `last` (its newest
    checkpoint; none: no estimate): while the disk has less free, remove the run's checkpoints
    older than `last`, oldest first (the rotation after the save would remove them anyway); `last`
    itself stays, whatever happens. '' when the save fits, else why not, and nothing is written:
    a save that cannot fit never fills the disk the record is on."""
    need = folder_bytes(last) if last else 0
    for old in checkpoints_in(folder):
        if shutil.disk_usage(folder).free >= need or os.path.abspath(old) == os.path.abspath(last):
            break
        shutil.rmtree(old, ignore_errors=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        return (f"{free / 2**20:.1f} MiB free in {folder}, a checkpoint needs about "
                f"{need / 2**20:.1f} MiB: free space there or pass another --checkpoint_dir")
    return ""


def shard_fingerprint(path: str) -> str:
    """'<bytes>:<sha256 of the first and last MiB>' (16 hex digits): a shard changed in place under
    the same name and token count reads differently, for 2 MiB read."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()[:16]}"


def shard_list(files: list[str]) -> list[list]:
    """[name, token count, shard_fingerprint] of each shard: what a resume checks the shards by."""
    return [[os.path.basename(f), shard_token_count(f), shard_fingerprint(f)] for f in files]


class Checkpoints:
    """A run's checkpoints: <folder>/step_<n>/ after n optimizer steps, each written into
    step_<n>.tmp/ and renamed once complete, so a kill in the middle of a save leaves the previous
    checkpoint valid. Inside:
      meta.json   step, settings, world size, record path, train and val shards: resume reads it
                  before building
      main.pt     the model; every optimizer's param groups (lr, base_lr, ...); the data loader's
                  position; the training time, timed steps and train losses so far
      rank<r>.pt  the optimizer state process r holds (the block matrices it owns; rank 0: AdamW's)
                  and its RNG states
    save() and load() are collective. load() with another world size redistributes: each process
    reads every rank<r>.pt and keeps the state of the matrices it owns now (RNG states: those of
    rank r mod the old world size)."""

    def __init__(self, folder: str, args: Hyperparameters, rank: int, world: int,
                 device: torch.device,
                 model: nn.Module, optimizers: list[torch.optim.Optimizer], loader: DataLoader,
                 record_path: str,
                 train_files: list[str], val_files: list[str]):
        self.folder, self.args, self.rank, self.world = folder, args, rank, world
        self.device, self.model, self.optimizers = device, model, optimizers
        self.loader, self.record_path = loader, record_path
        self.shards = {"train_files": shard_list(train_files), "val_files": shard_list(val_files)}
        self.last = args.resume or ""  # the newest valid checkpoint of this run

    def _holds(self, opt: torch.optim.Optimizer, p: torch.Tensor, writing: bool) -> bool:
        """Whether this process saves (writing) or needs (loading) p's state: the owner of a block
        matrix; for other optimizers, which every process runs whole, rank 0 saves and every process
        loads."""
        if isinstance(opt, MatrixOptimizer):
            return opt.holds(p)
        return self.rank == 0 or not writing

    def _agree(self, error: str) -> str:
        """This process's failure ('' if none) once every process knows whether any failed
        (collective): '' if none did; another process's failure reads 'a write failed on another
        process'."""
        if self.world > 1:
            failed = torch.tensor([float(bool(error))], device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            if failed.item() and not error:
                return "a write failed on another process"
        return error

    def save(self, step: int, progress: dict) -> str:
        """Write step_<step>/ (collective); returns its path. Every process writes its files into
        step_<step>.tmp/; one agreement (an all-reduce) tells all whether every write held; then
        process 0 publishes it (_publish). Process 0 first makes room (make_room): a save that
        cannot fit fails as a failed write does. A failed write (any OSError: a read-only or full
        disk) on any process removes step_<step>.tmp/ and returns '', the reason in self.error; the
        previous checkpoint stays self.last and the run goes on."""
        final = os.path.join(self.folder, f"step_{step:06d}")
        tmp, error = final + ".tmp", ""
        try:
            os.makedirs(tmp, exist_ok=True)
            if self.rank == 0:  # the others write theirs; the agreement below fails them too
                error = make_room(self.folder, self.last)
            if not error:
                self._write(tmp, step, progress)
        except OSError as e:
            error = os_error(e)
        error = self._agree(error)
        if not error:
            error = self._publish(step, tmp, final)
        self.error = error
        if error:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            return ""
        self.last = final
        return final

    def _publish(self, step: int, tmp: str, final: str) -> str:
        """On process 0, once every file of step <step> is in tmp/: files an earlier, cut attempt at
        this step left there removed, tmp/ renamed to final/ (durably), then every other
        step_<n>.tmp/ (saves cut by a kill) and the checkpoints beyond --keep_checkpoints removed.
        '' or the failure's line (the other processes go on:
        nothing of theirs depends on it). No other process can be writing a later save meanwhile:
        that needs a training step, whose all-reduces wait for process 0."""
        if self.rank != 0:
            return ""
        try:
            mine = {"main.pt", "meta.json"} | {f"rank{r}.pt" for r in range(self.world)}
            for name in set(os.listdir(tmp)) - mine:
                os.remove(os.path.join(tmp, name))
            # a step saved before, on a branch of the run that a resume abandoned
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            fd = os.open(self.folder, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            return os_error(e)
        for stale in glob.glob(os.path.join(glob.escape(self.folder), "step_*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)
        for old in checkpoints_in(self.folder)[:-self.args.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return ""

    def _write(self, tmp: str, step: int, progress: dict) -> None:
        """This process's files of step <step>'s save into tmp/: rank<r>.pt; on process 0 main.pt
        and meta.json too."""
        states = []
        for opt in self.optimizers:
            params = optimizer_params(opt)
            states.append({i: s for i, s in opt.state_dict()["state"].items()
                           if s and self._holds(opt, params[i], writing=True)})
        _save_synced({"optimizers": states, "rng": rng_state(self.device)},
                     os.path.join(tmp, f"rank{self.rank}.pt"))
        if self.rank == 0:
            _save_synced({"model": self.model.state_dict(), "loader": self.loader.state(),
                          "progress": progress,
                          "param_groups": [opt.state_dict()["param_groups"]
                                           for opt in self.optimizers]},
                         os.path.join(tmp, "main.pt"))
            meta = {"format": CHECKPOINT_FORMAT, "step": step,
                    "num_iterations": self.args.num_iterations,
                    "world_size": self.world, "record": os.path.abspath(self.record_path),
                    "saved_at": time.time(),
                    "torch": torch.__version__, "args": dataclasses.asdict(self.args),
                    **self.shards}
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())

    def load(self, path: str) -> dict:
        """Restore model, optimizers, data loader and RNGs from a checkpoint (all processes);
        returns its progress:
        step, training_ms, timed_steps, losses. Every file is read and checked first
        (read_checkpoint_file, check_weights, check_states); anything that still does not fit ends
        in one SystemExit line: the run has not written anything yet."""
        meta = read_checkpoint_meta(path)
        main = read_checkpoint_file(path, "main.pt", ("model", "loader", "progress",
                                                      "param_groups"))
        check_weights(path, main["model"], self.model)
        if not isinstance(main["progress"], dict) or main["progress"].get("step") != meta["step"]:
            raise SystemExit(f"--resume {path}: main.pt is not at step {meta['step']}, where its "
                             "meta.json says: a "
                             f"damaged or mixed checkpoint; {RESUME_ANOTHER}")
        states: list[dict] = [{} for _ in self.optimizers]
        for r in range(meta["world_size"]):
            part = read_checkpoint_file(path, f"rank{r}.pt", ("optimizers", "rng"))
            if not isinstance(part["optimizers"],
                              list) or len(part["optimizers"]) != len(self.optimizers):
                raise SystemExit(f"--resume {path}: rank{r}.pt does not hold the state of "
                                 f"{len(self.optimizers)} "
                                 f"optimizers: a damaged or mixed checkpoint; {RESUME_ANOTHER}")
            for opt, saved, mine in zip(self.optimizers, part["optimizers"], states):
                check_states(path, f"rank{r}.pt", opt, saved)
                params = optimizer_params(opt)
                mine.update({i: s for i, s in saved.items() if self._holds(opt, params[i],
                                                                           writing=False)})
            if r == self.rank % meta["world_size"]:
                rng = part["rng"]
        try:
            self.model.load_state_dict(main["model"])
            for opt, state, groups in zip(self.optimizers, states, main["param_groups"],
                                          strict=True):
                made = [dict(g) for g in opt.param_groups]
                opt.load_state_dict({"state": state, "param_groups": groups})
                # keys the code that saved it did not have: as the checkpoint's settings make them
                for group, fresh in zip(opt.param_groups, made):
                    for key, value in fresh.items():
                        group.setdefault(key, value)
            self.loader.load_state(main["loader"])
            set_rng_state(rng, self.device)
            return {k: main["progress"][k] for k in ("step", "training_ms", "timed_steps",
                                                     "losses")}
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise SystemExit(f"--resume {path}: its files do not fit the model, optimizers and "
                             f"data its meta.json describes ({type(e).__name__}: {first_line(e)}); "
                             f"{RESUME_ANOTHER}") from None


RESUME_ANOTHER = "resume another checkpoint of the run (a step_<n>/ folder beside it)"


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ('' if none)."""
    return (str(e).strip().splitlines() or [""])[0]


def read_checkpoint_file(path: str, name: str, keys: tuple[str, ...]) -> dict:
    """torch.load (weights only) of one file of a checkpoint, a dict holding `keys`; SystemExit
    naming it if not."""
    try:
        obj = torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
    # truncated (EOFError, RuntimeError), random bytes (UnpicklingError), unreadable (OSError)
    except Exception as e:
        raise SystemExit(f"--resume {path}: cannot read {name} ({type(e).__name__}: "
                         f"{first_line(e)}): truncated or "
                         f"damaged; {RESUME_ANOTHER}") from None
    if not isinstance(obj, dict) or set(keys) - set(obj):
        raise SystemExit(f"--resume {path}: {name} does not hold {', '.join(keys)}: not a "
                         "train_gpt2.py checkpoint "
                         f"file; {RESUME_ANOTHER}")
    return obj


def check_weights(path: str, saved, model: nn.Module) -> None:
    """main.pt's weights have exactly the names and shapes of the model that meta.json's settings
    build."""
    want = model.state_dict()
    saved = saved if isinstance(saved, dict) else {}
    fault = next((f"has no {k}" for k in want if k not in saved), None) or next(
        (f"holds {k}, which they do not make" for k in saved if k not in want), None) or next(
        (f"holds {k} of shape {tuple(getattr(v, 'shape', ()))}, they make {tuple(want[k].shape)}"
         for k, v in saved.items() if not isinstance(v, torch.Tensor) or v.shape != want[k].shape),
         None)
    if fault:
        raise SystemExit(f"--resume {path}: main.pt {fault} by the settings in its meta.json: "
                         "meta.json and the "
                         f"weights disagree (a damaged or edited checkpoint); {RESUME_ANOTHER}")


def check_states(path: str, name: str, opt: torch.optim.Optimizer, saved) -> None:
    """An optimizer's saved state: a dict of parameter index -> state, indices in range, the entries
    its rule declares shaped like the parameter (state_like_param; AdamW's exp_avg, exp_avg_sq) of
    its shape."""
    params = optimizer_params(opt)
    for i, st in (saved.items() if isinstance(saved, dict) else [(None, None)]):
        if type(i) is not int or not 0 <= i < len(params) or not isinstance(st, dict):
            raise SystemExit(f"--resume {path}: {name} holds a {type(opt).__name__} state for "
                             f"parameter {i!r}, which "
                             f"it does not have ({len(params)}): a damaged or mixed checkpoint; "
                             f"{RESUME_ANOTHER}")
        for key in getattr(opt, "state_like_param", ("exp_avg", "exp_avg_sq")):
            v = st.get(key)
            if isinstance(v, torch.Tensor) and v.shape != params[i].shape:
                raise SystemExit(f"--resume {path}: {name} holds {type(opt).__name__}'s {key} of "
                                 f"parameter {i} with "
                                 f"shape {tuple(v.shape)}, the parameter has "
                                 f"{tuple(params[i].shape)}: a damaged or "
                                 f"mixed checkpoint; {RESUME_ANOTHER}")


def save_logged(checkpoints: Checkpoints, step: int, progress: dict, args: Hyperparameters,
                log) -> None:
    """checkpoints.save, then its record line: `checkpoint: step:s/N PATH`, or, when a write failed
    (the run goes on), `checkpoint: step:s/N not saved (the reason); ...` naming the checkpoint
    kept."""
    path = checkpoints.save(step, progress)
    if path:
        log(f"checkpoint: step:{step}/{args.num_iterations} {path}")
    else:
        kept = (f"the previous one stays: {checkpoints.last}" if checkpoints.last else
                "no earlier checkpoint")
        log(f"checkpoint: step:{step}/{args.num_iterations} not saved ({checkpoints.error}); its "
            f"partial files are removed, {kept}")


@contextlib.contextmanager
def run_lock(folder: str):
    """An exclusive lock (flock) on <folder>/.lock while a resumed run continues the run of that
    checkpoint folder: a second resume of it at once is refused, instead of two runs interleaving
    one record. The file goes when the run ends; the system drops the lock with the process, however
    it ends (a file left by a killed run locks nothing)."""
    path = os.path.join(folder, ".lock")
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:  # removed by its holder meanwhile
            raise OSError
    except OSError:
        f.close()
        raise SystemExit(f"--resume: another process is continuing this run already (it holds "
                         f"{path}); wait for it to end, or stop it") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        f.close()


def resume_hint(last: str) -> str:
    """How to go on from the newest checkpoint of the run, or that there is none."""
    return f"continue with --resume {last}" if last else "no checkpoint to continue from"

# ----------------------------------------------------------------------------- infra: determinism


# --deterministic 1: the attention backends allowed (auto: flash, else math). Flash's backward is
# deterministic only in PyTorch's strict mode (use_deterministic_algorithms without warn_only; else
# it accumulates dQ with atomics), which Determinism.backward turns on; the math backend is plain
# matmuls and softmax; efficient and cudnn are refused
DETERMINISTIC_ATTENTION = {"auto": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
                           "flash": SDPBackend.FLASH_ATTENTION,
                           "math": SDPBackend.MATH}


# CUBLAS_WORKSPACE_CONFIG: fixed workspaces, so cuBLAS picks one reduction order
CUBLAS_DETERMINISTIC = ":4096:8"


# warnings that name an op without a deterministic implementation (warn_only mode): the op is group
# 1
NONDETERMINISTIC_WARNINGS = (re.compile(r"^(.+?) does not have a deterministic implementation"),
                             re.compile(r"^(.+?) defaults to a non-deterministic algorithm"),
                             re.compile(r"this operation is not deterministic because it uses "
                                        r"(CuBLAS)"))


class Determinism:
    """--deterministic 1: bit-identical reruns of one setting on one device. On entry:
    CUBLAS_WORKSPACE_CONFIG (before cuBLAS makes its handles: train() enters this first),
    torch.use_deterministic_algorithms(True, warn_only=True), cudnn deterministic without
    benchmarking, Inductor's deterministic mode (no benchmarking that picks kernels or configs);
    each warning of an op without a deterministic implementation becomes one record line
    `deterministic: no deterministic implementation of <op>` (once per op). backward() runs a
    backward in strict mode, where flash attention takes its deterministic algorithm. The Triton
    kernels here (_softmax_xent_kernel, _syrk_kernel) write each output once, without atomics, from
    fixed tile configs: deterministic as they are.
    Off: nothing changes. On exit every flag is as before."""

    def __init__(self, on: bool):
        self.on, self.ops, self.lines, self.log = on, set(), [], None
        self._old: dict = {}

    def __enter__(self) -> "Determinism":
        if not self.on:
            return self
        self._old = dict(env=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                         algorithms=torch.are_deterministic_algorithms_enabled(),
                         warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                         cudnn=(torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
                         inductor=getattr(torch._inductor.config, "deterministic", None),
                         showwarning=warnings.showwarning)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        # torch 2.13 also turns it on with use_deterministic_algorithms
        if self._old["inductor"] is not None:
            torch._inductor.config.deterministic = True
        warnings.showwarning = self._showwarning
        return self

    def __exit__(self, *exc) -> None:
        if not self.on:
            return
        old = self._old
        warnings.showwarning = old["showwarning"]
        if old["inductor"] is not None:
            torch._inductor.config.deterministic = old["inductor"]
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old["cudnn"]
        torch.use_deterministic_algorithms(old["algorithms"], warn_only=old["warn_only"])
        if old["env"] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = old["env"]

    def describe(self) -> str:
        """The record's `deterministic:` line of this run's setting."""
        if not self.on:
            return "deterministic: off"
        inductor = "" if self._old["inductor"] is None else ", inductor deterministic"
        return (f"deterministic: on (use_deterministic_algorithms warn_only, backward strict, "
                f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}, cudnn "
                f"deterministic{inductor})")

    def attach(self, log) -> None:
        """Send the op lines to `log` (the record's), those seen so far first."""
        self.log = log
        for line in self.lines:
            log(line)

    def note(self, message: str) -> bool:
        """Whether `message` names an op without a deterministic implementation; its line is logged
        the first time."""
        for pattern in NONDETERMINISTIC_WARNINGS:
            found = pattern.search(message)
            if found:
                op = found.group(1).strip()
                if op not in self.ops:
                    self.ops.add(op)
                    self.lines.append(f"deterministic: no deterministic implementation of {op}")
                    if self.log is not None:
                        self.log(self.lines[-1])
                return True
        return False

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        if not self.note(str(message)):
            self._old["showwarning"](message, category, filename, lineno, file, line)

    @contextlib.contextmanager
    def backward(self):
        """Within: strict mode (no warn_only), so ops with a deterministic algorithm used only there
        (flash attention's backward) take it; an op with none stops the run with its name."""
        if not self.on:
            yield
            return
        torch.use_deterministic_algorithms(True, warn_only=False)
        try:
            yield
        except RuntimeError as e:
            if "does not have a deterministic implementation" not in str(e):
                raise
            raise SystemExit(f"--deterministic 1: {str(e).splitlines()[0]}; run with "
                             "--deterministic 0") from None
        finally:
            torch.use_deterministic_algorithms(True, warn_only=True)


class StopSignals:
    """While active, SIGTERM and SIGINT ask the run to stop: the training loop all-reduces the
    request with the train loss, so every process saves a checkpoint at the end of the same step,
    then exits with 128 + the signal number. A second SIGINT stops at once (exit status 130), naming
    the checkpoint to continue from."""

    def __init__(self):
        self.signum, self._old = 0, {}
        self.last = lambda: ""  # the newest checkpoint (train sets it): named on a second SIGINT

    def __enter__(self) -> StopSignals:
        # Python takes signals in the main thread only
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
                # restart system calls it interrupts (gloo's sockets), not EINTR
                signal.siginterrupt(s, False)
        return self

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum:  # a second Ctrl-C: stop now, no traceback
            os.write(2, (f"SIGINT again: stopped at once, without a checkpoint of this step; "
                         f"{resume_hint(self.last())}\n").encode())
            raise SystemExit(128 + signal.SIGINT)
        self.signum = self.signum or signum
        os.write(2, f"{signal.Signals(signum).name}: stopping with a checkpoint at the end of this "
                 "step\n".encode())

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

# ----------------------------------------------------------------------------- infra: records, MFU


class Record:
    """<records_dir>/<time>-<preset>-<optimizer>-<id>.txt: the source, the settings as JSON,
    versions and devices, then modded-nanogpt's `step:s/N val_loss:... train_time:...ms
    step_avg:...ms` lines, train-loss lines, peak memory. Also `checkpoint: step:s/N PATH` after
    each save, `resumed: step:s/N from PATH ...` where a resumed run continues (lines of steps after
    s above it were redone), `stopped: step:s/N by SIGTERM; ...` and
    `diverged: step:s/N last_good_step:g optimizer:NAME ...` where a run ended early, and
    `gram_fallbacks: step:s/N k of M matrices ...` before the step line of a Gram refresh at which k
    Choleskys of C + damping I failed (counts by the damping factor that then held)."""

    def __init__(self, args: Hyperparameters, world: int, device: torch.device, path: str,
                 resume: str = ""):
        self.path, self.lost = path, ""  # lost: why a write to the record failed, once one has
        # continue the checkpoint's record: a `resumed:` line, then the lines of the steps after it
        if resume:
            meta = read_checkpoint_meta(resume)
            try:
                self.file = open(path, "a+")  # +: readable, so a deleted record can be rewritten
            except OSError as e:
                raise SystemExit(f"--resume {resume}: cannot append to its record ({os_error(e)}); "
                                 "make it "
                                 f"writable") from None
            saved = checkpoint_settings(resume)
            changed = {k: getattr(args, k) for k in RESUME_MAY_CHANGE[1:] if getattr(args,
                                                                                     k) != getattr(
                                                                                         saved, k)}
            self.log(f"resumed: step:{meta['step']}/{args.num_iterations} from {resume} "
                     f"world_size:{world} "
                     f"(saved with {meta['world_size']})" + (f" changed: {json.dumps(changed)}"
                                                             if changed else ""))
            return
        with open(__file__) as f:
            source = f.read()
        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if device.type == "cuda" else ["cpu"])
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self.file = open(path, "x+")  # never overwrite; +: see log
            self.file.write(f"{RECORD_MARK}\n{source}\n{RECORD_MARK}\n")
            self.file.write(f"hyperparameters: {json.dumps(dataclasses.asdict(args))}\n")
            self.file.write(f"torch: {torch.__version__} cuda: {torch.version.cuda} python: "
                            f"{sys.version.split()[0]}\n")
            self.file.write(f"devices: {json.dumps(devices)}\nworld_size: {world}\n")
            self.file.flush()
        except OSError as e:  # no stub record: what was written goes
            if hasattr(self, "file"):
                self.close()
                with contextlib.suppress(OSError):
                    os.remove(path)
            raise SystemExit(f"--records_dir {args.records_dir}: cannot write the record {path} "
                             f"({os_error(e)}); "
                             f"free space or pass a writable --records_dir") from None
        print(f"record: {self.path}")

    def log(self, line: str) -> None:
        """Print the line and append it to the record; once a write fails (a full disk), say so once
        and print only."""
        print(line, flush=True)
        if self.lost:
            return
        try:
            self.file.write(line + "\n")
            self.file.flush()
            if os.fstat(self.file.fileno()).st_nlink == 0:  # deleted: written again, whole
                self._rewrite()
        except OSError as e:
            self.lost = os_error(e)
            print(f"record: cannot write {self.path} ({self.lost}): it ends before the line above; "
                  "the run goes on, "
                  f"its lines printed here only", file=sys.stderr, flush=True)

    def _rewrite(self) -> None:
        """The record was deleted while the run had it open: a new file at its path with every
        line so far (read back from the open file), said once on stderr."""
        self.file.seek(0)
        text = self.file.read()
        with contextlib.suppress(OSError):
            self.file.close()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.file = open(self.path, "x+")
        self.file.write(text)
        self.file.flush()
        print(f"record: {self.path} was deleted during the run; written again with every line so "
              "far", file=sys.stderr, flush=True)

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the lines it could not write were reported by log
            pass

    def finish(self, peak_mib: int) -> None:
        self.log(f"peak memory consumption: {peak_mib} MiB")
        self.close()


RECORD_MARK = "=" * 40 + " train_gpt2.py record " + "=" * 40


def record_name(args: Hyperparameters) -> str:
    """<time>-<preset>-<optimizer>-<8 random hex digits>: a new run's record (.txt) and checkpoint
    folder name."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{args.preset}-{args.optimizer}-{uuid.uuid4().hex[:8]}"


def flops_per_token(args: Hyperparameters) -> int:
    """Forward + backward FLOPs of one token: 6 N + 6 L T d, N = 12 L d^2 + V d matmul weights (qkv
    3 d^2, proj d^2, MLP 8 d^2 per layer, the head V d), causal attention 6 L T d (half of 12 L T
    d). GPT-124M, T = 1024: 0.798 GFLOP."""
    L, d = args.n_layer, args.n_embd
    return 6 * (12 * L * d * d + args.vocab_size * d) + 6 * L * args.sequence_length * d


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 50,
                  dtype=torch.bfloat16) -> float:
    """The matrix rate the MFU is measured against: 2 n^3 / (mean time of `reps` n x n x n products,
    after 3 warm-up products), in TFLOP/s."""
    # not the global RNG: training's draws stay as without it
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def rate_text(tflops: float) -> str:
    """A TFLOP/s figure: one decimal, or three significant digits below 1 (a busy CPU's 512^3 rate
    would read 0.0)."""
    return f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.3g}"


def mfu_line(args: Hyperparameters, step_avg_ms: float, tflops: float, world: int,
             what: str) -> str:
    """The record's `matmul:` line: MFU = floor / step_avg, floor = flops_per_token * tokens a step
    / (world rate)."""
    floor_ms = flops_per_token(args) * args.batch_size * args.sequence_length / (
        world * tflops * 1e12) * 1e3
    return (f"matmul: {what} {rate_text(tflops)} TFLOP/s per device, mfu: "
            f"{100 * floor_ms / step_avg_ms:.1f}% "
            f"(floor {floor_ms:.1f} ms a step, step_avg {step_avg_ms:.2f} ms)")


# cuda? -> n, dtype, reps
MATMUL_CHECK = {True: (8192, torch.bfloat16, 50), False: (512, torch.float32, 10)}


def matmul_rate(device: torch.device, world: int) -> float:
    """The mean over processes of matmul_tflops on each one's device (CUDA: 8192^3 bf16; CPU: a
    quick 512^3 fp32);
    collective with world > 1."""
    n, dtype, reps = MATMUL_CHECK[device.type == "cuda"]
    rate = torch.tensor(matmul_tflops(device, n, reps, dtype), device=device)
    if world > 1:
        dist.all_reduce(rate)  # a sum: gloo has no average
    return rate.item() / world


def matmul_check(args: Hyperparameters, step_avg_ms: float, device: torch.device, world: int,
                 before: float) -> str:
    """The matmul rate timed again after training (matmul_rate); the mfu_line of the larger of it
    and `before` (timed before training), both named in the line: a GPU hot from a run clocks lower
    (records/speed/README.md), and the floor is what the GPU can do."""
    after = matmul_rate(device, world)
    n, dtype, _ = MATMUL_CHECK[device.type == "cuda"]
    name = (torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu") + (
        f", mean of {world}" if world > 1 else "")
    what = (f"{n}^3 {str(dtype).removeprefix('torch.')} ({name}; {rate_text(before)} before "
            "training, "
            f"{rate_text(after)} after: "
            f"the larger)")
    return mfu_line(args, step_avg_ms, max(before, after), world, what)


def exit_now(code: int | str | None) -> None:
    """Print a SystemExit-style message, flush, and leave without the interpreter's teardown: with
    torch 2.13 on gloo, threads a distributed run leaves behind abort a normal exit (SIGABRT) about
    one time in three."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1 if code else 0)


def main(argv: list[str]) -> None:
    """The command: train(parse_args(argv)) and exit (exit_now): 0 when done or the run is complete
    already, the message and 1 for refused settings, data errors and a divergence, 128 + the signal
    after a stop signal."""
    try:
        # the record and model stay referenced until exit_now: freeing a DDP model on gloo can
        # deadlock (its group's destructor joins a worker thread that waits for the GIL)
        done = train(parse_args(argv))  # noqa: F841
    except RunComplete as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(e.message)
        exit_now(0)
    except ShardError as e:
        exit_now(f"data error: {e}")
    except SystemExit as e:  # refused settings, a divergence, a stop signal
        exit_now(e.code)
    exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1:])
