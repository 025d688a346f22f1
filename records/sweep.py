"""Sweep settings of the optimizers: optimizers x a grid of settings x seeds, queued over every local GPU.

    python records/sweep.py --out records/lr-sweep-400 --optimizers muon,adamw \\
        --grid lr=default*2^-2..2 --grid adamw:lr=0.0003*2^-2..2 [--grid warmup_iters=15,50] \\
        [--seeds 0] [--best_seeds 3] [--preset compare] [--parallel 3] [--deadline S] [--expect S] [--dry_run] \\
        [-- train_gpt2.py settings for every run]

--grid [OPTIMIZER:]SETTING=VALUES, repeatable: VALUES is `v1,v2,...` or the log-spaced `BASE*F^K1..K2` (BASE x F^k
for k = K1 .. K2; BASE `default` is the optimizer's default). SETTING `lr` is each optimizer's own learning rate
(LR_SETTING: muon_lr, soap_lr, ...); with OPTIMIZER: the grid is that optimizer's alone and replaces a grid of the
same setting for all. Every run is `train_gpt2.py --preset P [settings after --] --optimizer O --SETTING v ...
--seed s --label <out folder's name> --records_dir OUT`; its output goes to OUT/logs/.

The same command continues a sweep: a run whose complete record is in OUT (same settings, the seed, the shards' file
names; settings the record predates count as their defaults) is not run again, nor one that diverged (a result: its
loss counts as infinite). Once every grid point of an optimizer at --seeds has a record, the best point (lowest mean
final val loss) is reported; when it lies at an edge of a log-spaced grid (its only varying setting), the grid grows
by one factor past that edge (--extend times at most on each side), so the best ends strictly inside; then
--best_seeds N runs the best point until it has N seeds (--seeds' first seed upwards).

Runs go --parallel at a time on each GPU and, on each GPU, only while the GPU memory the running ones need leaves room
(need: the largest peak memory of the optimizer's records in OUT, else MEM_MIB, times 1.1 plus 2 GiB of CUDA
context and allocator slack; an out-of-memory run is started again with fewer at once). --deadline S: no run starts
that would not end within S seconds (by the finished runs of its optimizer, or --expect before one has), and the
ones still running at S are stopped (their records say `stopped:`, and the next call runs them again). One line
per finished run: its final val loss and the ETA of the rest; at the end, compare.py --sweep over OUT.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
import train_gpt2  # noqa: E402
from jobs import Job, local_gpus, run_jobs  # noqa: E402

# each optimizer's learning rate, as its rule declares it: --grid lr=... sweeps this setting
LR_SETTING = {name: train_gpt2.optimizer_class(name).declared()["lr"].name for name in train_gpt2.OPTIMIZERS}
# peak GPU memory (MiB) of a `compare` run of each optimizer on one GPU (records/noise-400, H200): the need of a run
# before the experiment has a record of its optimizer
MEM_MIB = {"muon": 21408, "polargrad": 21408, "soap": 24219, "newton_muon": 24588, "locoprop": 24264,
           "adamw": 21732}
MEM_FACTOR, MEM_SLACK_MIB = 1.1, 2048  # need = peak x MEM_FACTOR + MEM_SLACK_MIB: 3 Muon runs fit an 80 GB H100,
#                                        2 SOAP runs and a third do not (both seen)
# settings that do not change what a run computes or that the sweep sets per run (not compared with a record)
IGNORED = (*compare.CONFIG_EXCLUDE, "input_bin", "input_val_bin", "compile", "compile_mode")

_LOG = re.compile(r"^(?P<base>[^*]+)\*(?P<factor>[^^]+)\^(?P<k1>-?\d+)\.\.(?P<k2>-?\d+)$")


@dataclass(frozen=True)
class Axis:
    """One setting of a grid: its values, and (log-spaced grids) base x factor^k for k in ks."""
    setting: str
    values: tuple
    base: float | None = None
    factor: float | None = None
    ks: tuple[int, ...] = ()

    def extended(self, below: int, above: int) -> Axis:
        """The log-spaced axis with `below` more values under its smallest and `above` more over its largest."""
        ks = tuple(range(self.ks[0] - below, self.ks[-1] + above + 1))
        return dataclasses.replace(self, ks=ks, values=tuple(log_value(self.base, self.factor, k) for k in ks))


def log_value(base: float, factor: float, k: int) -> float:
    """base x factor^k, rounded to 6 significant digits (so 0.018 x 2^1 reads 0.036 in commands and records)."""
    return float(f"{base * factor ** k:.6g}")


def setting_kind(setting: str):
    kinds = {f.name: f.type for f in dataclasses.fields(train_gpt2.Hyperparameters)}
    if setting not in kinds:
        raise SystemExit(f"--grid {setting}: no such setting of train_gpt2.py")
    return kinds[setting]


def parse_axis(setting: str, text: str, optimizer: str) -> Axis:
    """`v1,v2,...` or `BASE*F^K1..K2` for `setting` (already mapped from lr) of `optimizer`."""
    kind = setting_kind(setting)
    if m := _LOG.match(text.strip()):
        try:
            base = (float(getattr(train_gpt2.Hyperparameters(), setting)) if m["base"].strip() == "default"
                    else float(m["base"]))
            factor, k1, k2 = float(m["factor"]), int(m["k1"]), int(m["k2"])
        except ValueError:
            raise SystemExit(f"--grid {setting}={text}: BASE*F^K1..K2 needs numbers (BASE may be `default`)") from None
        if not (base > 0 and factor > 1 and k1 <= k2):
            raise SystemExit(f"--grid {setting}={text}: needs BASE > 0, F > 1 and K1 <= K2")
        return Axis(setting, tuple(log_value(base, factor, k) for k in range(k1, k2 + 1)), base, factor,
                    tuple(range(k1, k2 + 1)))
    values = tuple(train_gpt2._parse_value(setting, kind, v.strip()) for v in text.split(",") if v.strip())
    if not values or len(set(values)) != len(values):
        raise SystemExit(f"--grid {setting}={text}: give distinct values, `v1,v2,...` or BASE*F^K1..K2")
    return Axis(setting, values)


def parse_grids(specs: list[str], optimizers: list[str]) -> dict[str, list[Axis]]:
    """Per optimizer, its axes: the grids for all, then its own (OPTIMIZER:SETTING=...) replacing one of the same
    setting."""
    general, own = [], {name: [] for name in optimizers}
    for spec in specs:
        head, eq, text = spec.partition("=")
        if not eq or not text:
            raise SystemExit(f"--grid {spec}: write [OPTIMIZER:]SETTING=VALUES")
        name, colon, setting = head.rpartition(":")
        if colon and name not in optimizers:
            raise SystemExit(f"--grid {spec}: {name!r} is not among --optimizers ({', '.join(optimizers)})")
        (own[name] if colon else general).append((setting.strip(), text))
    grids = {}
    for name in optimizers:
        axes: dict[str, Axis] = {}
        for setting, text in general + own[name]:
            setting = LR_SETTING[name] if setting == "lr" else setting
            axes[setting] = parse_axis(setting, text, name)
        grids[name] = list(axes.values())
    return grids


@dataclass(frozen=True)
class Point:
    """One run of the sweep: optimizer, its grid settings (setting, value) in axis order, seed."""
    optimizer: str
    settings: tuple
    seed: int

    def argv(self) -> list[str]:
        out = ["--optimizer", self.optimizer]
        for setting, value in self.settings:
            out += [f"--{setting}", ",".join(map(repr, value)) if isinstance(value, tuple) else
                    str(int(value)) if isinstance(value, bool) else repr(value) if isinstance(value, float)
                    else str(value)]
        return out + ["--seed", str(self.seed)]

    def name(self) -> str:
        """A file name for its output: optimizer, settings and seed."""
        parts = [self.optimizer] + [f"{s}={v}" for s, v in self.settings] + [f"seed{self.seed}"]
        return re.sub(r"[^\w.=+-]", "_", "-".join(parts))

    def text(self) -> str:
        return " ".join([self.optimizer] + [f"{s}={v}" for s, v in self.settings] + [f"seed {self.seed}"])


class Sweep:
    """The sweep's plan from its settings and the records already in its folder."""

    def __init__(self, ns: argparse.Namespace):
        self.ns, self.out = ns, Path(ns.out)
        self.grids = parse_grids(ns.grid, ns.optimizers)
        self.extra = list(ns.train)
        self.seeds = list(range(ns.first_seed, ns.first_seed + ns.seeds))
        self.all_seeds = list(range(ns.first_seed, ns.first_seed + max(ns.seeds, ns.best_seeds)))
        for name, axes in self.grids.items():  # every run's settings must be accepted before anything starts
            for point in self.points(name, axes, self.seeds):
                self.settings(point)

    @staticmethod
    def points(name: str, axes: list[Axis], seeds: list[int]) -> list[Point]:
        combos = itertools.product(*[[(a.setting, v) for v in a.values] for a in axes])
        return [Point(name, combo, s) for combo in combos for s in seeds]

    def settings(self, point: Point) -> train_gpt2.Hyperparameters:
        """The run's settings; refuses (SystemExit naming the run) what train_gpt2.py would refuse."""
        argv = ["--preset", self.ns.preset, *self.extra, *point.argv()]
        try:
            args = train_gpt2.parse_args(argv)
            train_gpt2.check_optimizer_args(args)
        except SystemExit as e:
            raise SystemExit(f"{point.text()}: {e.code}") from None
        return args

    def axes(self, name: str, below: int = 0, above: int = 0) -> list[Axis]:
        """The optimizer's axes, a one-setting log-spaced grid grown by `below` and `above` values."""
        axes = self.grids[name]
        return [axes[0].extended(below, above)] if below or above else list(axes)

    def growable(self, name: str) -> bool:
        axes = self.grids[name]
        return len(axes) == 1 and axes[0].base is not None and len(axes[0].values) >= 2

    def results(self) -> dict[Point, list[float]]:
        """Per point (every grid, grown up to --extend, at every seed the sweep may run), the final val loss of each
        of its records in OUT that ended (complete: its loss; diverged: inf); see matches."""
        runs = [r for r in map(compare.parse_record, compare.find_files([str(self.out)])[0])
                if r is not None and r.format == "ours" and (r.complete or r.diverged_at is not None)]
        found: dict[Point, list[float]] = {}
        for name in self.grids:
            grow = range(self.ns.extend + 1) if self.growable(name) else range(1)
            points = {p for below in grow for above in grow
                      for p in self.points(name, self.axes(name, below, above), self.all_seeds)}
            for point in points:
                want = dataclasses.asdict(self.settings(point))
                for run in runs:
                    if matches(run.hyperparameters, want):
                        found.setdefault(point, []).append(math.inf if run.diverged_at is not None
                                                           else run.final_val_loss)
        return found

    def plan(self) -> tuple[list[Point], list[str]]:
        """The runs still to do, in order, and what the records say so far (one line per optimizer)."""
        results = self.results()
        todo, notes = [], []
        for name in self.grids:
            below = above = 0
            while True:
                axes = self.axes(name, below, above)
                grid = self.points(name, axes, self.seeds)
                missing = [p for p in grid if p not in results]
                if missing:
                    todo += missing
                    notes.append(f"{name}: {len(grid) - len(missing)} of {len(grid)} grid runs have records")
                    break
                best, line = self.best(name, axes, results)
                value = dict(best.settings).get(axes[0].setting)
                low = self.growable(name) and value == axes[0].values[0]
                high = self.growable(name) and value == axes[0].values[-1]
                if not (low or high):
                    notes.append(line)
                    todo += [p for s in self.all_seeds[:max(self.ns.best_seeds, 1)]
                             if (p := dataclasses.replace(best, seed=s)) not in results]
                    break
                if (below if low else above) >= self.ns.extend:
                    notes.append(f"{line}; at the grid's edge after --extend {self.ns.extend}: widen the grid")
                    break
                below, above = below + low, above + high
                grown = self.axes(name, below, above)[0]
                notes.append(f"{line}; at the grid's edge: adding {grown.setting}="
                             f"{grown.values[0] if low else grown.values[-1]}")
        return todo, notes

    def best(self, name: str, axes: list[Axis], results: dict[Point, list[float]]) -> tuple[Point, str]:
        """The grid point (at the first seed) with the lowest mean final val loss over all its seeds, and a line
        `name: best SETTINGS (value: mean, ...)`."""
        means = {}
        for point in self.points(name, axes, self.seeds[:1]):
            losses = [x for s in self.all_seeds for x in results.get(dataclasses.replace(point, seed=s), [])]
            means[point] = sum(losses) / len(losses)
        best = min(means, key=means.get)
        shown = ", ".join(
            " ".join(f"{v}" for _, v in p.settings) + ": " + ("diverged" if math.isinf(m) else f"{m:.4f}")
            for p, m in means.items())
        return best, f"{name}: best " + " ".join(f"{s}={v}" for s, v in best.settings) + f" ({shown})"

    def job(self, point: Point) -> Job:
        ns = self.ns
        cmd = [sys.executable, str(REPO / "train_gpt2.py"), "--preset", ns.preset, *self.extra, *point.argv(),
               "--label", self.out.name, "--records_dir", str(self.out.resolve()),
               "--checkpoint_dir", str(Path(ns.work).resolve() / "checkpoints")]
        stdout = self.out / "logs" / f"{point.name()}.log"
        return Job(point.text(), cmd, REPO, stdout, after=final_line, kind=point.optimizer,
                   mem_mib=self.mem_mib(point.optimizer), expected_s=ns.expect)

    def mem_mib(self, optimizer: str) -> float:
        """GPU memory a run of this optimizer needs: the largest peak of its records here (else MEM_MIB) x MEM_FACTOR
        + MEM_SLACK_MIB."""
        peaks = [r.peak_mib for r in map(compare.parse_record, compare.find_files([str(self.out)])[0])
                 if r is not None and r.peak_mib and r.hyperparameters.get("optimizer") == optimizer]
        return max(peaks, default=MEM_MIB.get(optimizer, 0)) * MEM_FACTOR + MEM_SLACK_MIB


def matches(have: dict, want: dict) -> bool:
    """Whether a record's settings `have` are the planned `want`: equal on every setting but IGNORED, the shards
    compared by file name; a setting the record lacks (written before it existed) must be at its default."""
    defaults = dataclasses.asdict(train_gpt2.Hyperparameters())
    for name in ("input_bin", "input_val_bin"):
        if os.path.basename(str(have.get(name))) != os.path.basename(str(want.get(name))):
            return False
    for name, value in want.items():
        if name in IGNORED:
            continue
        if name not in have:
            if name in defaults and _norm(value) == _norm(defaults[name]):
                continue
            return False
        if _norm(have[name]) != _norm(value):
            return False
    return int(have.get("seed", 0)) == int(want["seed"])


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def final_line(job: Job) -> str:
    """What the run's record says at its end: `val X at step N` (or why it has none), for the progress line."""
    text = job.stdout.read_text(errors="replace") if job.stdout.exists() else ""
    paths = re.findall(r"^record: (\S+)$", text, re.M)
    run = compare.parse_record(paths[-1]) if paths else None
    if run is None:
        return "no record"
    if run.diverged_at is not None:
        return f"diverged at step {run.diverged_at}"
    if not run.complete:
        return f"incomplete at step {run.last_step}"
    return f"val {run.final_val_loss:.4f} at step {run.end_step}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --out DIR --optimizers A,B --grid SPEC [options] "
                                           "[-- train_gpt2.py settings]", epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--out", required=True, help="the experiment's folder: its records and logs/")
    parser.add_argument("--optimizers", required=True, help="comma-separated: " + ", ".join(LR_SETTING))
    parser.add_argument("--grid", action="append", default=[], help="[OPTIMIZER:]SETTING=VALUES (repeatable)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of each grid point: K .. K+n-1 (default 1)")
    parser.add_argument("--first_seed", type=int, default=0, help="K, the first seed (default 0)")
    parser.add_argument("--best_seeds", type=int, default=0, help="seeds at each optimizer's best point once its grid "
                                                                  "is done (default 0: none beyond --seeds)")
    parser.add_argument("--extend", type=int, default=2, help="grow a log-spaced grid whose best lies at its edge by "
                                                              "this many values at most on each side (default 2)")
    parser.add_argument("--preset", default="compare", help="train_gpt2.py --preset of every run (default compare)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once on each GPU, as memory allows "
                                                                "(default 1)")
    parser.add_argument("--deadline", type=float, default=0, help="seconds: start no run that would not end by then, "
                                                                   "stop those still running then (default 0: none)")
    parser.add_argument("--expect", type=float, default=0, help="seconds a run takes before one of its optimizer has "
                                                                "finished (for --deadline; default 0)")
    parser.add_argument("--work", help="the runs' checkpoints (default: <tmp>/sweep-<out folder's name>)")
    parser.add_argument("--dry_run", action="store_true", help="print the plan and the commands, run nothing")
    ns = parser.parse_args(argv)
    ns.train = train
    ns.optimizers = [o.strip() for o in ns.optimizers.split(",") if o.strip()]
    bad = [o for o in ns.optimizers if o not in LR_SETTING]
    if bad or not ns.optimizers:
        parser.error(f"--optimizers: {', '.join(bad) or 'none given'}; choose from {', '.join(LR_SETTING)}")
    if ns.seeds < 1 or ns.first_seed < 0:
        parser.error("--seeds must be >= 1 and --first_seed >= 0")
    for name in ("best_seeds", "extend", "deadline", "expect"):
        if getattr(ns, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if ns.parallel < 1:
        parser.error("--parallel must be >= 1")
    ns.work = ns.work or os.path.join(tempfile.gettempdir(), f"sweep-{Path(ns.out).resolve().name}")
    try:
        sweep = Sweep(ns)
        todo, notes = sweep.plan()
    except SystemExit as e:
        print(f"error: {e.code}", file=sys.stderr)
        return 2
    for line in notes:
        print(line)
    print(f"{len(todo)} run(s) to do" + (": " + "; ".join(p.text() for p in todo) if todo else ""), flush=True)
    if ns.dry_run:
        for point in todo:
            print(shlex.join(sweep.job(point).cmd))
        return 0
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    queued, said = set(todo), set(notes)

    def more() -> list[Job]:
        """After each run: what the records now ask for that was not queued (grid growth, seeds at the best)."""
        new, lines = sweep.plan()
        added = [p for p in new if p not in queued]
        queued.update(added)
        for line in lines:
            if line not in said and not line.endswith("grid runs have records"):
                print(line, flush=True)
                said.add(line)
        return [sweep.job(p) for p in added]

    codes = run_jobs([sweep.job(p) for p in todo], ns.parallel, ns.deadline, gpus=local_gpus() or None, more=more)
    print()
    left, lines = sweep.plan()
    for line in lines:
        print(line)
    print()
    for setting in dict.fromkeys("lr" if a.setting == LR_SETTING[name] else a.setting
                                 for name, axes in sweep.grids.items() for a in axes):
        try:
            compare.main([str(ns.out), "--sweep", setting])
        except SystemExit as e:  # compare.py refused (its message is printed)
            print(f"compare.py --sweep {setting}: exit {e.code}")
    failed = sum(c not in (0, None) for c in codes)
    print(f"\n{len(left)} run(s) still to do" + (f" (run the same command again); {failed} failed or stopped"
                                                 if left else ""))
    return 0 if not left and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
