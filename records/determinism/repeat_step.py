"""Which part of a training step is not bit-reproducible: the forward, the backward or the optimizer step.

    python records/determinism/repeat_step.py --repeats 3 [train_gpt2.py settings, e.g. --preset compare
        --deterministic 1 --input_bin ... --input_val_bin ... --compile 0 --attention math]

Builds the run as train_gpt2.py does (the settings given, checkpoints under a temporary folder), takes the first
batch, then `--repeats` times from the same saved state: forward (loss), backward (every gradient), the optimizers'
step (every parameter after it). Each stage's tensors are compared bit for bit with the first repeat's; the first
gradients (in backward order, from the head down) and parameters that differ are named. Within one process the
kernels are the same each time, so a difference here is an order-dependent reduction (atomics); the last line, a
sha256 of the first repeat's gradients and parameters, compares two processes (two launches with the same settings).
Exit status: 0 all repeats identical, 1 some stage differs.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import random
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt2 as t  # noqa: E402
from diff_checkpoints import bits  # noqa: E402


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for x in tensors:
        h.update(bits(x.detach()).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def differing(names: list[str], a: list[torch.Tensor], b: list[torch.Tensor]) -> list[str]:
    """`name (max |a - b|)` for each pair not bit-identical, last first (the backward's order: head first)."""
    out = []
    for name, x, y in reversed(list(zip(names, a, b))):
        if not torch.equal(bits(x), bits(y)):
            out.append(f"{name} ({(x.double() - y.double()).abs().max().item():.2e})")
    return out


class Run(SimpleNamespace):
    """What one_step needs of a run, made by start: args, model (compiled as train() compiles it),
    raw_model, optimizers, loader, autocast, attention, sync."""


def start(args) -> Run:
    """The seeded model, its optimizers and the data loader of one process, compiled and run as
    train() does (train_gpt2.train, its first part)."""
    rank, world, device = t.setup_distributed()
    cuda = device.type == "cuda"
    accum = t.validate_args(args, world)
    train_files, _, _, _ = t.check_inputs(args, world)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    model = raw_model = t.MODELS[args.model](args).to(device)
    optimizers = t.build_optimizers(raw_model, args)
    loader = t.DataLoader(train_files, args.device_batch_size, args.sequence_length, rank, world,
                          accum, args.vocab_size, device)
    if cuda and args.compile:
        model = t.compile_for_cuda(model, args, optimizers)
    backend = (t.DETERMINISTIC_ATTENTION if args.deterministic else t.ATTENTION_BACKENDS)[args.attention]
    return Run(args=args, model=model, raw_model=raw_model, optimizers=optimizers, loader=loader,
               autocast=torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext(),
               attention=(lambda: sdpa_kernel(backend)) if backend is not None else contextlib.nullcontext,
               sync=torch.cuda.synchronize if cuda else (lambda: None))


def one_step(run: Run, batch, model_state, opt_states, determinism: t.Determinism):
    """From the saved state: the loss, the gradients and the parameters after every optimizer's step."""
    run.raw_model.load_state_dict(model_state)
    for opt, state in zip(run.optimizers, opt_states):
        opt.load_state_dict(copy.deepcopy(state))
    x, y = batch
    with run.autocast, run.attention():
        loss = run.model(x, y)
    with determinism.backward():
        loss.backward()
    params = list(run.raw_model.named_parameters())
    grads = [p.grad.detach().clone() for _, p in params]
    for opt in run.optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * t.lr_multiplier(1, run.args)
        opt.step()
    after = [p.detach().clone() for _, p in params]
    run.model.zero_grad(set_to_none=True)
    run.sync()
    return loss.detach().clone(), grads, after


def main(argv: list[str]) -> int:
    repeats = 3
    if "--repeats" in argv:
        i = argv.index("--repeats")
        repeats, argv = int(argv[i + 1]), argv[:i] + argv[i + 2:]
    tmp = tempfile.mkdtemp(prefix="repeat-step-")
    args = t.parse_args([*argv, "--records_dir", tmp, "--checkpoint_dir", tmp, "--label", "repeat-step"])
    with t.StopSignals(), t.Determinism(args.deterministic) as determinism:
        run = start(args)
        batch = run.loader.next_batch()
        names = [n for n, _ in run.raw_model.named_parameters()]
        model_state = copy.deepcopy(run.raw_model.state_dict())
        opt_states = [copy.deepcopy(o.state_dict()) for o in run.optimizers]
        results = [one_step(run, batch, model_state, opt_states, determinism) for _ in range(repeats)]
        print(determinism.describe())
        for line in determinism.lines:
            print(line)
    loss0, grads0, after0 = results[0]
    same = True
    for r, (loss, grads, after) in enumerate(results[1:], 1):
        stages = dict(forward=differing(["loss"], [loss0], [loss]),
                      backward=differing(names, grads0, grads),
                      step=differing(names, after0, after))
        for stage, diff in stages.items():
            same &= not diff
            print(f"repeat {r} vs 0, {stage}: " + ("identical" if not diff else
                                                    f"{len(diff)} differ, first: {', '.join(diff[:4])}"))
    print(f"loss {loss0.item():.9f}; sha256 gradients {digest(grads0)}, parameters after the step {digest(after0)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
