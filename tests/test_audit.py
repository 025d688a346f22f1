"""Quick checks of what the rule tests cannot see, each failed by a one-line edit that every other
quick test passes:
- scale: Muon, Newton-Muon and AdamW are scale-invariant, so the raw accumulated .grad and the
  collected C are checked themselves against the mean gradient and X^T X / n of the step's tokens (1
  process with accumulation 2, 2 gloo processes with accumulation 2);
- the lr of every parameter group (the embedding/head AdamW and the block matrices) at warmup,
  plateau and warmdown;
- the embedding AdamW and the model's constants against modded-nanogpt b9979e6 (B9979E6, read from
  its source);
- every Hyperparameters default against DEFAULTS (a changed default must change the table);
- SOAP's shampoo_beta (negative: beta2; 0 allowed) and its max_precond_dim boundary;
- the fused loss's padded vocabulary columns with logits of a trained head's size;
- PolarGrad's polar_express coefficients against Emerging-Optimizers' (its docstring's claim);
and, slow: Newton-Muon and LocoProp-S on 1, 2 and 4 processes give bit-identical parameters.
tests/mutants.py holds a one-line mutant of train_gpt2.py for each that these tests kill."""
import dataclasses
import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import train_gpt2 as t
from conftest import SMALL_VOCAB, TINY, make_shards
from test_optimizers import (RefSOAP, displacement_error, grads, init_params, ns64, run_impl,
                             run_ref, soap_bases)


pytestmark = pytest.mark.usefixtures("one_thread")


def shards(folder) -> list[str]:
    train, val = make_shards(folder, vocab=SMALL_VOCAB)
    return ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train, "--input_val_bin", val,
            "--records_dir", str(folder / "records"), "--matmul_check", "0",
            "--final_checkpoint", "0"]


def setting_names(args) -> list[str]:
    if dataclasses.is_dataclass(args):
        return [f.name for f in dataclasses.fields(args)]
    return list(vars(args))

# ------------------------------------------------------------------------------- scale: .grad and C


def watch_first_step(out: dict) -> None:
    """Replace t.build_optimizers by one that also records, into `out`: the initial parameters
    ("init"), every training forward's (tokens, targets) ("tokens"), each parameter's .grad as
    the first optimizer's step 0 sees it ("grads") and the collected C of each matrix the block
    optimizer holds at its step 0 ("grams"), by name."""
    real = t.build_optimizers

    def build(model, args):
        optimizers = real(model, args)
        names = {p: n for n, p in model.named_parameters()}
        out.update(init={k: v.detach().clone() for k, v in model.state_dict().items()}, tokens=[])

        def forward(module, inputs):
            if module.training and torch.is_grad_enabled():
                out["tokens"].append((inputs[0].clone(), inputs[1].clone()))

        def first(opt, *_):
            out.setdefault("grads", {n: p.grad.detach().clone() for p, n in names.items()})

        def blocks(opt, *_):
            out.setdefault("grams", {names[p]: st["gram"].clone() for p, st in opt.state.items()
                                     if "gram" in st})

        model.register_forward_pre_hook(forward)
        optimizers[0].register_step_pre_hook(first)
        optimizers[-1].register_step_pre_hook(blocks)
        return optimizers

    t.build_optimizers = build


def reference_grads_and_grams(argv: list[str], init: dict, tokens: list) -> tuple[dict, dict, int]:
    """The model at `init` on all `tokens` as one batch: the mean loss's gradient and X^T X / n
    of each block matrix's input (float64), by parameter name, and n."""
    # the MLP's c_proj as a module call, which the hook sees
    args = t.parse_args(argv + ["--recompute_gelu", "0"])
    model = t.GPT(args)
    model.load_state_dict(init)
    x, y = torch.cat([a for a, _ in tokens]), torch.cat([b for _, b in tokens])
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=f"transformer.h.{name}.weight":
                                     inputs.update({n: i[0].reshape(-1, i[0].size(-1)).double()}))
             for name, m in model.transformer.h.named_modules() if isinstance(m, nn.Linear)]
    model(x, y).backward()
    for h in hooks:
        h.remove()
    grams = {n: X.T @ X / x.numel() for n, X in inputs.items()}
    return {n: p.grad.double() for n, p in model.named_parameters()}, grams, x.numel()


def check_scale(runs: list[dict], argv: list[str], n_tokens: int) -> None:
    """Each process's .grad is the mean gradient of the step's tokens (all processes, all
    micro-batches) and each matrix's C is X^T X / (the step's token count); together the
    processes hold every matrix's C."""
    tokens = [batch for run in runs for batch in run["tokens"]]
    ref_grads, ref_grams, n = reference_grads_and_grams(argv, runs[0]["init"], tokens)
    assert n == n_tokens and len(ref_grams) == 8  # 2 blocks x (c_attn, c_proj, c_fc, c_proj)
    for run in runs:
        assert run["grads"].keys() == ref_grads.keys()
        for name, g in run["grads"].items():
            err = ((g.double() - ref_grads[name]).norm() / ref_grads[name].norm()).item()
            assert err < 1e-4, (name, err)
    held = {}
    for run in runs:
        held.update(run["grams"])
    assert held.keys() == ref_grams.keys()
    for name, C in held.items():
        err = ((C.double() - ref_grams[name]).norm() / ref_grams[name].norm()).item()
        assert err < 1e-5, (name, err)


SCALE = TINY + ["--optimizer", "newton_muon", "--gram_every", "1", "--num_iterations", "1",
                "--warmup_iters", "0", "--warmdown_iters", "0"]


def test_one_process_accumulated_grad_and_gram_scale(tmp_path, monkeypatch):
    """1 process, 2 micro-batches of 2 x 32 tokens: .grad is the mean gradient of the 128 tokens
    (not their sum over micro-batches) and C = X^T X / 128."""
    out = {}
    monkeypatch.setattr(t, "build_optimizers", t.build_optimizers)  # restored after the swap below
    watch_first_step(out)
    argv = SCALE + shards(tmp_path)
    t.train(t.parse_args(argv))
    assert len(out["tokens"]) == 2
    check_scale([out], argv, 4 * 32)


def _scale_worker(rank: int, world: int, port: int, argv: list[str], folder: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = {}
    watch_first_step(out)
    t.train(t.parse_args(argv))
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # without the interpreter's teardown, which gloo's threads can abort


def test_two_processes_grad_and_gram_scale(tmp_path):
    """2 gloo processes, each 2 micro-batches of 2 x 32 tokens: every process's .grad is the mean
    gradient of the step's 256 tokens (DDP averages, accumulation divides) and C = X^T X / 256
    summed over both processes' tokens (the all-reduce sums, the count is the step's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = SCALE + ["--batch_size", "8"] + shards(tmp_path)
    mp.spawn(_scale_worker, args=(2, port, argv, str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [len(r["tokens"]) for r in runs] == [2, 2]
    assert all(r["grams"] for r in runs)  # each process owns some matrices
    check_scale(runs, argv, 8 * 32)

# ---------------------------------------------------------------------- lr of every parameter group


# the setting each optimizer's block group takes its lr from (a new optimizer must join)
BLOCK_LR = {"muon": "muon_lr", "polargrad": "polargrad_lr", "soap": "soap_lr",
            "newton_muon": "muon_lr", "locoprop": "locoprop_lr", "adamw": "adamw_lr"}
# num_iterations 8, warmup 3, warmdown 3: (it + 1) / 3 for it < 3; 1 until 5; then (8 - it) / 3
SCHEDULE = [1 / 3, 2 / 3, 1, 1, 1, 1, 2 / 3, 1 / 3]


@pytest.mark.parametrize("optimizer", list(BLOCK_LR))
def test_every_parameter_group_follows_the_lr_schedule(optimizer, tmp_path, monkeypatch):
    """Every group of every optimizer steps with its base lr times the schedule at warmup,
    plateau and warmdown steps; the embedding's first AdamW step moves its largest entry by its
    lr then (Adam's first step is lr sign(g))."""
    assert set(BLOCK_LR) == set(t.OPTIMIZERS)
    seen, moved = [], []
    real = t.build_optimizers

    def build(model, args):
        optimizers = real(model, args)
        for i, opt in enumerate(optimizers):
            opt.register_step_pre_hook(
                lambda o, *_, i=i: seen.append((i, [g["lr"] for g in o.param_groups])))
        head, before = model.lm_head.weight, []
        optimizers[0].register_step_pre_hook(lambda o, *_: before.append(head.detach().clone()))
        optimizers[0].register_step_post_hook(
            lambda o, *_: moved.append((head.detach() - before.pop()).abs().max().item()))
        return optimizers

    monkeypatch.setattr(t, "build_optimizers", build)
    t.train(t.parse_args(TINY + shards(tmp_path) + [
        "--optimizer", optimizer, "--num_iterations", "8", "--warmup_iters", "3",
        "--warmdown_iters", "3", "--embed_lr", "0.011", f"--{BLOCK_LR[optimizer]}", "0.023",
        "--gram_every", "2"]))
    assert len(seen) == 2 * len(SCHEDULE) and len(moved) == len(SCHEDULE)
    for step, mult in enumerate(SCHEDULE):
        (i, embed), (j, blocks) = seen[2 * step: 2 * step + 2]
        assert (i, j) == (0, 1)
        assert embed == pytest.approx([0.011 * mult], rel=1e-12), step
        assert blocks == pytest.approx([0.023 * mult] * len(blocks), rel=1e-12) and blocks, step
    assert moved[0] == pytest.approx(0.011 / 3, rel=1e-3)


@pytest.mark.parametrize("it,mult", [(0, 1 / 250), (124, 125 / 250), (249, 1.0), (250, 1.0),
                                     (4999, 1.0), (5000, 1.0), (5001, 1999 / 2000), (6000, 0.5),
                                     (6999, 1 / 2000)])
def test_lr_multiplier_of_the_record(it, mult):
    """b9979e6's get_lr for the record's 7000 steps, warmup 250, warmdown 2000."""
    assert t.lr_multiplier(it, t.parse_args([])) == pytest.approx(mult, rel=1e-12)

# ----------------------------------------------------------------- b9979e6's settings and constants


# KellerJordan/modded-nanogpt b9979e6df16c7e18c3bb4da0070ad88bae530de4, train_gpt2.py and run.sh,
# what the project keeps of it:
# - run.sh: --batch_size 64 (per GPU, 8 GPUs) --sequence_length 1024 --num_iterations 7000
#   --learning_rate 0.0018 --warmup_iters 250 --warmdown_iters 2000 (its --weight_decay 0.1 reaches
#   no optimizer: configure_optimizers passes 0);
# - configure_optimizers: AdamW(lm_head.parameters(), lr=learning_rate, betas=(0.9, 0.95),
#   weight_decay=0) with torch's eps, and OrthogonalNesterov(transformer.h.parameters(),
#   lr=10 * learning_rate, momentum=0.95) with nesterov=True;
# - validation: val_max_steps 20 batches of 8 x 64 x 1024 tokens; GPTConfig d12: vocab 50257,
#   12 layers, 12 heads, 768 wide;
# - model: wte tied to lm_head = nn.Linear(n_embd, vocab, bias=False), so nn.Linear's init
#   U(+-1/sqrt(fan_in)) everywhere; Block: x + attn_scale attn(rmsnorm(x)), then
#   x + mlp(rmsnorm(x)), attn_scale = 1/sqrt(2 n_layer); rmsnorm: x / sqrt(mean(x^2) + 1e-6) in
#   fp32, no weight; attention: c_attn (no bias) -> q, k, v; rotary on q and k, base 10000,
#   inv_freq = 1/base^(arange(0, hd, 2)/hd), halves rotated (x1 cos + x2 sin, -x1 sin + x2 cos);
#   causal SDPA; c_proj (no bias); MLP: c_proj(gelu(c_fc(x))), 4x wide, exact GELU; a final
#   rmsnorm; fp32 logits, mean cross-entropy.
B9979E6 = dict(
    embed_adamw=dict(lr=0.0018, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, amsgrad=False,
                     maximize=False),
    muon=dict(lr=10 * 0.0018, momentum=0.95, nesterov=True),
    settings=dict(batch_size=8 * 64, sequence_length=1024, num_iterations=7000, warmup_iters=250,
                  warmdown_iters=2000, val_tokens=20 * 8 * 64 * 1024, vocab_size=50257, n_layer=12,
                  n_head=12, n_embd=768),
    model=dict(attn_scale=lambda n_layer: 1 / math.sqrt(2 * n_layer), rms_eps=1e-6,
               rotary_base=10000.0, init_bound=lambda fan_in: 1 / math.sqrt(fan_in)),
)


def test_embedding_adamw_and_muon_are_b9979e6s():
    args = t.parse_args(["--n_layer", "1", "--n_embd", "64", "--n_head", "2", "--vocab_size",
                         "100"])
    model = t.GPT(args)
    embed, blocks = t.build_optimizers(model, args)
    assert type(embed) is torch.optim.AdamW and len(embed.param_groups) == 1
    group = embed.param_groups[0]
    assert group["params"] == [model.lm_head.weight]
    assert model.transformer.wte.weight is model.lm_head.weight
    assert {k: group[k] for k in B9979E6["embed_adamw"]} == B9979E6["embed_adamw"]
    assert type(blocks) is t.Muon and len(blocks.param_groups) == 1
    muon = {k: blocks.param_groups[0][k] for k in B9979E6["muon"]}
    assert muon == pytest.approx(B9979E6["muon"], rel=1e-12)
    assert blocks.param_groups[0]["params"] == list(model.transformer.h.parameters())
    defaults = t.parse_args([])
    assert {k: getattr(defaults, k) for k in B9979E6["settings"]} == B9979E6["settings"]


def test_init_is_b9979e6s():
    """Every matrix (the tied embedding/head included) is U(-b, b), b = 1/sqrt(fan_in):
    nn.Linear's init, at the record's width (the sample's max and std settle b and the
    distribution to 0.1% and 1%)."""
    args = t.parse_args(["--n_layer", "1"])
    torch.manual_seed(0)
    model = t.GPT(args)
    names = [n for n, _ in model.named_parameters()]
    # no biases, norm weights or position embedding
    assert names == ["transformer.wte.weight"] + [f"transformer.h.0.{m}.weight" for m in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for name, p in model.named_parameters():
        b = B9979E6["model"]["init_bound"](p.size(1))
        w = p.detach()
        assert w.abs().max() <= b and w.abs().max() >= 0.999 * b, name
        assert abs(w.std().item() / (b / math.sqrt(3)) - 1) < 0.01, name
        assert abs(w.mean().item()) < 0.01 * b, name
    assert [tuple(p.shape) for p in model.transformer.h[0].parameters()] == [
        (2304, 768), (768, 768), (3072, 768), (768, 3072)]


def reference_forward(model: t.GPT, idx, targets, n_layer: int, attn_scale=None, rms_eps=None,
                      base=None, gelu="none") -> tuple[list[torch.Tensor], torch.Tensor]:
    """b9979e6's GPT forward written from B9979E6["model"] on the model's parameters (by name),
    in float64: each block's output and the loss."""
    c = B9979E6["model"]
    attn_scale = c["attn_scale"](n_layer) if attn_scale is None else attn_scale
    rms_eps = c["rms_eps"] if rms_eps is None else rms_eps
    base = c["rotary_base"] if base is None else base
    W = {n: p.detach().double() for n, p in model.named_parameters()}
    n_head = model.transformer.h[0].attn.n_head

    def rms(x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + rms_eps)

    def attention(x, i):
        B, T, C = x.shape
        hd = C // n_head
        q, k, v = (x @ W[f"transformer.h.{i}.attn.c_attn.weight"].T).split(C, -1)
        q, k, v = (z.view(B, T, n_head, hd) for z in (q, k, v))
        inv_freq = 1 / base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq
        cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]

        def rotate(z):
            z1, z2 = z[..., :hd // 2], z[..., hd // 2:]
            return torch.cat([z1 * cos + z2 * sin, -z1 * sin + z2 * cos], -1)

        q, k = rotate(q).transpose(1, 2), rotate(k).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, C)
        return y @ W[f"transformer.h.{i}.attn.c_proj.weight"].T

    x, outputs = W["transformer.wte.weight"][idx], []
    for i in range(n_layer):
        x = x + attn_scale * attention(rms(x), i)
        h = rms(x) @ W[f"transformer.h.{i}.mlp.c_fc.weight"].T
        x = x + F.gelu(h, approximate=gelu) @ W[f"transformer.h.{i}.mlp.c_proj.weight"].T
        outputs.append(x)
    logits = rms(x) @ W["transformer.wte.weight"].T
    return outputs, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def test_forward_is_b9979e6s():
    """Each block's output equals b9979e6's forward written from its constants (float64) to 3e-6
    relative (the fp32 forward's rounding: 1.1e-6), the loss to 1e-6; each constant changed alone
    (residual scale, RMSNorm eps, rotary base, GELU) moves the last block's output by over 30x
    that tolerance (measured: 0.28, 1.1e-3, 0.71, 2.0e-4)."""
    n_layer = 3
    args = t.parse_args(["--n_layer", str(n_layer), "--n_head", "2", "--n_embd", "64",
                         "--vocab_size", "256", "--sequence_length", "64"])
    torch.manual_seed(0)
    model = t.GPT(args)
    with torch.no_grad():  # weights of a trained model's size, so every constant shows
        for p in model.transformer.h.parameters():
            p.mul_(4)
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 256, (2, 2, 64), generator=g)
    outputs = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double()))
    with torch.no_grad():
        loss = model(idx, targets).double()
        want, want_loss = reference_forward(model, idx, targets, n_layer)

        def error(a, b):
            return ((a - b).norm() / b.norm()).item()

        errors = [error(a, b) for a, b in zip(outputs, want)]
        assert len(errors) == n_layer and max(errors) < 3e-6, errors
        assert abs(loss - want_loss) < 1e-6 * want_loss, (loss.item(), want_loss.item())
        for changed in (dict(attn_scale=1 / math.sqrt(n_layer)), dict(rms_eps=1e-5),
                        dict(base=1000.0), dict(gelu="tanh")):
            moved = reference_forward(model, idx, targets, n_layer, **changed)[0][-1]
            assert error(moved, want[-1]) > 30 * 3e-6, changed

# ------------------------------------------------------------------------------------ every default


# Hyperparameters' defaults: changing one must change this table (and the README or record that
# justifies it)
DEFAULTS = {
    "input_bin": "data/fineweb10B/fineweb_train_*.bin",
    "input_val_bin": "data/fineweb10B/fineweb_val_*.bin",
    "batch_size": 512, "device_batch_size": 64, "sequence_length": 1024,
    # the optimization track's model and its settings (--preset track3 sets them)
    "model": "gpt2", "val_tail_every": 0, "embed_eps": 1e-8, "embed_weight_decay": 0.0,
    "head_lr": 0.004, "scalar_lr": 0.015, "muon_lerp": False, "muon_weight_decay": 0.0,
    "locoprop_weight_decay": 0.0,
    # the Newton-Muon paper's choices (off by default: tests/test_golden.py sets them)
    "gram_phase": 0, "gram_start": 0.0, "gram_ridge": "matrix", "gram_damping_eps": 0.0,
    "num_iterations": 7000, "stop_at": 0, "warmup_iters": 250, "warmdown_iters": 2000,
    "val_loss_every": 125, "val_tokens": 10485760, "seed": 0, "deterministic": False,
    "vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768,
    "optimizer": "muon", "embed_lr": 0.0018, "embed_betas": (0.9, 0.95),
    "muon_lr": 0.018, "muon_momentum": 0.95, "muon_nesterov": True, "muon_shape_scale": False,
    "ns_coeffs": "simple",
    "adamw_lr": 0.0018, "adamw_betas": (0.9, 0.95), "adamw_weight_decay": 0.0,
    "polargrad_lr": 0.3, "polargrad_momentum": 0.95, "polargrad_nesterov": False,
    "polargrad_weight_decay": 0.0, "polargrad_nuclear": "inner",
    "polargrad_ns_coeffs": "polar_express",
    "soap_lr": 0.0018, "soap_betas": (0.95, 0.95), "soap_shampoo_beta": -1.0, "soap_eps": 1e-8,
    "soap_weight_decay": 0.0, "soap_precondition_frequency": 10, "soap_max_precond_dim": 10000,
    "soap_tf32": False,
    "gram": "full", "gram_block": 128, "gram_every": 8, "gram_beta": 0.0, "gram_damping": 0.2,
    "gram_f": "solve", "newton_muon_precondition": "before",
    # fp32, as the Newton-Muon paper's code (records/bf16-preconditioner: bf16 operands' error)
    "gram_apply": "fp32",
    "locoprop_lr": 0.3, "locoprop_lambda": 1.0, "locoprop_lambda_mode": "absolute",
    "locoprop_steps": 0, "locoprop_nu": 1.0, "locoprop_momentum": 0.0,
    "loss_chunk": 8192, "attention": "auto", "activation_budget": 1.0, "recompute_gelu": True,
    "gram_overlap": True,
    "compile": True, "compile_mode": "default", "matmul_check": True, "records_dir": "runs",
    "label": "", "preset": "speedrun",
    "save_every": 0, "final_checkpoint": True, "keep_checkpoints": 2, "checkpoint_dir": "",
    "resume": "",
}


def test_every_default_is_in_the_table():
    """Every setting's default, value and type (a bool stays a bool, a float a float), without
    arguments and as the dataclass's own."""
    for args in (t.parse_args([]), t.Hyperparameters()):
        have = {name: getattr(args, name) for name in setting_names(args)}
        assert set(have) == set(DEFAULTS), set(have) ^ set(DEFAULTS)
        for name, want in DEFAULTS.items():
            same = have[name] == want and type(have[name]) is type(want)
            assert same, (name, have[name], want)

# ---------------------------------------------------------------------------------- SOAP's branches


SOAP_SHAPES = [(288, 96), (96, 96)]


def soap_error(steps: int = 7, frequency: int = 3, **kw) -> tuple[float, callable]:
    """The project's SOAP in float64 on SOAP_SHAPES (refreshes at t = 3 and 6) and a function
    giving its displacement error against RefSOAP with the given settings, from the project's
    first-step bases."""
    p0, gs, bases = init_params(SOAP_SHAPES), grads(SOAP_SHAPES, steps, seed=2), []
    a = run_impl(lambda ps: t.SOAP(ps, precondition_frequency=frequency, **kw), gs, p0,
                 torch.float64, keep=soap_bases(bases))
    return lambda **ref: displacement_error(a, run_ref(
        RefSOAP, gs, p0, initial_bases=list(bases), frequency=frequency, **ref), p0)


def test_soap_shampoo_beta_negative_takes_beta2_and_zero_is_allowed():
    """shampoo_beta < 0 is beta2 for L and R's EMA (the fork's soap.py: shampoo_beta if >= 0 else
    betas[1]); 0 is a value (L = G G^T of the last gradient), not the fallback; the settings take
    0 and refuse 1."""
    betas = (0.9, 0.6)
    error = soap_error(betas=betas, shampoo_beta=-1.0)
    assert error(betas=betas, shampoo_beta=0.6) < 1e-9
    assert error(betas=betas, shampoo_beta=0.9) > 1e-2  # beta1
    assert error(betas=betas, shampoo_beta=0.0) > 1e-2
    error = soap_error(betas=betas, shampoo_beta=0.0)
    assert error(betas=betas, shampoo_beta=0.0) < 1e-9
    assert error(betas=betas, shampoo_beta=0.6) > 1e-2
    t.check_optimizer_args(t.parse_args(["--optimizer", "soap", "--soap_shampoo_beta", "0"]))
    with pytest.raises(SystemExit, match="--soap_shampoo_beta: must be"):
        t.check_optimizer_args(t.parse_args(["--optimizer", "soap", "--soap_shampoo_beta", "1"]))


@pytest.mark.parametrize("max_dim,sides", [(96, (False, True)), (95, (False, False)),
                                           (288, (True, True))])
def test_soap_max_precond_dim_boundary(max_dim, sides):
    """A side of length <= max_precond_dim gets an eigenbasis, a longer one none (the fork's
    soap.py: `if sh > max_precond_dim` -> no preconditioner): 288 x 96 and 96 x 96 at max 96, 95
    and 288, against RefSOAP."""
    error = soap_error(max_precond_dim=max_dim)
    assert error(max_dim=max_dim) < 1e-9
    assert error(max_dim=max_dim - 1 if max_dim != 95 else 96) > 1e-2  # a side more or fewer
    ps = [torch.nn.Parameter(p) for p in init_params(SOAP_SHAPES)]
    opt = t.SOAP(ps, max_precond_dim=max_dim)
    for p, g in zip(ps, grads(SOAP_SHAPES, 1)[0]):
        p.grad = g
    opt.step()
    have = [("QL" in opt.state[p], "QR" in opt.state[p]) for p in ps]
    assert have == [sides, (sides[1], sides[1])]

# ------------------------------------------------------------------------ the loss's padded columns


def test_fused_loss_padding_with_a_trained_heads_logits():
    """GPT-2's vocabulary (50257, padded to 50304 rows) with logits of std 3 about -8 (most of a
    trained head's vocabulary far below its top few): loss and both gradients of the fused loss
    equal float64 F.cross_entropy, in chunks and under no_grad, the last real column a target.
    One padded column (logit 0) in the softmax would move the loss by > 30x the tolerance."""
    V, d, N = 50257, 64, 96
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, d, generator=g)
    x[:, 0] = 4.0  # a feature every row shares
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # rms-normed, as the head's input
    w = 0.42 * torch.randn(V, d, generator=g)
    w[:, 0] = -2.2  # with x's shared feature: logits ~ -8 +- 3
    y = torch.randint(0, V, (N,), generator=g)
    y[:3] = torch.tensor([V - 1, 0, V - 2])
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    z64 = x64 @ w64.T
    assert abs(z64.mean().item() + 8) < 0.5 and abs(z64.std().item() - 3) < 0.5
    ref = F.cross_entropy(z64, y)
    gx, gw = torch.autograd.grad(ref, (x64, w64))
    tol = 1e-6 * ref.item()  # measured: 1.7e-6 of 14.7
    with torch.no_grad():
        padded = F.cross_entropy(torch.cat([z64, torch.zeros(N, 1, dtype=torch.float64)], 1), y)
    assert abs(padded - ref) > 30 * tol
    for chunk in (40, 8192):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = t.linear_cross_entropy(xs, ws, y, chunk)
        fx, fw = torch.autograd.grad(loss, (xs, ws))
        assert abs(loss.double() - ref) < tol, (chunk, loss.item(), ref.item())
        torch.testing.assert_close(fx.double(), gx, rtol=1e-4, atol=1e-5 * gx.abs().max().item())
        torch.testing.assert_close(fw.double(), gw, rtol=1e-4, atol=1e-5 * gw.abs().max().item())
        with torch.no_grad():
            assert abs(t.linear_cross_entropy(x, w, y, chunk).double() - ref) < tol, chunk

# --------------------------------------------------------------- 1, 2 and 4 processes, feature-gram


FEATURE_GRAM = {"newton_muon": ["--gram", "full"],
                "locoprop": ["--gram", "full", "--locoprop_momentum", "0.5"],
                "locoprop_steps": ["--gram", "block", "--gram_block", "16",
                                   "--locoprop_steps", "3"]}


def run_feature_gram(rank: int) -> dict:
    """For each FEATURE_GRAM case, 6 steps on the 2-layer, 64-wide model with fixed gradients
    (the same on every process) and C refreshed at steps 0, 2 and 4 from a forward of process 0
    alone (the others add zero sums, so the all-reduce is exact whatever the world size): {case:
    (initial and final block parameters, owner ranks)}."""
    out = {}
    for case, extra in FEATURE_GRAM.items():
        optimizer = "locoprop" if case.startswith("locoprop") else case
        args = t.parse_args(["--n_layer", "2", "--n_head", "2", "--n_embd", "64",
                             "--vocab_size", "256", "--optimizer", optimizer, *extra])
        torch.manual_seed(0)
        model = t.GPT(args)
        opt = t.build_optimizers(model, args)[-1]
        ps = list(opt.param_groups[0]["params"])
        p0 = [p.detach().clone() for p in ps]
        gs = grads([tuple(p.shape) for p in ps], 6, seed=7, scale=1e-2)
        idx = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
        for step, step_grads in enumerate(gs):
            if step % 2 == 0:
                model.collect_gram(True)
                if rank == 0:
                    with torch.no_grad():
                        model(idx, idx)
                model.collect_gram(False)
                opt.refresh_gram(n_tokens=idx.numel())
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()
        out[case] = (p0, [p.detach().clone() for p in ps], [opt.owner[p] for p in ps])
    return out


def _gram_worker(rank: int, world: int, init_file: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run_feature_gram(rank), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_feature_gram_processes_equal_one(tmp_path, world):
    """Newton-Muon and LocoProp-S (exact and K-step, full and block C, with momentum) on W gloo
    processes, each factoring C and updating the matrices it owns, end with the parameters 1
    process computes, bit for bit."""
    mp.spawn(_gram_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    one = run_feature_gram(0)
    for case in FEATURE_GRAM:
        p0, final, owners = one[case][0], one[case][1], ranks[0][case][2]
        assert set(owners) == set(range(world))
        assert all(ranks[r][case][2] == owners for r in range(world)) and set(one[case][2]) == {0}
        assert min((p - q).abs().max().item() for p, q in zip(final, p0)) > 1e-4, case  # all moved
        for i, p in enumerate(final):
            assert all(torch.equal(ranks[r][case][1][i], p) for r in range(world)), (case, i)


# -------------------------------------------- PolarGrad's polar_express and Emerging-Optimizers'


# NVIDIA-NeMo/Emerging-Optimizers fd7729267109a8848709e9406bf19e53e970c3f4, muon_utils.py,
# _COEFFICIENT_SETS["polar_express"]: the paper's polynomials with the 1.01 safety factor folded
# into each (a / 1.01, b / 1.01^3, c / 1.01^5), to 4 decimals, the norm unscaled; its first 5
EO_POLAR_EXPRESS = [(8.2051, -22.9019, 16.4607), (4.0664, -2.8612, 0.5184),
                    (3.9096, -2.8234, 0.5250), (3.2856, -2.4153, 0.4853),
                    (2.2779, -1.6198, 0.3985)]


@pytest.mark.parametrize("shape", [(256, 256), (192, 768)])
def test_polar_express_differs_from_emerging_optimizers(shape):
    """PolarGrad's default coefficients, polar_express (the paper's, 1.01 on the norm), and
    Emerging-Optimizers' polar_express share each polynomial to 4 decimals but not the norm's
    factor: their O differ by 2-3% in float64 (2.8% and 3.0% here; 1.9% at 768 x 768, 2.3% at
    768 x 3072), so the PolarGrad golden compares quintic, Emerging-Optimizers' default."""
    steps, f = t.NS_COEFFS["polar_express"]
    assert f == 1.01
    assert all(abs(x - y) < 1e-4 for s, e in zip(steps, EO_POLAR_EXPRESS) for x, y in zip(s, e))
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = G / G.norm()
    for a, b, c in EO_POLAR_EXPRESS:
        A = X @ X.T
        X = a * X + b * A @ X + c * A @ (A @ X)
    assert 0.015 < ((ns64(G, "polar_express") - X).norm() / X.norm()).item() < 0.035
