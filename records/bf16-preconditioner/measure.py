"""The error of applying the feature-gram preconditioner R = (C + gamma I)^-1 with bf16 operands, on a run's own
gradients and C, and what fp32 application costs.

    python records/bf16-preconditioner/measure.py --out DIR [--optimizer newton_muon|locoprop] [--steps 100,400]
        [--top 32] [--repeats 20] [--time_steps 100] -- [train_gpt2.py settings, e.g. --input_bin ...
        --input_val_bin ... --matmul_check 0 --final_checkpoint 0]

Trains `--preset compare --optimizer <optimizer>` in this process (train_gpt2.train; settings after `--` win, a
`--preset` there replaces compare). At each of --steps (a step >= num_iterations means the last one, N - 1), just
before the block rule's step (a torch optimizer step pre-hook: the Gram refresh of that step is done), it copies for
every block matrix what the rule multiplies by R (Newton-Muon, precondition before: the gradient G; after: the
Nesterov D = G + m (m buf + G); LocoProp-S: G, or its momentum mu buf + G), the momentum buffer, C and the stored R.
After the run, per matrix and step, with R64 = the rule's factor of C in float64 and R32 its factor in fp32 (what the
rule computes on the device):
  cond_R        lambda_max(R64) / lambda_min(R64) (of each block, the largest), and C's eigenvalue range
  err_R32       ||R32 - R64|| / ||R64||                    (the factor's own fp32 error, common to both settings)
  err_bf16      ||G R (bf16 operands) - G R64|| / ||G R64||  (right_precondition, bf16(G) bf16(R32))
  err_fp32      ||G R (fp32) - G R64|| / ||G R64||           (G R32 in fp32: what --gram_apply fp32 gives)
  msign_*       Newton-Muon: ||msign(X) - polar(G R64)|| / ||polar(G R64)||, polar(X) = U V^T exact in float64
                (from the eigendecomposition of the smaller Gram of X, singular values < 1e-7 s_max dropped):
                msign_bf16 / msign_fp32 (X: that product, msign exact: what the application error becomes after
                msign), ns_ref (the trainer's Newton-Schulz of G R64: NS's own error, there anyway), ns_bf16 /
                ns_fp32 (||NS(G R) - NS(G R64)|| / ||NS(G R64)||: the application error through the same NS);
                step_bf16 / step_fp32: the same for the step's own NS input, D = G R + m (m buf + G R) (before)
  top_*         the same errors for G_top = G V_k V_k^T, V_k the top k = min(--top, d/4) eigenvectors of C (of
                the whole block-diagonal C with --gram block): a G aligned with C's largest directions, the worst
                case. G_top has rank k, so its polar (msign_*) is over the largest k singular values; NS (ns_*)
                also lifts the small ones the application's rounding adds (x -> ~487 x for "simple"); step_* has
                the momentum's full rank
Timing (CUDA only; CPU timings are printed but mean nothing): the rule's optimizer step on the captured gradients of
the last captured step, as the run's step runs (compiled with --compile 1), with --gram_apply bf16 and fp32 (R stored
in that dtype), median over --repeats after 3 warm-up steps, CUDA events; and R's application alone over every block
matrix. With --time_steps N > 0, a second run with --gram_apply fp32 (the other one if the first was fp32) stopped
at step N (--stop_at: same schedule) gives step_avg and the median blocks_ms (the block rule's step) of its record
against the first run's at step N.

Writes DIR/measure.json (every row, every timing) and DIR/table.md (per layer type and step, max and median over
layers), the records of the runs under DIR/runs, and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import train_gpt2 as t  # noqa: E402

POLAR_CUTOFF = 1e-7  # polar(X) drops singular values below this times the largest


def polar(X: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """U V^T of X = U S V^T in float64, from the eigendecomposition of the smaller Gram: V S^-1 V^T X (or its
    transpose), over the singular values >= POLAR_CUTOFF s_max (the rest: zero), or over the largest `rank`."""
    X = X.double()
    if X.size(0) > X.size(1):
        return polar(X.mT, rank).mT
    lam, V = torch.linalg.eigh(X @ X.mT)
    keep = lam > (POLAR_CUTOFF ** 2) * lam[-1].clamp(min=0)
    if rank is not None:
        keep &= torch.arange(lam.numel(), device=lam.device) >= lam.numel() - rank
    s = lam[keep].sqrt()
    V = V[:, keep]
    return (V / s) @ (V.mT @ X)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def ns(X: torch.Tensor, coeffs: str) -> torch.Tensor:
    """The trainer's Newton-Schulz msign (orthogonalize, bf16) of one matrix, in float64."""
    return t.orthogonalize(X[None], coeffs)[0].double()


def full_matrix(C: torch.Tensor, mode: str) -> torch.Tensor:
    """C (full (d, d) or block (d/b, b, b)) as the (d, d) matrix it stands for."""
    return torch.block_diag(*C.unbind(0)) if mode == "block" else C


def rule_input(opt, p: torch.Tensor, group: dict) -> torch.Tensor:
    """What the rule multiplies by R at this step, from p.grad and the momentum buffer before the step."""
    G = p.grad
    buf = opt.state[p].get("momentum_buffer")
    if isinstance(opt, t.NewtonMuon) and group["precondition"] == "after":
        b = torch.zeros_like(G) if buf is None else buf
        m = group["momentum"]
        if group["lerp"]:
            b = torch.lerp(b, G, 1 - m)
            return torch.lerp(G, b, m) if group["nesterov"] else b
        b = m * b + G
        return G + m * b if group["nesterov"] else b
    if isinstance(opt, t.LocoPropS) and group["momentum"]:
        b = torch.zeros_like(G) if buf is None else buf
        return group["momentum"] * b + G
    return G


def step_input(GR: torch.Tensor, buf: torch.Tensor | None, group: dict) -> torch.Tensor:
    """Newton-Muon (before): the NS input of the step, D = G R + m (m buf + G R) (Nesterov; lerp forms as Muon's),
    via Muon.nesterov_stack on a copy of buf."""
    b = torch.zeros_like(GR) if buf is None else buf.to(GR.dtype).clone()
    D = t.Muon.nesterov_stack([GR], [b], group["momentum"], group["nesterov"], None, group["lerp"])[0]
    return D.mT if GR.size(0) > GR.size(1) else D


def errors(opt, group: dict, G: torch.Tensor, C: torch.Tensor, buf: torch.Tensor | None, top: int,
           stored: torch.Tensor | None = None) -> dict:
    """One matrix's row (the module docstring's columns) from what the rule multiplies (G), its C (as stored) and
    its momentum buffer; with the factor the rule stored, also stored_vs_R32 = ||stored - R32|| / ||R32|| (0 for an
    fp32 factor, bf16's rounding for a bf16 one: a check that R32 is the rule's factor)."""
    mode = group["gram"]
    R64 = opt.factor(C.double()[None], group)[0]
    R32 = opt.factor(C.float()[None], group)[0]
    Cf = full_matrix(C.double(), mode)
    lam, V = torch.linalg.eigh(Cf)
    # R is a function of C (of each block): its eigenvalues on C's eigenvectors
    R_eig = torch.linalg.eigvalsh(R64) if mode == "block" else (V.mT @ R64 @ V).diagonal()
    cond = (R_eig.amax(-1) / R_eig.amin(-1)).max().item()
    row = dict(C_min=lam[0].item(), C_max=lam[-1].item(), cond_R=cond, err_R32=rel(R32, R64))
    if stored is not None:
        row["stored_vs_R32"] = rel(stored.float(), R32)
    newton = isinstance(opt, t.NewtonMuon)
    coeffs = group.get("coeffs", "simple")
    k = max(1, min(top, Cf.size(0) // 4))
    Vk = V[:, -k:]
    cases = [("", G, None), ("top_", (G.double() @ Vk @ Vk.mT).to(G.dtype), k)]
    for prefix, X, rank in cases:
        exact = t.right_precondition(X.double(), R64, mode, low_precision=False)
        low = t.right_precondition(X.float(), R32, mode, low_precision=True)
        f32 = t.right_precondition(X.float(), R32, mode, low_precision=False)
        row[prefix + "err_bf16"], row[prefix + "err_fp32"] = rel(low, exact), rel(f32, exact)
        if not newton:
            continue
        P = polar(exact, rank)
        ref = ns(exact, coeffs)
        row[prefix + "msign_bf16"] = rel(polar(low, rank), P)
        row[prefix + "msign_fp32"] = rel(polar(f32, rank), P)
        row[prefix + "ns_ref"] = rel(ref, P)
        row[prefix + "ns_bf16"], row[prefix + "ns_fp32"] = rel(ns(low, coeffs), ref), rel(ns(f32, coeffs), ref)
        if group["precondition"] == "before":
            D = ns(step_input(exact, buf, group), coeffs)
            row[prefix + "step_bf16"] = rel(ns(step_input(low, buf, group), coeffs), D)
            row[prefix + "step_fp32"] = rel(ns(step_input(f32, buf, group), coeffs), D)
    return row


class Capture:
    """A torch optimizer step pre-hook that copies, at the given steps of the block rule (its step() calls,
    counted from 0), each matrix's rule input, momentum buffer, C and stored factor."""

    def __init__(self, steps: list[int]):
        self.steps, self.calls, self.opt, self.on = set(steps), 0, None, True
        self.taken: dict[int, dict[int, dict]] = {}
        self.handle = register_optimizer_step_pre_hook(self)

    def __call__(self, opt, args, kwargs) -> None:
        if not (self.on and isinstance(opt, t.FeatureGram)):
            return
        self.opt, step = opt, self.calls
        self.calls += 1
        if step not in self.steps:
            return
        opt.finish_refresh()
        got = {}
        for group in opt.param_groups:
            for p in group["params"]:
                st = opt.state[p]
                if p.grad is None or "gram" not in st:
                    continue
                buf = st.get("momentum_buffer")
                got[id(p)] = dict(G=rule_input(opt, p, group).detach().clone(), C=st["gram"].clone(),
                                  buf=None if buf is None else buf.clone(), grad=p.grad.detach().clone(),
                                  factor=st["factor"].clone() if "factor" in st else None)
        self.taken[step] = got


def layer_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n.replace("_orig_mod.", "").removesuffix(".weight") for n, p in model.named_parameters()}


def layer_type(name: str) -> str:
    """transformer.h.3.mlp.c_fc -> mlp.c_fc."""
    return re.sub(r"^.*\.h\.\d+\.", "", name)


def measure_rows(cap: Capture, names: dict[int, str], top: int) -> list[dict]:
    opt, rows = cap.opt, []
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for step, got in sorted(cap.taken.items()):
        for pid, x in got.items():
            group = group_of[pid]
            if group["gram"] == "diag":
                continue  # an elementwise product: no bf16 operands
            row = dict(step=step, layer=names.get(pid, str(pid)), shape=list(x["G"].shape),
                       factor_dtype=str(x["factor"].dtype) if x["factor"] is not None else "")
            row |= errors(opt, group, x["G"], x["C"], x["buf"], top, x["factor"])
            rows.append(row)
    return rows


def cuda_ms(fn, repeats: int, device: torch.device) -> float:
    """Median ms of fn() over `repeats` after 3 warm-up calls (CUDA events; wall clock elsewhere)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_step(cap: Capture, repeats: int) -> dict:
    """The block rule's step() and R's application alone, with gram_apply bf16 and fp32, on the last captured
    step's gradients (the parameters and buffers move: the run is over)."""
    opt = cap.opt
    last = cap.taken[max(cap.taken)]
    ps = [p for g in opt.param_groups for p in g["params"] if id(p) in last and last[id(p)]["factor"] is not None]
    if not ps:
        return {}
    device = ps[0].device
    group = opt.param_groups[0]
    saved = group["gram_apply"]
    R32 = {id(p): opt.factor(last[id(p)]["C"].float()[None], group)[0] for p in ps}
    out = {}
    cap.on = False
    for apply in ("bf16", "fp32"):
        group["gram_apply"] = apply
        for p in ps:
            p.grad = last[id(p)]["grad"].clone()
        for p in ps:
            opt._store_factors([p], R32[id(p)][None], group)
        out[f"step_ms_{apply}"] = cuda_ms(opt.step, repeats, device)
        pairs = [(last[id(p)]["G"], opt.state[p]["factor"], t.gram_low(p, apply)) for p in ps]
        out[f"apply_ms_{apply}"] = cuda_ms(
            lambda: [t.right_precondition(G, R, group["gram"], lo) for G, R, lo in pairs], repeats, device)
    group["gram_apply"] = saved
    out["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out["matrices"] = len(ps)
    return out


def record_at(path: str, step: int) -> dict:
    """step_avg at `step` and the median blocks_ms over the timed step lines up to it, from a record."""
    avg, blocks = float("nan"), []
    for line in Path(path).read_text().splitlines():
        m = re.match(r"step:(\d+)/\d+ train_loss:\S+ .*step_avg:([\d.]+)ms(?:.*blocks_ms:([\d.]+))?", line)
        if m and int(m.group(1)) <= step:
            s = int(m.group(1))
            if s == step:
                avg = float(m.group(2))
            if s > 10 and m.group(3):
                blocks.append(float(m.group(3)))
    return dict(record=path, step=step, step_avg_ms=avg,
                blocks_ms_median=statistics.median(blocks) if blocks else float("nan"))


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (step, layer type): max and median over the layers of each error column."""
    cols = [k for k in rows[0] if k.startswith(("err", "msign", "ns_", "step_", "top_", "cond"))] if rows else []
    out = []
    for key in sorted({(r["step"], layer_type(r["layer"])) for r in rows}):
        group = [r for r in rows if (r["step"], layer_type(r["layer"])) == key]
        agg = dict(step=key[0], layer=key[1], n=len(group))
        for c in cols:
            vals = [r[c] for r in group if c in r]
            agg[c] = (max(vals), statistics.median(vals))
        out.append(agg)
    return out


# the printed table's columns (DIR/table.md has all)
SHORT = ("cond_R", "err_bf16", "err_fp32", "msign_bf16", "ns_bf16", "ns_fp32", "step_bf16", "step_fp32",
         "top_err_bf16", "top_err_fp32", "top_step_bf16", "top_step_fp32")


def markdown(agg: list[dict], timing: dict, runs: dict, columns=None) -> str:
    """The table: one line per step and layer type, each cell `max / median` over its layers; `columns` (those
    present), or all."""
    if not agg:
        return "no rows\n"
    cols = [k for k in agg[0] if k not in ("step", "layer", "n") and (columns is None or k in columns)]
    lines = ["| step | layer | n | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for a in agg:
        cells = [f"{a[c][0]:.2e} / {a[c][1]:.2e}" for c in cols]
        lines.append(f"| {a['step']} | {a['layer']} | {a['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("cells: max / median over layers; errors relative to float64 (measure.py's docstring)")
    if timing:
        lines.append("")
        lines.append(f"timing ({timing['device']}, {timing['matrices']} matrices, median ms): " + ", ".join(
            f"{k} {v:.3f}" for k, v in timing.items() if k.endswith(("_bf16", "_fp32"))))
    for name, r in runs.items():
        lines.append(f"run {name}: step_avg {r['step_avg_ms']:.2f} ms at step {r['step']}, blocks_ms median "
                     f"{r['blocks_ms_median']:.2f} ({r['record']})")
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--optimizer", default="newton_muon", choices=("newton_muon", "locoprop"))
    ap.add_argument("--steps", default="100,400")
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--time_steps", type=int, default=100)
    return ap.parse_args(own), rest


def write(out: Path, result: dict, agg: list[dict]) -> str:
    """DIR/measure.json and DIR/table.md (every column); returns the short table that is printed."""
    (out / "measure.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(markdown(agg, result["timing"], result["runs"]))
    return markdown(agg, result["timing"], result["runs"], SHORT)


def main(argv: list[str]) -> dict:
    opts, rest = parse(argv)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="bf16-measure-")  # checkpoints, deleted at the end
    base = (([] if "--preset" in rest else ["--preset", "compare"]) +
            ["--optimizer", opts.optimizer, "--records_dir", str(out / "runs"), "--checkpoint_dir", scratch])
    args = t.parse_args(base + rest)
    steps = sorted({min(int(s), args.num_iterations - 1) for s in opts.steps.split(",")})
    cap = Capture(steps)
    start = t0 = time.perf_counter()
    try:
        record, model = t.train(args)
    finally:
        cap.handle.remove()
    print(f"run: {time.perf_counter() - t0:.0f} s, captured steps {sorted(cap.taken)}", flush=True)
    t0 = time.perf_counter()
    rows = measure_rows(cap, layer_names(model), opts.top)
    print(f"errors: {time.perf_counter() - t0:.0f} s, {len(rows)} rows", flush=True)
    t0 = time.perf_counter()
    timing = time_step(cap, opts.repeats)
    print(f"timing: {time.perf_counter() - t0:.0f} s", flush=True)
    agg = aggregate(rows)
    # fp32 means IEEE fp32 only if these stay off / "highest" (err_fp32 would show TF32's ~1e-3)
    matmul = dict(allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                  float32_matmul_precision=torch.get_float32_matmul_precision())
    result = dict(settings={k: getattr(args, k) for k in ("optimizer", "preset", "gram", "gram_apply",
                                                           "num_iterations")} | matmul,
                  steps=steps, top=opts.top, rows=rows, timing=timing, runs={})
    write(out, result, agg)  # kept if the second run fails
    if opts.time_steps > 0 and record:
        t0 = time.perf_counter()
        at = min(opts.time_steps, args.num_iterations - 1)
        other = "fp32" if args.gram_apply == "bf16" else "bf16"
        result["runs"][args.gram_apply] = record_at(record, at)
        cap.taken.clear()
        second = t.parse_args(base + rest + ["--gram_apply", other, "--stop_at", str(at),
                                             "--final_checkpoint", "0"])
        try:
            result["runs"][other] = record_at(t.train(second)[0], at)
        except Exception as e:  # the errors and the timing above stand
            result["runs_error"] = f"{type(e).__name__}: {e}"
            print(f"second run failed: {result['runs_error']}", flush=True)
        print(f"second run: {time.perf_counter() - t0:.0f} s", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    short = write(out, result, agg)
    print(f"total: {time.perf_counter() - start:.0f} s; fp32 matmuls: {matmul}\n", flush=True)
    print(short)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
