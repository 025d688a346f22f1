"""GPT-2 (124M) speedrun trainer for optimizer research. One file, read top to bottom:
settings -> optimizers -> model -> data -> training loop -> records.

    torchrun --standalone --nproc_per_node=8 train_gpt2.py                 # the Muon record: 7000 steps, ~3.28 val loss
    python train_gpt2.py --preset smoke                                    # tiny model, CPU, about a minute
    python train_gpt2.py --optimizer adamw --num_iterations 400 --label x  # any field: --field value
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------- settings


@dataclass
class Hyperparameters:
    # data: glob patterns of shards in the FineWeb format (data/cached_fineweb10B.py fetches them)
    input_bin: str = "data/fineweb10B/fineweb_train_*.bin"
    input_val_bin: str = "data/fineweb10B/fineweb_val_*.bin"
    # batch: batch_size sequences of sequence_length tokens per step = world_size * device_batch_size * accumulation
    batch_size: int = 8 * 64
    device_batch_size: int = 64
    sequence_length: int = 1024
    # schedule
    num_iterations: int = 7000
    warmup_iters: int = 250
    warmdown_iters: int = 2000
    val_loss_every: int = 125  # 0: only at the end
    val_tokens: int = 10485760
    seed: int = 0
    # model (GPT-2 small)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # optimizers: the tied embedding/head always uses AdamW; `optimizer` picks what the block matrices use
    optimizer: str = "muon"
    embed_lr: float = 0.0018
    embed_betas: tuple[float, float] = (0.9, 0.95)
    muon_lr: float = 0.018
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_shape_scale: bool = False  # multiply the update by max(1, rows/cols)**0.5
    ns_coeffs: str = "simple"  # simple | quintic | polar_express
    adamw_lr: float = 0.0018
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_weight_decay: float = 0.0
    # run
    compile: bool = True  # torch.compile the model and the orthogonalization (CUDA only)
    records_dir: str = "records"
    label: str = ""
    preset: str = "speedrun"


PRESETS: dict[str, dict] = {
    "speedrun": {},  # the record: the dataclass defaults
    "smoke": dict(  # a tiny model on the sample shipped in data/sample/: the whole pipeline in about a minute on CPU
        input_bin="data/sample/sample_train_*.bin", input_val_bin="data/sample/sample_val_*.bin",
        n_layer=2, n_head=2, n_embd=128, batch_size=8, device_batch_size=4, sequence_length=128,
        num_iterations=60, warmup_iters=5, warmdown_iters=20, val_loss_every=20, val_tokens=16384,
    ),
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


def parse_args(argv: list[str]) -> Hyperparameters:
    """`--field value` for every Hyperparameters field; `--preset name` applies a named set first, explicit fields win."""
    kinds = {f.name: f.type for f in fields(Hyperparameters)}
    given: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, _, val = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key not in kinds:
            hint = difflib.get_close_matches(key or arg, list(kinds), n=1)
            raise SystemExit(f"unknown setting {arg!r}" + (f"; did you mean --{hint[0]}?" if hint else "")
                             + f"\nsettings: {' '.join('--' + k for k in kinds)}")
        if not val:
            if i + 1 >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            i, val = i + 1, argv[i + 1]
        given[key] = val
        i += 1
    preset = given.get("preset", "speedrun")
    if preset not in PRESETS:
        raise SystemExit(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset], preset=preset)
    values.update({k: _parse_value(k, kinds[k], v) for k, v in given.items()})
    return Hyperparameters(**values)


def lr_multiplier(it: int, args: Hyperparameters) -> float:
    """(it+1)/warmup for it < warmup; 1 until num_iterations - warmdown; then (num_iterations - it)/warmdown."""
    if it < args.warmup_iters:
        return (it + 1) / args.warmup_iters
    if it < args.num_iterations - args.warmdown_iters:
        return 1.0
    return (args.num_iterations - it) / args.warmdown_iters

# ----------------------------------------------------------------------------- optimizers

# (a, b, c) per Newton-Schulz step: X <- a X + b (X X^T) X + c (X X^T)^2 X, and the factor on ||X||_F before the first step
NS_COEFFS: dict[str, tuple[list[tuple[float, float, float]], float]] = {
    "simple": ([(3.4445, -4.7750, 2.0315)] * 5, 1.0),
    "quintic": ([(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                 (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)], 1.0),
    # Polar Express (Amsel et al. 2025): safety factor 1.01 on all but the last polynomial, as in the paper's code
    "polar_express": ([(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in [
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372)]]
        + [(2.300652019954817, -1.6689039845747493, 0.4188073119525673)], 1.01),
}


def orthogonalize(G: torch.Tensor, coeffs: str = "simple") -> torch.Tensor:
    """msign(G) ~ U V^T for G = U S V^T, batched over leading dims, in bf16:
    X = G / (f ||G||_F + 1e-7); transposed so rows <= cols; per step {A = X X^T; B = A X; X = a X + b B + c A B}."""
    steps, f = NS_COEFFS[coeffs]
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * f + 1e-7)
    transpose = G.size(-2) > G.size(-1)
    if transpose:
        X = X.mT
    for a, b, c in steps:
        A = X @ X.mT
        B = A @ X
        X = a * X + b * B + c * (A @ B)
    return X.mT if transpose else X


_orthogonalize = orthogonalize  # replaced by a compiled version on CUDA (see main)


class MatrixOptimizer(torch.optim.Optimizer):
    """Base of the block-matrix optimizers. Each matrix is owned by one process (greedy by `cost`); the owner runs the
    update rule on all its matrices of one shape as a batch, then one all_gather shares the new parameters, so every
    process ends the step identical and optimizer work falls ~W-fold with W processes."""

    def __init__(self, params, defaults: dict):
        super().__init__(params, defaults)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        load = [0.0] * self.world
        self.owner: dict[torch.Tensor, int] = {}
        for p in sorted(self._params(), key=self.cost, reverse=True):  # stable: same order on every process
            r = min(range(self.world), key=lambda i: load[i])
            self.owner[p], load[r] = r, load[r] + self.cost(p)
        self._gather_buf: torch.Tensor | None = None

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @staticmethod
    def cost(p: torch.Tensor) -> float:
        m, n = p.shape
        return m * n * min(m, n)

    def update(self, params: list[torch.Tensor], group: dict) -> None:
        """Apply the rule in place to `params`, all of one shape and one group, with their .grad."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_shape: dict[torch.Size, list[torch.Tensor]] = {}
            for p in group["params"]:
                if self.owner[p] == self.rank and p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for ps in by_shape.values():
                self.update(ps, group)
        if self.world > 1:
            self._share()

    def _share(self) -> None:
        """All processes receive every owner's updated parameters: one all_gather of padded flat buffers."""
        mine = [[p for p in self._params() if self.owner[p] == r] for r in range(self.world)]
        sizes = [[p.numel() for p in ps] for ps in mine]
        size = max(sum(s) for s in sizes)
        p0 = self._params()[0]
        if self._gather_buf is None:
            self._gather_buf = torch.empty(self.world * size, dtype=p0.dtype, device=p0.device)
        flat = torch.zeros(size, dtype=p0.dtype, device=p0.device)
        if mine[self.rank]:
            torch.cat([p.reshape(-1) for p in mine[self.rank]], out=flat[: sum(sizes[self.rank])])
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # newer name first
        all_gather(self._gather_buf, flat)
        for r, ps in enumerate(mine):
            if r != self.rank and ps:
                chunks = self._gather_buf[r * size: r * size + sum(sizes[r])].split(sizes[r])
                torch._foreach_copy_(ps, [c.view_as(p) for c, p in zip(chunks, ps)])


class Muon(MatrixOptimizer):
    """buf = m buf + G; G' = G + m buf (Nesterov) or buf; p -= lr * s * orthogonalize(G'), s = max(1, rows/cols)^0.5 or 1."""

    def __init__(self, params, lr: float = 0.018, momentum: float = 0.95, nesterov: bool = True,
                 coeffs: str = "simple", shape_scale: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, coeffs=coeffs,
                                      shape_scale=shape_scale))

    def update(self, params, group):
        m = group["momentum"]
        grads = [p.grad for p in params]
        bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
        torch._foreach_mul_(bufs, m)
        torch._foreach_add_(bufs, grads)
        g = torch._foreach_add(grads, bufs, alpha=m) if group["nesterov"] else bufs
        O = _orthogonalize(torch.stack(g), group["coeffs"])
        rows, cols = params[0].shape
        scale = max(1.0, rows / cols) ** 0.5 if group["shape_scale"] else 1.0
        torch._foreach_add_(params, list(O.unbind(0)), alpha=-group["lr"] * scale)


def build_optimizers(model: nn.Module, args: Hyperparameters) -> list[torch.optim.Optimizer]:
    """AdamW on the tied embedding/head; `args.optimizer` on every matrix inside the blocks."""
    fused = next(model.parameters()).is_cuda
    embed = torch.optim.AdamW([model.lm_head.weight], lr=args.embed_lr, betas=args.embed_betas, weight_decay=0.0,
                              fused=fused)
    matrices = [p for p in model.transformer.h.parameters()]
    if args.optimizer == "muon":
        blocks = Muon(matrices, lr=args.muon_lr, momentum=args.muon_momentum, nesterov=args.muon_nesterov,
                      coeffs=args.ns_coeffs, shape_scale=args.muon_shape_scale)
    elif args.optimizer == "adamw":
        blocks = torch.optim.AdamW(matrices, lr=args.adamw_lr, betas=args.adamw_betas,
                                   weight_decay=args.adamw_weight_decay, fused=fused)
    else:
        raise SystemExit(f"--optimizer: unknown optimizer {args.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    for opt in (embed, blocks):
        for g in opt.param_groups:
            g["base_lr"] = g["lr"]
    return [embed, blocks]


OPTIMIZERS = ("muon", "adamw")

# ----------------------------------------------------------------------------- model


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + 1e-6), in fp32, no weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x)


class Rotary(nn.Module):
    """cos, sin of t * inv_freq with inv_freq = 1 / 10000^(arange(0, d, 2) / d), in fp32."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(torch.arange(T, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x (B, T, H, D): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    d = x.size(3) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], 3).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.rotary = Rotary(n_embd // n_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        cos, sin = self.rotary(T)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """x = x + attn(norm(x)) / sqrt(2 n_layer); x = x + mlp(norm(x))."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.attn = CausalSelfAttention(args.n_embd, args.n_head)
        self.mlp = MLP(args.n_embd)
        self.attn_scale = 1 / math.sqrt(2 * args.n_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_scale * self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """Token embedding tied to lm_head (Linear init), rotary attention, no positional embedding, biases or norm weights."""

    def __init__(self, args: Hyperparameters):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(args.vocab_size, args.n_embd),
            h=nn.ModuleList([Block(args) for _ in range(args.n_layer)]),
        ))
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as upstream: the Linear's init wins

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all tokens, logits in fp32."""
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(rms_norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

# ----------------------------------------------------------------------------- data

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
FIX_FINEWEB = "python data/cached_fineweb10B.py  (or data/fineweb.py to tokenize your own text)"


class ShardError(ValueError):
    def __init__(self, path: str, fault: str, fix: str = FIX_FINEWEB):
        super().__init__(f"{path}: {fault}\n  fix: {fix}")


def shard_token_count(path: str) -> int:
    """Token count from a shard's 256-int32 header (magic 20240520, version 1, count), checked against the file size."""
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ShardError(path, f"{size} bytes, shorter than the {HEADER_INTS * 4}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(path, f"magic number {header[0]}, expected {SHARD_MAGIC}: not a FineWeb-format shard")
    if header[1] != SHARD_VERSION:
        raise ShardError(path, f"version {header[1]}, expected {SHARD_VERSION}")
    ntok = int(header[2])
    if size != HEADER_INTS * 4 + 2 * ntok:
        raise ShardError(path, f"header says {ntok} tokens ({HEADER_INTS * 4 + 2 * ntok} bytes) but the file has "
                               f"{size} bytes: truncated or corrupt; delete it and fetch it again")
    return ntok


def check_shards(pattern: str, min_tokens: int, what: str) -> list[str]:
    """Sorted shard paths matching `pattern`, each with a valid header and at least `min_tokens` tokens."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ShardError(pattern, f"no {what} shards match this pattern")
    for f in files:
        if shard_token_count(f) < min_tokens:
            raise ShardError(f, f"{shard_token_count(f)} tokens, fewer than the {min_tokens} one {what} step needs")
    return files


def load_shard(path: str, vocab_size: int) -> np.ndarray:
    """Memory-mapped uint16 tokens of one shard; token ids >= vocab_size are refused."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(shard_token_count(path),))
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ShardError(path, f"token id {int(tokens.max())} >= vocab size {vocab_size}: not GPT-2 tokens",
                         fix="re-tokenize with data/fineweb.py")
    return tokens


class DataLoader:
    """Each step reads one contiguous span of batch_size * T (+1) tokens; micro-step m of process r takes sequences
    [(m W + r) B, (m W + r + 1) B) of it, so any W with W * B * accum = batch_size sees the same tokens per step.
    A span never crosses a shard: the tail of a shard too short for a step is skipped, then the next shard starts."""

    def __init__(self, files: list[str], B: int, T: int, rank: int, world: int, accum: int, vocab_size: int,
                 device: torch.device):
        self.files, self.B, self.T, self.rank, self.world, self.accum = files, B, T, rank, world, accum
        self.vocab_size, self.device = vocab_size, device
        self.span = B * T * world * accum
        self.shard, self.tokens = 0, load_shard(files[0], vocab_size)
        self.pos, self.micro = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.micro == 0 and self.pos + self.span + 1 > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.files)
            self.tokens, self.pos = load_shard(self.files[self.shard], self.vocab_size), 0
        start = self.pos + (self.micro * self.world + self.rank) * self.B * self.T
        buf = torch.from_numpy(self.tokens[start: start + self.B * self.T + 1].astype(np.int64))
        self.micro += 1
        if self.micro == self.accum:
            self.micro, self.pos = 0, self.pos + self.span
        if self.device.type == "cuda":  # pinned + non_blocking: the copy overlaps the GPU's work
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        return x, y


def val_batches(files: list[str], args: Hyperparameters, rank: int, world: int, device: torch.device):
    """The first val_tokens (+1) tokens of the val shards, split into batches of device_batch_size sequences; process r
    takes batches r, r + W, ...: the same tokens whatever W."""
    need, parts = args.val_tokens + 1, []
    for f in files:
        parts.append(load_shard(f, args.vocab_size)[: need - sum(len(p) for p in parts)])
        if sum(len(p) for p in parts) == need:
            break
    tokens = np.concatenate(parts)
    bt = args.device_batch_size * args.sequence_length
    for i in range(rank, args.val_tokens // bt, world):
        buf = torch.from_numpy(tokens[i * bt: (i + 1) * bt + 1].astype(np.int64)).to(device)
        yield buf[:-1].view(args.device_batch_size, -1), buf[1:].view(args.device_batch_size, -1)

# ----------------------------------------------------------------------------- training loop


def validate_args(args: Hyperparameters, world: int) -> int:
    """Refuse bad settings before any model is built; returns the gradient accumulation steps."""
    if args.optimizer not in OPTIMIZERS:
        raise SystemExit(f"--optimizer: unknown optimizer {args.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if args.ns_coeffs not in NS_COEFFS:
        raise SystemExit(f"--ns_coeffs: unknown set {args.ns_coeffs!r}; choose one of {', '.join(NS_COEFFS)}")
    for name in ("batch_size", "device_batch_size", "sequence_length", "num_iterations", "val_tokens", "n_layer",
                 "n_head", "n_embd", "vocab_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name}: must be positive, got {getattr(args, name)}")
    per_micro = world * args.device_batch_size
    if args.batch_size % per_micro:
        raise SystemExit(f"--device_batch_size {args.device_batch_size} x {world} processes = {per_micro} sequences "
                         f"does not divide the step's --batch_size {args.batch_size}; pick a divisor of "
                         f"{args.batch_size // world if args.batch_size % world == 0 else args.batch_size}")
    val_bt = world * args.device_batch_size * args.sequence_length
    if args.val_tokens % val_bt:
        raise SystemExit(f"--val_tokens {args.val_tokens} is not a multiple of {world} processes x "
                         f"--device_batch_size {args.device_batch_size} x --sequence_length {args.sequence_length} "
                         f"= {val_bt}")
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise SystemExit(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head} with an even head dim")
    return args.batch_size // per_micro


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


class Timer:
    """Milliseconds of one region of a step: CUDA events on the GPU (no sync until read), the host clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        if cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self.begin.record() if self.cuda else setattr(self, "t", time.perf_counter())

    def stop(self) -> None:
        self.end.record() if self.cuda else setattr(self, "elapsed", 1000 * (time.perf_counter() - self.t))

    def ms(self) -> float:
        return self.begin.elapsed_time(self.end) if self.cuda else self.elapsed


def train(args: Hyperparameters) -> tuple[str, nn.Module]:
    """Train, validate, write a record; returns the record's path on process 0 ('' elsewhere) and the model."""
    rank, world, device = setup_distributed()
    master = rank == 0
    accum = validate_args(args, world)
    T, B = args.sequence_length, args.device_batch_size
    train_files = check_shards(args.input_bin, args.batch_size * T + 1, "train")
    val_files = check_shards(args.input_val_bin, 0, "val")
    have = sum(shard_token_count(f) for f in val_files)
    if have < args.val_tokens + 1:
        raise ShardError(args.input_val_bin, f"val shards hold {have} tokens, fewer than --val_tokens "
                                             f"{args.val_tokens} + 1", fix=f"pass --val_tokens <= {have - 1} "
                                             f"(a multiple of {world * B * T})")
    cuda = device.type == "cuda"
    record = Record(args, world, device) if master else None
    log = record.log if master else (lambda *a, **k: None)
    log(f"world_size {world}, device_batch {B} x {T}, accumulation {accum}, {args.batch_size * T} tokens/step")

    torch.manual_seed(args.seed)
    model = GPT(args).to(device)
    raw_model = model
    if cuda and args.compile:
        global _orthogonalize
        _orthogonalize = torch.compile(orthogonalize)
        model = torch.compile(model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if cuda else None)
    optimizers = build_optimizers(raw_model, args)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    loader = DataLoader(train_files, B, T, rank, world, accum, args.vocab_size, device)
    x, y = loader.next_batch()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    opt_timer = Timer(cuda)

    training_ms, t0 = 0.0, time.perf_counter()
    for step in range(args.num_iterations + 1):
        last = step == args.num_iterations
        if step == 10:  # the first 10 steps (compile warm-up) are not timed
            sync()
            training_ms, t0 = 0.0, time.perf_counter()
        timed = max(step - 10, 0)
        if last or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            sync()
            training_ms += 1000 * (time.perf_counter() - t0)
            model.eval()
            val_loss, n = torch.zeros((), device=device), 0
            with torch.no_grad():
                for vx, vy in val_batches(val_files, args, rank, world, device):
                    with autocast:
                        val_loss += model(vx, vy)
                    n += 1
            val_loss /= n
            if world > 1:
                dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
            model.train()
            log(f"step:{step}/{args.num_iterations} val_loss:{val_loss.item():.4f} train_time:{training_ms:.0f}ms "
                f"step_avg:{training_ms / timed if timed else float('nan'):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last:
            break

        train_loss = torch.zeros((), device=device)
        for micro in range(accum):
            no_sync = model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    loss = model(x, y)
                x, y = loader.next_batch()  # the next batch is read while the GPU works
                (loss / accum).backward()
            train_loss += loss.detach() / accum
        mult = lr_multiplier(step, args)
        opt_timer.start()
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
            opt.step()
        opt_timer.stop()
        model.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
        train_loss = train_loss.item()  # waits for the step: the timings below are complete
        now_ms = training_ms + 1000 * (time.perf_counter() - t0)
        log(f"step:{step + 1}/{args.num_iterations} train_loss:{train_loss:.4f} train_time:{now_ms:.0f}ms "
            f"step_avg:{now_ms / (step + 1 - 10) if step + 1 > 10 else float('nan'):.2f}ms "
            f"opt_ms:{opt_timer.ms():.2f}")

    if master:
        record.finish(torch.cuda.max_memory_allocated() // 2**20 if cuda else 0)
    if dist.is_initialized():
        dist.destroy_process_group()
    return (record.path if master else ""), raw_model

# ----------------------------------------------------------------------------- records


class Record:
    """records/<time>-<preset>-<optimizer>-<id>.txt: the source, the settings as JSON, versions and devices, then
    modded-nanogpt's `step:s/N val_loss:... train_time:...ms step_avg:...ms` lines, train-loss lines, peak memory."""

    def __init__(self, args: Hyperparameters, world: int, device: torch.device):
        os.makedirs(args.records_dir, exist_ok=True)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{args.preset}-{args.optimizer}-{uuid.uuid4().hex[:8]}.txt"
        self.path = os.path.join(args.records_dir, name)
        self.file = open(self.path, "x")  # never overwrite
        with open(__file__) as f:
            source = f.read()
        devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if device.type == "cuda" else ["cpu"])
        self.file.write(f"{RECORD_MARK}\n{source}\n{RECORD_MARK}\n")
        self.file.write(f"hyperparameters: {json.dumps(dataclasses.asdict(args))}\n")
        self.file.write(f"torch: {torch.__version__} cuda: {torch.version.cuda} python: {sys.version.split()[0]}\n")
        self.file.write(f"devices: {json.dumps(devices)}\nworld_size: {world}\n")
        self.file.flush()
        print(f"record: {self.path}")

    def log(self, line: str) -> None:
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def finish(self, peak_mib: int) -> None:
        self.log(f"peak memory consumption: {peak_mib} MiB")
        self.file.close()


RECORD_MARK = "=" * 40 + " train_gpt2.py record " + "=" * 40


if __name__ == "__main__":
    try:
        train(parse_args(sys.argv[1:]))
    except ShardError as e:
        raise SystemExit(f"data error: {e}") from None
