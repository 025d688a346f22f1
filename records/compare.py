"""Compare training runs: this project's records and upstream modded-nanogpt logs, grouped, with tests of the means.

    python records/compare.py                                   # *.txt under runs/, recursively
    python records/compare.py runs/ upstream/**/*.txt --by label --plot cmp.png --since 2025-01-01
    python records/compare.py modded-nanogpt/records/           # upstream's logs, grouped by the optimizer they build

Reads three formats (see `parse_record`):
  ours          this project's records (train_gpt2.Record): RECORD_MARK, the source, RECORD_MARK,
                `hyperparameters: {json}`, versions, devices, `world_size ..., N tokens/step`, then
                `step:s/N val_loss:... train_time:...ms step_avg:...ms` lines, `step:s/N train_loss:...
                train_time:...ms step_avg:...ms [opt_ms:...]` lines and `peak memory consumption: M MiB`; a resumed
                run continues its record after `resumed: step:s/N ...` (the lines of steps after s before it were
                redone and are dropped), a diverged one ends with `diverged: step:s/N last_good_step:g ...`.
  upstream      modded-nanogpt logs since Oct 2024: any header (source, `====`, nvidia-smi), then the same `step:` lines
                (train lines usually without train_loss; extra words such as `final_eval` are ignored) and maybe
                `peak memory consumption: M MiB` or `peak memory allocated: M MiB reserved: R MiB`.
  upstream_old  llm.c-style logs: `s:<step> tel:<val loss>` and `s:<step> trl:<train loss> [lr:... norm:...]`
                (also read as *.log under the folders given, where other *.log files are skipped).

An upstream run's optimizer is the one its code (the header before the first `====`) builds: upstream-muon (Muon,
or OrthogonalNesterov as at b9979e6), upstream-soap (the SOAP fork's SOAP), upstream-adamw (AdamW/Adam only); a log
without such code (upstream_old, or none found) is a group of its own, `? <folder>/<file>`.
Groups complete runs by optimizer, label or config (a hash of the hyperparameters without CONFIG_EXCLUDE and of the
code: ours between the record marks, upstream's before its first `====` with the optimizer it builds) and
prints one table (n runs, mean ± std of the final val loss) with a one-sided t-test of "mean final val loss <
target" per group, then Welch's t-test with a 95% interval for the difference of the means, whether it leaves out
0 and how many pairs of runs are ordered against the means: of every pair of groups (up to MAX_ALL_PAIRS), or of
each group against --baseline. Runs that crashed, diverged or
are still going (ours: no peak-memory line, a `diverged:` line or last step < N, where a run that `--stop_at K` ended
counts as complete at K but is listed apart from the means; upstream: no val loss at step N) are listed
under the table with the last step reached (diverged: the step and the last good step); files that are not records
are named and skipped, and the other files under the folders counted by kind.
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import hashlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import stats

RECORD_MARK = "=" * 40 + " train_gpt2.py record " + "=" * 40  # train_gpt2.RECORD_MARK; the tests check they agree
# settings that do not make a different configuration
CONFIG_EXCLUDE = ("seed", "label", "records_dir", "save_every", "keep_checkpoints", "checkpoint_dir", "resume",
                  "matmul_check", "final_checkpoint")
GROUPINGS = ("optimizer", "label", "config")
NO_LABEL = "(no label)"
WARMUP_STEPS = 10  # the trainers do not time the first 10 steps; opt_ms is averaged over the steps after them

_STEP = re.compile(r"^step:(\d+)/(\d+)\s+(.*)$")
_FIELD = re.compile(r"(\w+):(\S+)")
_OLD = re.compile(r"^s:(\d+)\s+(tel|trl):(\S+)")
_PEAK = re.compile(r"^peak memory (?:consumption|allocated):\s*(\d+)\s*MiB")
_TOKENS = re.compile(r"^world_size \d+, device_batch \d+ x \d+, accumulation \d+, (\d+) tokens/step")
_OUR_NAME = re.compile(r"^(\d{8}-\d{6})-")
_SEPARATOR = re.compile(r"^={20,}\s*$")
_RESUMED = re.compile(r"^resumed: step:(\d+)/(\d+)")
_DIVERGED = re.compile(r"^diverged: step:(\d+)/(\d+) last_good_step:(\d+)")
_STOP_AT = re.compile(r"^stopped: step:(\d+)/(\d+) by --stop_at")
_MATMUL = re.compile(r"^matmul: .* ([\d.]+) TFLOP/s per device, mfu: ([\d.]+)%")


@dataclass
class Run:
    """One training run. val: (step, loss, train_time_ms or None); train: (step, loss or None, train_time_ms or None,
    opt_ms or None). num_iterations: N of `step:s/N` (upstream_old: the last val step). stopped_at: K of a run that
    `--stop_at K` ended (the first K steps of the N-step schedule, complete at K), else None. final_val_loss: the val
    loss at the run's end (K, else N) for a complete run, the last one seen for an incomplete run."""
    path: str
    format: str  # 'ours' | 'upstream' | 'upstream_old'
    optimizer: str
    label: str
    config: str
    hyperparameters: dict
    val: list[tuple[int, float, float | None]]
    train: list[tuple[int, float | None, float | None, float | None]]
    num_iterations: int | None
    final_val_loss: float | None
    step_avg: float | None
    peak_mib: int | None
    complete: bool
    timestamp: dt.datetime | None = None  # ours: from the file name; upstream: from the folder name; else mtime
    meta: dict = field(default_factory=dict)  # ours: torch, devices, world_size, tokens_per_step when written
    resumed_at: list[int] = field(default_factory=list)  # ours: the step of each resume, in order
    diverged_at: int | None = None  # ours: the step whose loss or update was not finite (the run ended there)
    last_good_step: int | None = None  # ours, diverged: the last step with a finite loss and parameters
    stopped_at: int | None = None  # ours: K when `--stop_at K` ended the run there
    mfu: float | None = None  # ours: model FLOPs utilization (%) against the matmul rate the trainer timed
    blocks: dict[int, float] = field(default_factory=dict)  # ours: step -> blocks_ms (the block matrices' optimizer)
    code: str = ""  # code_hash of the trainer's source (ours: between the RECORD_MARKs; upstream: before `====`)

    @property
    def end_step(self) -> int | None:
        """The step the run was meant to end at: stopped_at, else num_iterations."""
        return self.stopped_at or self.num_iterations

    @property
    def last_step(self) -> int:
        steps = [v[0] for v in self.val] + [t[0] for t in self.train]
        return max(steps, default=0)

    @property
    def train_time_ms(self) -> float | None:
        """Training time at the last logged step (for a complete run: at the final validation)."""
        timed = [(s, t) for s, _, t in self.val if t is not None]
        timed += [(s, t) for s, _, t, _ in self.train if t is not None]
        return max(timed)[1] if timed else None

    def ms_per_step(self, a: int, b: int) -> float | None:
        """(train_time at logged step b - at step a) / (b - a): the steady step time between two steps past the
        compile warm-up, from any line that logs both the step and train_time (the track's per-step console lines
        included); None unless both steps have a time."""
        times = {s: t for s, _, t in self.val if t is not None}
        times.update({s: t for s, _, t, _ in self.train if t is not None})
        if a not in times or b not in times or b <= a:
            return None
        return (times[b] - times[a]) / (b - a)

    @property
    def tokens(self) -> int | None:
        """end_step * batch_size * sequence_length when the record says them (ours), else None."""
        hp = self.hyperparameters
        if self.end_step is None:
            return None
        if "batch_size" in hp and "sequence_length" in hp:
            return self.end_step * int(hp["batch_size"]) * int(hp["sequence_length"])
        if "tokens_per_step" in self.meta:
            return self.end_step * int(self.meta["tokens_per_step"])
        return None

    @property
    def opt_ms(self) -> float | None:
        """Mean optimizer milliseconds per step over the timed steps (_late_steps; all, if none is timed)."""
        late = [o for _, o in self._late_steps().values()] or [o for *_, o in self.train if o is not None]
        return float(np.mean(late)) if late else None

    @property
    def blocks_ms(self) -> float | None:
        """Mean ms per step of the block matrices' optimizer alone (opt_ms less the embedding/head's AdamW), over the
        same steps as opt_ms; None for records without `blocks_ms:`."""
        late = self._late_steps()
        ms = [v for s, v in self.blocks.items() if s in late] or list(self.blocks.values())
        return float(np.mean(ms)) if ms else None

    @property
    def refresh_period(self) -> int | None:
        """Steps between the optimizer's refreshes (ours): SOAP's soap_precondition_frequency (its eigenbases), the
        feature-gram optimizers' gram_every (C and its factor); None for the others. Step s, logged as s + 1,
        refreshes when s % period == 0."""
        hp = self.hyperparameters
        name = {"soap": "soap_precondition_frequency", "newton_muon": "gram_every", "locoprop": "gram_every"}.get(
            hp.get("optimizer"))
        return int(hp[name]) if name and hp.get(name) else None

    def refreshes(self, s: int) -> bool:
        """Whether logged step s (step s - 1) refreshed: (s - 1 + gram_phase) % refresh_period == 0 (gram_phase of the
        feature-gram runs; 0 when the record has none)."""
        phase = int(self.hyperparameters.get("gram_phase", 0) or 0) if self.refresh_period and \
            self.hyperparameters.get("optimizer") in ("newton_muon", "locoprop") else 0
        return (s - 1 + phase) % self.refresh_period == 0

    def _late_steps(self) -> dict[int, tuple[float | None, float]]:
        """Logged step -> (train_time_ms, opt_ms) for the steps that logged opt_ms, less the first WARMUP_STEPS of
        the run and of each resume (compile warm-up: the trainer leaves them out of train_time too)."""
        warm = lambda s: any(r < s <= r + WARMUP_STEPS for r in [0, *self.resumed_at])
        return {s: (t, o) for s, _, t, o in self.train if o is not None and not warm(s)}

    @property
    def opt_ms_split(self) -> tuple[float, float] | None:
        """(plain steps, refresh steps) mean optimizer ms after the first WARMUP_STEPS, for runs with a
        refresh_period and both kinds of step; else None. opt_ms is their mix over the run."""
        every = self.refresh_period
        if not every:
            return None
        kind: dict[bool, list[float]] = {True: [], False: []}
        for s, (_, o) in self._late_steps().items():
            kind[self.refreshes(s)].append(o)
        return (float(np.mean(kind[False])), float(np.mean(kind[True]))) if kind[True] and kind[False] else None

    @property
    def collect_ms(self) -> float | None:
        """Feature-gram runs (ours, with `gram_every` E): the cost of collecting C and of the refresh (all-reduce and
        factors, which the trainer queues before the refresh step's last backward, on CUDA on a side stream: what of it
        the backward does not hide), per step averaged over a refresh period, from the training time the optimizer
        timer leaves out: (mean of dt - opt_ms over refresh steps - the
        same over plain steps) / E, dt the train_time difference of consecutive timed steps (_late_steps; the trainer
        stops its clock for validation and checkpoints; step s, logged as s + 1, refreshes when (s + gram_phase) % E
        == 0). None for other runs or without both kinds of step."""
        every = self.refresh_period
        if self.hyperparameters.get("optimizer") not in ("newton_muon", "locoprop") or not every:
            return None
        timed = {s: (t, o) for s, (t, o) in self._late_steps().items() if t is not None}
        cost: dict[bool, list[float]] = {True: [], False: []}
        for s, (t, o) in timed.items():
            if s - 1 in timed:
                cost[self.refreshes(s)].append(t - timed[s - 1][0] - o)
        if not cost[True] or not cost[False]:
            return None
        return (float(np.mean(cost[True])) - float(np.mean(cost[False]))) / every

    def key(self, by: str) -> str:
        if by not in GROUPINGS:
            raise ValueError(f"by must be one of {GROUPINGS}, not {by!r}")
        return {"optimizer": self.optimizer, "label": self.label or NO_LABEL, "config": self.config}[by]


# ----------------------------------------------------------------------------- parsing


def code_hash(source: str) -> str:
    """12 hex digits of sha256 of a trainer's source: runs of other code are other configurations."""
    return hashlib.sha256(source.encode()).hexdigest()[:12] if source.strip() else ""


def config_hash(hyperparameters: dict, code: str = "") -> str:
    """8 hex digits of sha256 over the sorted JSON of the hyperparameters without CONFIG_EXCLUDE, and the code's
    code_hash when known."""
    kept = {k: v for k, v in hyperparameters.items() if k not in CONFIG_EXCLUDE} | ({"code": code} if code else {})
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def _number(text: str) -> float | None:
    """A logged number; `12.5ms` is 12.5, `21.243s` (the optimization track's train_time) is 21243.0 (ms)."""
    scale = 1.0
    if text.endswith("ms"):
        text = text[:-2]
    elif text.endswith("s"):
        text, scale = text[:-1], 1000.0
    try:
        return float(text) * scale
    except ValueError:
        return None


def _step_lines(lines: list[str]):
    """(step, N, fields) for every `step:s/N key:value ...` line."""
    for line in lines:
        m = _STEP.match(line)
        if m:
            yield int(m[1]), int(m[2]), dict(_FIELD.findall(m[3]))


def _timestamp(path: Path, fmt: str) -> dt.datetime:
    m = _OUR_NAME.match(path.name)
    if m:
        return dt.datetime.strptime(m[1], "%Y%m%d-%H%M%S")
    if fmt != "ours":  # upstream folders: records/2024-10-13_llmc/, records/011625_Sub3Min/ (MMDDYY)
        folder = path.parent.name
        for pattern, form in ((r"^(\d{4}-\d{2}-\d{2})(?:_|$)", "%Y-%m-%d"), (r"^(\d{6})(?:_|$)", "%m%d%y")):
            m = re.match(pattern, folder)
            if m:
                try:
                    return dt.datetime.strptime(m[1], form)
                except ValueError:
                    pass
    return dt.datetime.fromtimestamp(path.stat().st_mtime)


# an optimizer the trainer's code builds: a call, not its `class X(...)` line (comments are dropped before the search)
_BUILT = re.compile(r"(?<!class )\b(?:torch\.optim\.)?(SOAP|Muon|OrthogonalNesterov|AdamW|Adam)\(")
UPSTREAM_OPTIMIZERS = {"SOAP": "soap", "Muon": "muon", "OrthogonalNesterov": "muon"}  # the block matrices' optimizer


def upstream_optimizer(code: str) -> str | None:
    """The optimizer an upstream trainer's code builds, as 'upstream-<name>': soap (SOAP(...), the SOAP fork), muon
    (Muon(...), or OrthogonalNesterov(...) as at modded-nanogpt b9979e6), both joined by '+'; adamw where it builds
    only AdamW/Adam; None where it builds none of these (or carries no code). Commented-out lines do not count."""
    code = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    built = {m[1] for m in _BUILT.finditer(code)}
    names = sorted({UPSTREAM_OPTIMIZERS[b] for b in built if b in UPSTREAM_OPTIMIZERS})
    if not names and built:
        names = ["adamw"]
    return "upstream-" + "+".join(names) if names else None


def unknown_optimizer(path: Path) -> str:
    """The group of an upstream run whose optimizer is not known: its own, named by its folder and file."""
    return f"? {path.parent.name}/{path.name}"


def parse_record(path: str | os.PathLike) -> Run | None:
    """Read one file; a Run for a record in one of the three formats, None for anything else."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except (OSError, UnicodeError):
        return None
    lines = text.splitlines()
    if lines and lines[0].rstrip() == RECORD_MARK:
        return _parse_ours(path, lines)
    if any(_STEP.match(line) for line in lines):
        return _parse_upstream(path, lines)
    if any(_OLD.match(line) for line in lines):
        return _parse_upstream_old(path, lines)
    return None


def _parse_steps(lines: list[str], opt_ms: bool):
    """val, train, the N of the last step line, the step_avg of the last line that has a number there."""
    val, train, n_seen, step_avg = [], [], None, None
    for step, n, f in _step_lines(lines):
        n_seen = n
        avg = _number(f["step_avg"]) if "step_avg" in f else None
        if avg is not None and not math.isnan(avg):  # the first steps are untimed: step_avg:nanms
            step_avg = avg
        time_ms = _number(f["train_time"]) if "train_time" in f else None
        if "val_loss" in f:
            loss = _number(f["val_loss"])
            if loss is not None:
                val.append((step, loss, time_ms))
        elif "train_time" in f or "train_loss" in f:
            loss = _number(f["train_loss"]) if "train_loss" in f else None
            o = _number(f["opt_ms"]) if opt_ms and "opt_ms" in f else None
            train.append((step, loss, time_ms, o))
    return val, train, n_seen, step_avg


def _peak(lines: list[str]) -> int | None:
    for line in reversed(lines):
        m = _PEAK.match(line)
        if m:
            return int(m[1])
    return None


def _final(val, n) -> tuple[float | None, bool]:
    """(final val loss, whether there is a val loss at step n)."""
    at_n = [loss for s, loss, _ in val if n is not None and s == n]
    if at_n:
        return at_n[-1], True
    return (val[-1][1] if val else None), False


def _after_resumes(body: list[str]) -> tuple[list[str], list[int]]:
    """The lines that stand once each `resumed: step:s/N` has superseded what the abandoned branch logged before it
    (val lines of steps >= s, train lines of steps > s, stop/diverged/peak lines), and the resume steps."""
    kept, resumed = [], []
    for line in body:
        m = _RESUMED.match(line)
        if m:
            s = int(m[1])
            resumed.append(s)
            keep = []
            for old in kept:
                st = _STEP.match(old)
                if st:
                    if int(st[1]) < s or (int(st[1]) == s and "val_loss:" not in st[3]):
                        keep.append(old)
                elif not (_DIVERGED.match(old) or _PEAK.match(old) or old.startswith("stopped: ")):
                    keep.append(old)
            kept = keep
        kept.append(line)
    return kept, resumed


def _parse_ours(path: Path, lines: list[str]) -> Run:
    marks = [i for i, line in enumerate(lines) if line.rstrip() == RECORD_MARK]
    body = lines[marks[-1] + 1:] if len(marks) > 1 else []  # one mark only: cut off while the source was written
    body, resumed = _after_resumes(body)
    diverged = next((m for m in map(_DIVERGED.match, body) if m), None)
    hp, meta, mfu = {}, {}, None
    for line in body:
        if line.startswith("hyperparameters: ") and not hp:
            try:
                hp = json.loads(line[len("hyperparameters: "):])
            except json.JSONDecodeError:
                hp = {}
        elif line.startswith("torch: "):
            meta["versions"] = line
        elif line.startswith("devices: "):
            try:
                meta["devices"] = json.loads(line[len("devices: "):])
            except json.JSONDecodeError:
                pass
        elif line.startswith("world_size: "):
            meta["world_size"] = int(line.split()[1])
        elif m := _TOKENS.match(line):
            meta["tokens_per_step"] = int(m[1])
        elif m := _MATMUL.match(line):
            meta["matmul_tflops"], mfu = float(m[1]), float(m[2])
    val, train, n_seen, step_avg = _parse_steps(body, opt_ms=True)
    n = int(hp["num_iterations"]) if "num_iterations" in hp else n_seen
    peak = _peak(body)
    stop = next((int(m[1]) for m in map(_STOP_AT.match, body) if m), None)  # resumed past it: dropped with its branch
    final, at_n = _final(val, stop or n)
    # the config of what ran: stop_at as the run ended (a stopped-then-resumed run is the uninterrupted run's config)
    code = code_hash("\n".join(lines[marks[0] + 1:marks[1]])) if len(marks) > 1 else ""
    config = config_hash(dict(hp, stop_at=stop or 0) if "stop_at" in hp else hp, code) if hp else "unknown"
    return Run(path=str(path), format="ours", optimizer=str(hp.get("optimizer", "unknown")),
               label=str(hp.get("label", "")), config=config, hyperparameters=hp,
               val=val, train=train, num_iterations=n, final_val_loss=final, step_avg=step_avg, peak_mib=peak,
               complete=peak is not None and at_n and diverged is None, timestamp=_timestamp(path, "ours"), meta=meta,
               resumed_at=resumed, diverged_at=int(diverged[1]) if diverged else None,
               last_good_step=int(diverged[3]) if diverged else None, stopped_at=stop, mfu=mfu,
               blocks={step: v for step, _, f in _step_lines(body) if "blocks_ms" in f
                       and (v := _number(f["blocks_ms"])) is not None}, code=code)


def _parse_upstream(path: Path, lines: list[str]) -> Run:
    first = next(i for i, line in enumerate(lines) if _STEP.match(line))
    seps = [i for i in range(first) if _SEPARATOR.match(lines[i])]
    header = "\n".join(lines[:seps[0]]) if seps else ""  # the source printed before the first `====` line
    val, train, n, step_avg = _parse_steps(lines, opt_ms=False)
    final, at_n = _final(val, n)
    optimizer = upstream_optimizer(header) or unknown_optimizer(path)
    # its code and the optimizer it builds are its config: a header that builds no known optimizer (no code printed,
    # or only versions) is a config of its own, as its optimizer group is
    config = "upstream-" + code_hash(header + "\n" + optimizer)[:8]
    return Run(path=str(path), format="upstream", optimizer=optimizer, label=path.parent.name,
               config=config, hyperparameters={}, val=val, train=train, num_iterations=n, final_val_loss=final,
               step_avg=step_avg, peak_mib=_peak(lines), complete=at_n, timestamp=_timestamp(path, "upstream"),
               code=code_hash(header))


def _parse_upstream_old(path: Path, lines: list[str]) -> Run:
    val, train = [], []
    for line in lines:
        m = _OLD.match(line)
        if m and (x := _number(m[3])) is not None:
            if m[2] == "tel":
                val.append((int(m[1]), x, None))
            else:
                train.append((int(m[1]), x, None, None))
    n = val[-1][0] if val else None  # these logs never say N: the last validation is taken as the end
    return Run(path=str(path), format="upstream_old", optimizer=unknown_optimizer(path), label=path.parent.name,
               config="upstream_old", hyperparameters={}, val=val, train=train, num_iterations=n,
               final_val_loss=val[-1][1] if val else None, step_avg=None, peak_mib=None, complete=bool(val),
               timestamp=_timestamp(path, "upstream_old"))


# ----------------------------------------------------------------------------- grouping and statistics


def at_step(run: Run, step: int) -> Run:
    """The run as if it had ended at `step` (--at): its lines up to `step`; complete iff it logged a val loss there
    (a run stopped or cut later counts), final_val_loss = that loss."""
    val = [v for v in run.val if v[0] <= step]
    final = next((v[1] for v in val if v[0] == step), None)
    diverged = run.diverged_at if run.diverged_at is not None and run.diverged_at <= step else None
    return replace(run, val=val, train=[t for t in run.train if t[0] <= step], stopped_at=step,
                   final_val_loss=final if final is not None else (val[-1][1] if val else None),
                   complete=final is not None and diverged is None, diverged_at=diverged)


def group_runs(runs: list[Run], by: str = "optimizer") -> dict[str, list[Run]]:
    """Runs (complete and not) by their key, keys sorted; each list in the order given."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key(by), []).append(run)
    return dict(sorted(groups.items()))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _mean_pair(pairs) -> tuple[float, float] | None:
    """Elementwise mean of the (a, b) pairs that are not None; None if there are none."""
    kept = [p for p in pairs if p is not None]
    return (float(np.mean([a for a, _ in kept])), float(np.mean([b for _, b in kept]))) if kept else None


def one_sided_p(losses: list[float], target: float) -> float | None:
    """p of scipy's one-sample t-test for "mean < target"; None with fewer than two runs."""
    if len(losses) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical losses: scipy answers nan
        return float(stats.ttest_1samp(losses, target, alternative="less").pvalue)


def summarize(groups: dict[str, list[Run]], target: float = 3.28) -> list[dict]:
    """One row per group over its complete runs: group, runs, incomplete, mean, std (None for one run), min, steps
    (sorted distinct end steps: K of --stop_at K, else N), tokens (mean; None unknown), train_time_ms, step_avg_ms,
    opt_ms (None where no run logged opt_ms), blocks_ms (the block matrices' share of opt_ms; None where not
    logged), opt_split ((plain, refresh) opt ms for optimizers with a refresh period,
    else None), collect_ms (feature-gram runs, else None), mfu (%, runs that timed the matmul), peak_mib (the largest),
    p_value (None for fewer than two runs), losses."""
    rows = []
    for name, runs in groups.items():
        done = [r for r in runs if r.complete and r.final_val_loss is not None]
        losses = [r.final_val_loss for r in done]
        peaks = [r.peak_mib for r in done if r.peak_mib is not None]
        rows.append(dict(
            group=name, runs=len(done), incomplete=len(runs) - len(done), losses=losses,
            mean=float(np.mean(losses)) if losses else None,
            std=float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
            min=float(np.min(losses)) if losses else None,
            steps=sorted({r.end_step for r in done if r.end_step is not None}),
            tokens=_mean(r.tokens for r in done), train_time_ms=_mean(r.train_time_ms for r in done),
            step_avg_ms=_mean(r.step_avg for r in done), opt_ms=_mean(r.opt_ms for r in done),
            blocks_ms=_mean(r.blocks_ms for r in done),
            collect_ms=_mean(r.collect_ms for r in done), opt_split=_mean_pair(r.opt_ms_split for r in done),
            mfu=_mean(r.mfu for r in done),
            peak_mib=max(peaks) if peaks else None, p_value=one_sided_p(losses, target), target=target,
        ))
    return rows


def welch(a: list[float], b: list[float], confidence: float = 0.95) -> dict | None:
    """Welch's t-test of mean(a) != mean(b) (scipy) and the difference mean(a) - mean(b) with its interval on the
    Welch-Satterthwaite degrees of freedom; `flips`: of the len(a) x len(b) pairs of one run of each, how many are
    ordered against the means (one run of the lower group above one of the other); None unless both have two runs
    or more."""
    if len(a) < 2 or len(b) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else float("nan")
    diff = float(np.mean(a) - np.mean(b))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    flips = sum((x - y) * diff < 0 for x in a for y in b)
    return dict(statistic=float(res.statistic), p_value=float(res.pvalue), diff=diff, df=float(df),
                low=diff - half, high=diff + half, confidence=confidence, flips=int(flips), pairs=len(a) * len(b))


MAX_ALL_PAIRS = 6  # up to this many groups, Welch's test of every pair; more: each group against --baseline


def welch_pairs(rows: list[dict], baseline: str | None = None,
                confidence: float = 0.95) -> list[tuple[str, str, dict | None]]:
    """(a, b, welch(a's losses, b's losses) or None) for the pairs to test: each other group against `baseline`
    (as a - baseline); without one, every pair in table order when there are at most MAX_ALL_PAIRS groups, else
    none."""
    losses = {r["group"]: r["losses"] for r in rows}
    if baseline is not None:
        pairs = [(g, baseline) for g in losses if g != baseline]
    elif len(losses) <= MAX_ALL_PAIRS:
        names = list(losses)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    else:
        pairs = []
    return [(a, b, welch(losses[a], losses[b], confidence)) for a, b in pairs]


def verdict(w: dict) -> str:
    """Whether a Welch test's two groups differ at its confidence (p < 1 - confidence: the interval leaves out 0)."""
    return (f"differ at {w['confidence']:.0%}" if w["p_value"] < 1 - w["confidence"]
            else f"not told apart at {w['confidence']:.0%}")


def welch_line(a: str, b: str, w: dict | None) -> str:
    """One line of a Welch test: the difference of the means, its interval, t, df, p, the run pairs ordered against
    the means, and whether the two differ at the interval's confidence (p < 1 - confidence: the interval leaves out
    0)."""
    if w is None:
        return f"{a} - {b}: Welch's t-test needs two complete runs or more in each group"
    return (f"{a} - {b}: {w['diff']:+.4f}, {w['confidence']:.0%} interval [{w['low']:+.4f}, {w['high']:+.4f}] "
            f"(Welch t={w['statistic']:.3f}, df={w['df']:.1f}, p={w['p_value']:.3g}; order flipped in "
            f"{w['flips']} of {w['pairs']} run pairs): {verdict(w)}")


def config_differences(groups: dict[str, list[Run]]) -> dict[str, dict]:
    """For `--by config`: per group, the settings (of its first run with hyperparameters) whose values are not the
    same in every group, and `code` (its code_hash) where the groups' code differs; empty dicts where no group has
    hyperparameters (upstream logs)."""
    first = {name: next((r.hyperparameters for r in runs if r.hyperparameters), {}) for name, runs in groups.items()}
    known = [hp for hp in first.values() if hp]
    keys = sorted({k for hp in known for k in hp} - set(CONFIG_EXCLUDE))
    differ = [k for k in keys if len({json.dumps(hp.get(k), sort_keys=True) for hp in known}) > 1]
    codes = {name: runs[0].code for name, runs in groups.items() if first[name]}
    code = {"code": codes} if len(set(codes.values())) > 1 else {}
    return {name: ({k: hp.get(k) for k in differ} | {k: v[name] for k, v in code.items()}) if hp else {}
            for name, hp in first.items()}


# ----------------------------------------------------------------------------- sweeps, steps to a target, track rules

# each optimizer's learning rate (its block matrices'), as train_gpt2.py declares it (`lr` of the rule's
# settings; tests/test_compare_track.py checks the two agree): `--sweep lr` reads this setting of each run;
# a rule not named here is read as <optimizer>_lr
LR_SETTING = {"muon": "muon_lr", "polargrad": "polargrad_lr", "soap": "soap_lr", "newton_muon": "muon_lr",
              "locoprop": "locoprop_lr", "adamw": "adamw_lr"}


def lr_setting(optimizer: str) -> str:
    return LR_SETTING.get(optimizer, f"{optimizer}_lr")


def sweep_value(run: Run, setting: str):
    """The run's value of `setting` (`lr`: its optimizer's lr_setting); None where the record does not say it."""
    hp = run.hyperparameters
    name = lr_setting(str(hp.get("optimizer"))) if setting == "lr" else setting
    value = hp.get(name) if name else None
    return tuple(value) if isinstance(value, list) else value


def sweep_rows(groups: dict[str, list[Run]], setting: str) -> dict[str, list[dict]]:
    """Per group, one row per value of `setting` (sorted): value, runs, mean, std (None for one run), losses, and
    `diverged` (runs that diverged: their loss counts as infinite, so a value with one has mean inf). The runs of a
    group that differ in other settings than `setting` are split into groups named `group (k=v ...)`."""
    out: dict[str, list[dict]] = {}
    for name, runs in groups.items():
        runs = [r for r in runs if sweep_value(r, setting) is not None and (r.complete or r.diverged_at is not None)]
        rest = {}
        for r in runs:
            hp = {k: v for k, v in r.hyperparameters.items()
                  if k not in (*CONFIG_EXCLUDE, setting, lr_setting(str(r.hyperparameters.get("optimizer"))))}
            rest.setdefault(json.dumps(hp, sort_keys=True), []).append(r)
        differ = config_differences({k: v for k, v in rest.items()}) if len(rest) > 1 else {}
        for key, members in rest.items():
            label = name + ("" if not differ.get(key) else
                            " (" + " ".join(f"{k}={json.dumps(v)}" for k, v in differ[key].items()) + ")")
            by_value: dict = {}
            for r in members:
                by_value.setdefault(sweep_value(r, setting), []).append(r)
            rows = []
            for value in sorted(by_value):
                losses = [math.inf if r.diverged_at is not None else r.final_val_loss for r in by_value[value]]
                finite = [x for x in losses if math.isfinite(x)]
                rows.append(dict(value=value, runs=len(losses), losses=losses,
                                 diverged=len(losses) - len(finite),
                                 mean=float(np.mean(losses)) if finite == losses else math.inf,
                                 std=float(np.std(losses, ddof=1)) if len(finite) > 1 and finite == losses else None))
            out[label] = rows
    return out


def at_best(groups: dict[str, list[Run]], setting: str) -> tuple[dict[str, list[Run]], dict[str, tuple]]:
    """Each group cut to its runs at its best value of `setting` (`lr`: each optimizer's own): the value whose
    complete runs have the lowest mean final val loss (a diverged run counts as infinite, as in sweep_rows); and per
    group (best value, its complete runs). A group with no complete run that says the setting is left out."""
    kept, best = {}, {}
    for name, runs in groups.items():
        by_value: dict = {}
        for r in runs:
            if sweep_value(r, setting) is not None and (r.complete or r.diverged_at is not None):
                loss = math.inf if r.diverged_at is not None else r.final_val_loss
                by_value.setdefault(sweep_value(r, setting), []).append(loss)
        if not by_value:
            continue
        value = min(by_value, key=lambda v: (np.mean(by_value[v]), v))
        kept[name] = [r for r in runs if sweep_value(r, setting) == value]
        best[name] = (value, len(by_value[value]))
    return kept, best


def format_sweep(rows: dict[str, list[dict]], setting: str) -> str:
    """Per group: the val loss at each value (mean ± std (n)), the best value and, where the best lies at the first
    or last value tried, a warning that the optimum may lie outside the grid."""
    lines = []
    for name, values in rows.items():
        if not values:
            continue
        best = min(values, key=lambda r: r["mean"])
        lines.append(f"{name}: {setting}")
        for r in values:
            loss = ("diverged" if math.isinf(r["mean"]) and r["diverged"] == r["runs"] else
                    f"{r['diverged']} of {r['runs']} diverged" if math.isinf(r["mean"]) else
                    f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if r["std"] is not None else ""))
            lines.append(f"  {r['value']!s:>12}  {loss} (n={r['runs']})" + ("  <- best" if r is best else ""))
        edge = len(values) > 1 and best in (values[0], values[-1]) and not math.isinf(best["mean"])
        lines.append(f"  best {setting} = {best['value']}" + (
            f"; WARNING: at the {'low' if best is values[0] else 'high'} edge of the values tried: the best may lie "
            f"outside them, extend the grid" if edge else "" if len(values) > 1 else " (one value tried)"))
    return "\n".join(lines)


def plot_sweep(rows: dict[str, list[dict]], setting: str, path: str | os.PathLike):
    """Val loss against the setting's value (log axis when every value is positive), a line per group with ± std
    bars; diverged values are left out of the line. Saves to path and returns the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    positive = True
    for name, values in rows.items():
        kept = [r for r in values if isinstance(r["value"], (int, float)) and math.isfinite(r["mean"])]
        if not kept:
            continue
        positive &= all(r["value"] > 0 for r in kept)
        ax.errorbar([r["value"] for r in kept], [r["mean"] for r in kept],
                    yerr=[r["std"] or 0.0 for r in kept], marker="o", capsize=3, label=name, gid=name)
    if positive:
        ax.set_xscale("log")
    ax.set_xlabel(setting + (" (each optimizer's own)" if setting == "lr" else ""))
    ax.set_ylabel("final val loss")
    ax.set_title(f"val loss against {setting}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def steps_to(run: Run, target: float) -> tuple[float, float | None] | None:
    """(step, train_time_ms or None) at which the run's val loss first reaches `target`, interpolated linearly
    between the val point before (above the target) and the first at or below it; None if it never does."""
    return _crossing(sorted(run.val), target)


def mean_curve(runs: list[Run]) -> list[tuple[int, float, float | None]]:
    """(step, mean val loss, mean train_time_ms or None) at every val step all `runs` logged."""
    common = set.intersection(*({s for s, _, _ in r.val} for r in runs)) if runs else set()
    at = [{s: (v, ms) for s, v, ms in r.val} for r in runs]
    curve = []
    for step in sorted(common):
        times = [a[step][1] for a in at]
        curve.append((step, float(np.mean([a[step][0] for a in at])),
                      None if None in times else float(np.mean(times))))
    return curve


def _crossing(points: list[tuple[int, float, float | None]], target: float) -> tuple[float, float | None] | None:
    prev = None
    for step, loss, ms in points:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step), ms
            f = (prev[1] - target) / (prev[1] - loss)
            at = prev[0] + f * (step - prev[0])
            time_ms = None if ms is None or prev[2] is None else prev[2] + f * (ms - prev[2])
            return at, time_ms
        prev = (step, loss, ms)
    return None


def steps_rows(groups: dict[str, list[Run]], target: float, baseline: str | None) -> list[dict]:
    """Per group over its complete runs: runs, reached (how many reach the target), steps mean ± std over those,
    tokens (steps x the run's tokens a step, where known), train time (ms); curve: the step at which the group's
    mean curve (mean_curve) reaches the target; speedup = the baseline's curve step / the group's (None without a
    baseline or where either curve never reaches it). The curves, not the runs: with the default target (the
    baseline's own mean final loss) about half the baseline's runs end above it, while its mean curve reaches it
    at its last val step."""
    rows = []
    for name, runs in groups.items():
        done = [r for r in runs if r.complete]
        hit = [(r, x) for r in done if (x := steps_to(r, target)) is not None]
        steps = [x[0] for _, x in hit]
        per_step = [r.tokens / r.end_step for r, _ in hit if r.tokens and r.end_step]
        times = [x[1] for _, x in hit if x[1] is not None]
        rows.append(dict(group=name, runs=len(done), reached=len(hit),
                         mean=float(np.mean(steps)) if steps else None,
                         std=float(np.std(steps, ddof=1)) if len(steps) > 1 else None,
                         tokens=float(np.mean(steps)) * float(np.mean(per_step)) if steps and per_step else None,
                         time_ms=float(np.mean(times)) if times else None,
                         curve=(_crossing(mean_curve(done), target) or (None,))[0]))
    base = next((r for r in rows if r["group"] == baseline), None)
    for r in rows:
        r["speedup"] = base["curve"] / r["curve"] if base and base["curve"] and r["curve"] else None
    return rows


def format_steps(rows: list[dict], target: float, by: str, baseline: str | None) -> str:
    head = [by, "reached", "steps to target", "mean curve", "tokens", "time",
            f"speedup over {baseline}" if baseline else "speedup"]
    body = [[r["group"], f"{r['reached']}/{r['runs']}",
             "-" if r["mean"] is None else f"{r['mean']:.1f}" + ("" if r["std"] is None else f" ± {r['std']:.1f}"),
             "-" if r["curve"] is None else f"{r['curve']:.1f}",
             _count(r["tokens"]), "-" if r["time_ms"] is None else f"{r['time_ms'] / 60000:.2f}m",
             "-" if r["speedup"] is None else f"{r['speedup']:.3f}x"] for r in rows]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in [head] + body]
    out.insert(1, "  ".join("-" * w for w in widths))
    return f"steps to val loss {target:.4f} (interpolated between val points; a run that never reaches it is not " \
           f"counted in the mean; mean curve: where the group's mean val loss reaches it, the speedup's steps):\n" \
           + "\n".join(out)


def format_step_time(groups: dict[str, list[Run]], a: int, b: int, by: str, baseline: str | None) -> str:
    """Per group: ms a step between logged steps a and b (Run.ms_per_step), mean ± std (n runs that logged both),
    and its ratio to --baseline's mean."""
    means = {name: [m for m in (r.ms_per_step(a, b) for r in runs) if m is not None] for name, runs in groups.items()}
    base = np.mean(means[baseline]) if means.get(baseline) else None
    lines = [f"ms a step from step {a} to {b}:", f"| {by} | ms a step | n | over {baseline or '—'} |",
             "|---|---|---|---|"]
    for name, ms in means.items():
        if not ms:
            lines.append(f"| {name} | — (no run logs a train_time at both steps) | 0 | — |")
            continue
        std = f" ± {np.std(ms, ddof=1):.2f}" if len(ms) > 1 else ""
        ratio = f"{np.mean(ms) / base:.4f}" if base else "—"
        lines.append(f"| {name} | {np.mean(ms):.2f}{std} | {len(ms)} | {ratio} |")
    return "\n".join(lines)


def format_runs(groups: dict[str, list[Run]], by: str) -> str:
    """One line per run, by group: final val loss (or how it ended), the step of it, training time, the file."""
    lines = [f"each run ({by}, final val loss, at step, training time, file):"]
    for name, runs in groups.items():
        for r in sorted(runs, key=lambda r: (r.final_val_loss is None, r.final_val_loss or 0.0)):
            loss = "-" if r.final_val_loss is None else f"{r.final_val_loss:.4f}"
            how = "" if r.complete else " (diverged)" if r.diverged_at is not None else " (incomplete)"
            time_ms = r.train_time_ms
            lines.append(f"  {name}  {loss}{how}  step {r.last_step if not r.complete else r.end_step}  "
                         f"{'-' if time_ms is None else f'{time_ms / 60000:.2f}m'}  {r.path}")
    return "\n".join(lines)


# the optimization track's rules (modded-nanogpt records/track_3_optimization/README.md, "Rules"): a margin of
# 3.09 sigma with sigma = 0.0013 (p < .001, one-sided z-test), and 0.0045 val loss per 100 steps (their result #12
# run 200 steps shorter: 3.2790 -> 3.2881)
TRACK_TARGET, TRACK_MARGIN, TRACK_LOSS_PER_100_STEPS = 3.28, 0.004, 0.0045


def track_one_sided(mean: float, n: int, target: float = TRACK_TARGET) -> float:
    """The track's rule 3, left-hand side: (target - mean) * sqrt(n); passes when >= TRACK_MARGIN."""
    return (target - mean) * math.sqrt(n)


def track_pairwise(old_loss: float, old_n: int, old_steps: float, new_loss: float, new_n: int, new_steps: float,
                   per_100_steps: float = TRACK_LOSS_PER_100_STEPS) -> float:
    """The track's pairwise rule, left-hand side: (final_loss_diff + per_100_steps * (old_steps - new_steps) / 100)
    / sqrt(1/n_old + 1/n_new), final_loss_diff = old_loss - new_loss: how far `new` is better than `old`; passes
    when >= TRACK_MARGIN."""
    return ((old_loss - new_loss) + per_100_steps * (old_steps - new_steps) / 100) / math.sqrt(1 / old_n + 1 / new_n)


def track_lines(rows: list[dict], target: float, baseline: str | None, margin: float = TRACK_MARGIN,
                per_100_steps: float = TRACK_LOSS_PER_100_STEPS) -> list[str]:
    """The two rules over summarize's rows: per group, (target - mean) sqrt(n) >= margin; per pair (each group
    against `baseline`, else every pair up to MAX_ALL_PAIRS, the better mean as `new`), the pairwise left-hand side
    with each group's final step count."""
    lines = [f"optimization-track rules (margin {margin:g}; {per_100_steps:g} val loss per 100 steps):"]
    done = [r for r in rows if r["mean"] is not None and r["steps"]]
    for r in done:
        lhs = track_one_sided(r["mean"], r["runs"], target)
        lines.append(f"  {r['group']}: ({target:g} - {r['mean']:.4f}) * sqrt({r['runs']}) = {lhs:.5f}: "
                     + ("passes" if lhs >= margin else "fails") + f" (mean < {target:g})")
    names = {r["group"]: r for r in done}
    if baseline is not None and baseline in names:
        pairs = [(baseline, g) for g in names if g != baseline]
    elif len(names) <= MAX_ALL_PAIRS:
        pairs = [(a, b) for i, a in enumerate(names) for b in list(names)[i + 1:]]
    else:
        pairs = []
    for a, b in pairs:
        old, new = names[a], names[b]
        sa, sb = max(old["steps"]), max(new["steps"])
        lhs = track_pairwise(old["mean"], old["runs"], sa, new["mean"], new["runs"], sb, per_100_steps)
        if lhs < 0:  # the other way round: the better one as `new`
            old, new, sa, sb = new, old, sb, sa
            lhs = -lhs
        lines.append(f"  {new['group']} better than {old['group']}: (({old['mean']:.4f} - {new['mean']:.4f}) + "
                     f"{per_100_steps:g} * {sa - sb:g}/100) / sqrt(1/{old['runs']} + 1/{new['runs']}) = {lhs:.5f}: "
                     + ("told apart" if lhs >= margin else "not told apart"))
    return lines


# ----------------------------------------------------------------------------- printing


def _fmt(x, form: str = "{:.4f}") -> str:
    return "-" if x is None else form.format(x)


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _opt_text(opt_ms: float | None, split: tuple[float, float] | None) -> str:
    """Optimizer ms per step, with its (plain, refresh) split where the optimizer has one."""
    return _fmt(opt_ms, "{:.2f}") + (" ({:.2f}, {:.1f})".format(*split) if split else "")


def optimizer_cost(row: dict) -> float | None:
    """Optimizer + collection ms a step (the feature-gram optimizers' collection of C; 0 for the others)."""
    return None if row.get("opt_ms") is None else row["opt_ms"] + (row.get("collect_ms") or 0.0)


def format_table(rows: list[dict], by: str, target: float, baseline: str | None = None) -> str:
    """The table; baseline: a group whose optimizer (+ collect) ms a step the `over <baseline>` column subtracts."""
    collect = any(r.get("collect_ms") is not None for r in rows)  # a column only where a feature-gram run is
    split = any(r.get("opt_split") is not None for r in rows)  # SOAP / feature-gram: plain and refresh steps apart
    mfu = any(r.get("mfu") is not None for r in rows)  # runs that timed the matmul (CUDA)
    blocks = any(r.get("blocks_ms") is not None for r in rows)  # records that time the block matrices' optimizer apart
    base = None
    if baseline is not None:
        if baseline not in [r["group"] for r in rows]:
            raise ValueError(f"baseline {baseline!r} is not a group here; groups: "
                             + ", ".join(r["group"] for r in rows))
        base = optimizer_cost(next(r for r in rows if r["group"] == baseline))  # None: no column (no opt ms logged)
    head = [by, "runs", "val_loss mean ± std", "min", "steps", "tokens", "time", "step_avg", *(["MFU"] if mfu else []),
            "opt ms/step (plain, refresh)" if split else "opt ms/step",
            *(["blocks ms/step"] if blocks else []), *(["collect ms/step"] if collect else []),
            *([f"over {baseline} ms"] if base is not None else []),
            "peak MiB", f"p(mean<{target:g})"]
    body = []
    for r in rows:
        cost = optimizer_cost(r)
        over = "-" if cost is None or base is None else f"{cost - base:+.2f}"
        steps = "-" if not r["steps"] else "/".join(str(s) for s in r["steps"])
        mean = "-" if r["mean"] is None else f"{r['mean']:.4f}" + ("" if r["std"] is None else f" ± {r['std']:.4f}")
        time = "-" if r["train_time_ms"] is None else f"{r['train_time_ms'] / 60000:.2f}m"
        p = "-" if r["p_value"] is None else ("nan" if math.isnan(r["p_value"]) else f"{r['p_value']:.3g}")
        body.append([r["group"], str(r["runs"]), mean, _fmt(r["min"]), steps, _count(r["tokens"]), time,
                     _fmt(r["step_avg_ms"], "{:.2f}ms"), *([_fmt(r.get("mfu"), "{:.1f}%")] if mfu else []),
                     _opt_text(r["opt_ms"], r.get("opt_split")),
                     *([_fmt(r.get("blocks_ms"), "{:.2f}")] if blocks else []),
                     *([_fmt(r.get("collect_ms"), "{:.2f}")] if collect else []),
                     *([over] if base is not None else []), _fmt(r["peak_mib"], "{:.0f}"), p])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in [head] + body]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# ----------------------------------------------------------------------------- plotting


def plot_runs(runs: list[Run], by: str, path: str | os.PathLike | None = None, target: float | None = None):
    """Val loss against step, against training time (minutes) and zoomed on the last 20% of the steps; one line per
    run in each panel (runs without times are left out of the time panel), one colour per group, dashed when
    incomplete, a legend of groups. Draws the target as a horizontal line only when given. Saves to path if given and
    returns the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    groups = group_runs(runs, by)
    colours = plt.get_cmap("tab10").colors
    colour = {name: colours[i % len(colours)] for i, name in enumerate(groups)}
    fig, (ax_step, ax_time, ax_zoom) = plt.subplots(1, 3, figsize=(18, 5.5))
    n_max = max((r.num_iterations or r.last_step for r in runs), default=0)
    lo = 0.8 * n_max
    zoom_losses = []
    for name, members in groups.items():
        for run in members:
            style = dict(color=colour[name], linewidth=1.2, alpha=0.85, linestyle="-" if run.complete else "--",
                         gid=run.path)
            steps = [s for s, _, _ in run.val]
            losses = [v for _, v, _ in run.val]
            ax_step.plot(steps, losses, **style)
            ax_zoom.plot(steps, losses, **style)
            zoom_losses += [v for s, v in zip(steps, losses) if s >= lo]
            timed = [(t / 60000, v) for _, v, t in run.val if t is not None]
            if timed:
                ax_time.plot(*zip(*timed), **style)
    if n_max:
        ax_zoom.set_xlim(lo, n_max * 1.005)
    if zoom_losses:
        low, high = min(zoom_losses), max(zoom_losses)
        pad = 0.05 * (high - low) or 0.01
        ax_zoom.set_ylim(low - pad, high + pad)
    if target is not None:
        for ax in (ax_step, ax_time, ax_zoom):
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, gid="target")
    for ax, xlabel, title in ((ax_step, "step", "val loss by step"),
                              (ax_time, "training time (min)", "val loss by training time"),
                              (ax_zoom, "step", "last 20% of the steps")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colour[name], label=f"{name} ({len(members)})") for name, members in groups.items()]
    ax_step.legend(handles=handles, title=by, fontsize="small")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# ----------------------------------------------------------------------------- command line


def plot_path(path: str) -> str:
    """Where --plot PATH writes: PATH, PATH/compare.png for a folder, PATH.png without an extension (as matplotlib
    would)."""
    if os.path.isdir(path):
        return os.path.join(path, "compare.png")
    return path if os.path.splitext(path)[1] else path.rstrip(".") + ".png"


def find_files(items: list[str]) -> tuple[list[Path], list[str]]:
    """Files named, *.txt under folders (recursively) and glob matches; and the items that matched nothing."""
    found, missing = [], []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += sorted(f for f in p.rglob("*.txt") if f.is_file())
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append(item)
            for m in map(Path, matches):
                found += sorted(f for f in m.rglob("*.txt") if f.is_file()) if m.is_dir() else [m]
    seen, unique = set(), []
    for f in found:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, missing


def folder_files(items: list[str]) -> list[Path]:
    """Every file under the folders among `items` (named, or matched by a glob), recursively, sorted."""
    folders = []
    for item in items:
        folders += [Path(item)] if Path(item).is_dir() else [Path(m) for m in sorted(glob.glob(item, recursive=True))
                                                              if Path(m).is_dir()]
    return sorted({f for d in folders for f in d.rglob("*") if f.is_file()})


def _names(paths: list[Path], every: bool, first: int = 3) -> str:
    """The paths, all of them or the first few and how to see the rest."""
    shown = paths if every or len(paths) <= first else paths[:first]
    return ", ".join(map(str, shown)) + ("" if len(shown) == len(paths) else ", ... (--skipped names each)")


def _date(text: str) -> dt.date:
    try:
        return dt.datetime.strptime(text, "%Y-%m-%d").date()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


def _timing(r: Run) -> str:
    """The speed columns of a run that did not finish, over the steps it logged (a run cut by a time limit still
    measured them): '; step_avg ..., opt ms ... (plain, refresh), blocks ms ..., collect ms ...' as far as known."""
    parts = [] if r.step_avg is None else [f"step_avg {r.step_avg:.2f}ms"]
    if r.opt_ms is not None:
        parts.append(f"opt ms {_opt_text(r.opt_ms, r.opt_ms_split)}")
    if r.blocks_ms is not None:
        parts.append(f"blocks ms {r.blocks_ms:.2f}")
    if r.collect_ms is not None:
        parts.append(f"collect ms {r.collect_ms:.2f}")
    return "; " + ", ".join(parts) if parts else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", help="record files, folders (*.txt inside, recursively) or globs; "
                                                 "default: runs/ beside records/ (the trainer's "
                                                 "default --records_dir)")
    parser.add_argument("--target", type=float, default=3.28, help="val loss to beat (default 3.28)")
    parser.add_argument("--by", choices=GROUPINGS, default="optimizer", help="how to group runs")
    parser.add_argument("--plot", metavar="PNG", help="write val-loss curves to this PNG")
    parser.add_argument("--since", type=_date, metavar="YYYY-MM-DD", help="only runs started on or after this date")
    parser.add_argument("--baseline", metavar="GROUP", help="the group the others are measured against: Welch's "
                                                            "t-test of each against it, and a column of each group's "
                                                            "optimizer (+ collect) ms a step over its, e.g. adamw")
    parser.add_argument("--at", type=int, metavar="STEP", help="the val loss at STEP instead of the final one: every "
                                                           "run that logged it counts, runs cut later included")
    parser.add_argument("--skipped", action="store_true", help="name every file skipped, not only the first few")
    parser.add_argument("--sweep", metavar="SETTING", help="val loss against SETTING's value per group (lr: each "
                                                           "optimizer's own), the best value, a warning when it is "
                                                           "at the edge; with --plot, that plot (log axis)")
    parser.add_argument("--best", metavar="SETTING", help="each group at its best value of SETTING (lr: each "
                                                         "optimizer's own): only those runs in the table, the "
                                                         "tests, --steps_to and --track")
    parser.add_argument("--steps_to", metavar="LOSS", nargs="?", const="baseline",
                        help="the step (interpolated between val points), tokens and time at which each run first "
                             "reaches LOSS (default: --baseline's mean final val loss), and the speedup over "
                             "--baseline")
    parser.add_argument("--track", action="store_true", help="the optimization track's two rules: (target - mean) "
                                                             "sqrt(n) >= 0.004 per group, and the pairwise rule")
    parser.add_argument("--runs", action="store_true", help="also list each run: group, final val loss, its step "
                                                            "and training time, the file")
    parser.add_argument("--step_time", metavar="A:B", help="ms a step between logged steps A and B (from "
                                                             "train_time) per group, and the ratio to --baseline")
    parser.add_argument("--per_100_steps", type=float, default=TRACK_LOSS_PER_100_STEPS,
                        help="--track's val loss worth 100 steps (default 0.0045, the track's)")
    args = parser.parse_args(argv)

    items = args.paths or [str(Path(__file__).resolve().parents[1] / "runs")]
    files, missing = find_files(items)
    runs, skipped, other_logs, others = [], [], [], []
    for f in files:
        run = parse_record(f)
        if run is None:
            skipped.append(f)
        else:
            runs.append(run)
    named = {f.resolve() for f in files}
    for f in folder_files(items):  # beside the *.txt: the old `s:N tel:X` logs, named *.log; the rest is counted
        if f.resolve() in named:
            continue
        run = parse_record(f) if f.suffix == ".log" else None
        if run is not None and run.format == "upstream_old":
            runs.append(run)
        else:
            (other_logs if f.suffix == ".log" else others).append(f)
    left_out = 0
    if args.since is not None:
        kept = [r for r in runs if r.timestamp is None or r.timestamp.date() >= args.since]
        left_out, runs = len(runs) - len(kept), kept

    # runs that `--stop_at K` ended: the first K steps of a longer schedule, listed apart, never in a mean with
    # runs that ran theirs to the end (with --at every run is cut to one step, so all count)
    stopped = [r for r in runs if r.stopped_at is not None and r.complete] if args.at is None else []
    if args.at is not None:
        runs = [at_step(r, args.at) for r in runs]
    compared = [r for r in runs if not any(r is x for x in stopped)]
    if runs:
        groups = everything = group_runs(compared, args.by)
        if args.best:
            groups, best = at_best(everything, args.best)
            print(f"each {args.by} at its best {args.best}: " + (", ".join(
                f"{name} {value} (n={n})" for name, (value, n) in best.items()) or "no complete run says it"))
        rows = summarize(groups, args.target)
        try:
            print(format_table(rows, args.by, args.target, args.baseline))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.by == "config":
            diffs = config_differences(groups)
            if any(diffs.values()):
                print("\nconfigs differ in:")
                for name, d in diffs.items():
                    print(f"  {name}: " + (" ".join(f"{k}={json.dumps(v)}" for k, v in d.items()) or "(upstream)"))
        if len(rows) > 1:
            pairs = welch_pairs(rows, args.baseline)
            if pairs:
                what = "final val loss" if args.at is None else f"val loss at step {args.at}"
                print(f"\n{what}, Welch's t-test" + (f" against {args.baseline}:" if args.baseline else ":"))
                for a, b, w in pairs:
                    print("  " + welch_line(a, b, w))
                mixed = [r["group"] for r in rows if len(r["steps"]) > 1]
                if mixed:
                    print(f"  note: {', '.join(mixed)} mix(es) runs of different lengths; compare one protocol "
                          f"(--by config, or one experiment's folder)")
            else:
                print(f"\n{len(rows)} groups: pass --baseline GROUP for Welch's t-test of each against it")
        if args.runs:
            print()
            print(format_runs(groups, args.by))
        if args.track:
            print()
            print("\n".join(track_lines(rows, args.target, args.baseline, per_100_steps=args.per_100_steps)))
        if args.steps_to is not None:
            if args.steps_to == "baseline":
                base = next((r for r in rows if r["group"] == args.baseline), None)
                if base is None or base["mean"] is None:
                    print("error: --steps_to without a loss takes --baseline's mean final val loss: pass --baseline "
                          "GROUP (a group with complete runs) or --steps_to LOSS", file=sys.stderr)
                    return 2
                target = base["mean"]
            else:
                try:
                    target = float(args.steps_to)
                except ValueError:
                    print(f"error: --steps_to {args.steps_to}: not a number", file=sys.stderr)
                    return 2
            print()
            print(format_steps(steps_rows(groups, target, args.baseline), target, args.by, args.baseline))
        if args.step_time:
            a, _, b = args.step_time.partition(":")
            if not (a.isdigit() and b.isdigit() and int(a) < int(b)):
                print(f"error: --step_time {args.step_time}: want A:B, two steps with A < B", file=sys.stderr)
                return 2
            print()
            print(format_step_time(groups, int(a), int(b), args.by, args.baseline))
        if args.sweep:
            table = sweep_rows(everything, args.sweep)
            print()
            print(format_sweep(table, args.sweep) if any(table.values()) else
                  f"--sweep {args.sweep}: no complete run says this setting")
        if stopped:
            print("\nstopped by --stop_at (the first K steps of an N-step schedule: not in the table's means):")
            for r in stopped:
                print(f"  {r.path} [{r.key(args.by)}]: step {r.stopped_at}/{r.num_iterations}, val_loss "
                      f"{_fmt(r.final_val_loss)}{_timing(r)}")
        incomplete = [r for r in runs if not r.complete]
        if incomplete:
            print("\nincomplete (stopped, crashed, diverged or still going):")
            for r in incomplete:
                n = "?" if r.num_iterations is None else r.num_iterations
                last = "" if r.final_val_loss is None else f", last val_loss {r.final_val_loss:.4f}"
                how = (f"diverged at step {r.diverged_at}/{n}, last good step {r.last_good_step}"
                       if r.diverged_at is not None else f"reached step {r.last_step}/{n}")
                print(f"  {r.path} [{r.key(args.by)}]: {how}{last}{_timing(r)}")
        if args.plot:
            out = plot_path(args.plot)
            try:
                if args.sweep:
                    plot_sweep(sweep_rows(everything, args.sweep), args.sweep, out)
                else:
                    shown = [r for g in groups.values() for r in g] if args.best else runs
                    plot_runs(shown, args.by, out, target=args.target)
            except (OSError, ValueError) as e:  # a read-only or missing folder; a file type matplotlib cannot write
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
                print(f"error: --plot {args.plot}: cannot write it ({why}); pass a writable path ending in .png",
                      file=sys.stderr)
                return 2
            print(f"\nplot: {out}")
    else:
        print("no records found")
    if left_out:
        print(f"\n{left_out} run(s) before {args.since} left out (--since)")
    for f in skipped:
        print(f"skipped {f}: not a record")
    if other_logs:
        print(f"skipped {len(other_logs)} .log file(s) under the folders, not `s:N tel:X` logs (read only when named): "
              + _names(other_logs, args.skipped))
    if others:
        kinds: dict[str, list[Path]] = {}
        for f in others:
            kinds.setdefault(f.suffix or "(no suffix)", []).append(f)
        print("not read, under the folders (neither .txt nor .log): "
              + ", ".join(f"{len(v)} {k}" for k, v in sorted(kinds.items())))
        if args.skipped:
            for f in others:
                print(f"  {f}")
    for item in missing:
        print(f"skipped {item}: no such file")
    return 0 if runs else 1


if __name__ == "__main__":
    sys.exit(main())
