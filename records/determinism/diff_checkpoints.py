"""Where two runs first differ, read from their checkpoints: the first step whose saved tensors are not bit-identical,
and which tensors (model weights, optimizer states, RNG states) differ there, by how much. For finding the kernel
that makes `--deterministic 1` reruns drift, or for checking that an edit left the math unchanged.

    python train_gpt2.py ... --deterministic 1 --save_every 1 --keep_checkpoints 1000 --checkpoint_dir A
    python train_gpt2.py ... --deterministic 1 --save_every 1 --keep_checkpoints 1000 --checkpoint_dir B
    python records/determinism/diff_checkpoints.py A/<run> B/<run> [--all] [--top 20]

Each argument is a run's checkpoint folder (holding step_<n>/) or one step_<n>/ folder. Steps present in both are
compared in order; the report stops at the first that differs (--all: every step). Exit status: 0 identical, 1 they
differ, 2 nothing to compare.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

STEP = re.compile(r"^step_(\d+)$")


def steps_in(folder: Path) -> dict[int, Path]:
    """step -> its step_<n>/ folder: the folder itself if it is one, else the step_<n>/ inside (complete ones only:
    a save in progress is step_<n>.tmp/)."""
    m = STEP.match(folder.name)
    if m and (folder / "main.pt").exists():
        return {int(m.group(1)): folder}
    return {int(STEP.match(p.name).group(1)): p for p in folder.iterdir()
            if p.is_dir() and STEP.match(p.name) and (p / "main.pt").exists()}


def flatten(obj, prefix: str, out: dict) -> dict:
    """Nested dicts, lists and tuples to {dotted name: leaf}."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = obj
    return out


def load_step(folder: Path) -> dict:
    """Every leaf of main.pt and rank<r>.pt, named <file>.<path>."""
    out: dict = {}
    for f in sorted(folder.glob("*.pt")):
        flatten(torch.load(f, map_location="cpu", weights_only=True), f.stem, out)
    return out


def bits(x: torch.Tensor) -> torch.Tensor:
    """x's raw bytes, as a flat uint8 tensor."""
    return x.reshape(-1).contiguous().view(torch.uint8)


def differences(a: dict, b: dict) -> list[tuple[str, str]]:
    """(name, how) for each leaf that is not bit-identical, the largest |a - b| first among tensors."""
    rows = []
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            rows.append((name, float("inf"), "only in " + ("the first" if name in a else "the second")))
            continue
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                rows.append((name, float("inf"), f"shape/dtype {tuple(x.shape)} {x.dtype} vs "
                                                 f"{tuple(y.shape)} {y.dtype}"))
            elif not torch.equal(bits(x), bits(y)):  # bitwise: equal NaNs are equal, -0 and +0 are not
                if x.is_floating_point() or x.is_complex():
                    d = (x.double() - y.double()).abs()
                    n = int((x != y).sum())
                    rows.append((name, float(d.max()), f"{n} of {x.numel()} entries, max |a - b| {float(d.max()):.3e}, "
                                                       f"max |a| {float(x.double().abs().max()):.3e}"))
                else:
                    rows.append((name, float("inf"), f"{int((x != y).sum())} of {x.numel()} entries ({x.dtype})"))
        elif x != y:
            rows.append((name, float("inf"), f"{x!r} vs {y!r}"))
    return [(name, how) for name, _, how in sorted(rows, key=lambda r: -r[1])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    ap.add_argument("--all", action="store_true", help="report every common step, not only up to the first difference")
    ap.add_argument("--top", type=int, default=20, help="tensors listed per differing step (default 20)")
    a = ap.parse_args(argv)
    for p in (a.first, a.second):
        if not p.is_dir():
            print(f"error: {p}: not a folder", file=sys.stderr)
            return 2
    sa, sb = steps_in(a.first), steps_in(a.second)
    common = sorted(sa.keys() & sb.keys())
    if not common:
        print(f"error: no step saved in both ({sorted(sa)} and {sorted(sb)}): pass two runs' checkpoint folders "
              f"saved with --save_every", file=sys.stderr)
        return 2
    first_diff = None
    for step in common:
        diffs = differences(load_step(sa[step]), load_step(sb[step]))
        if not diffs:
            print(f"step {step}: identical")
            continue
        first_diff = step if first_diff is None else first_diff
        print(f"step {step}: {len(diffs)} differ")
        for name, how in diffs[:a.top]:
            print(f"  {name}: {how}")
        if len(diffs) > a.top:
            print(f"  ... {len(diffs) - a.top} more")
        if not a.all:
            break
    if first_diff is None:
        print(f"identical at every common step ({len(common)}: {common[0]}..{common[-1]})")
        return 0
    print(f"first difference at step {first_diff}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
