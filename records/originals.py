"""The original trainers beside this project, in one command: the same shards, schedule and val tokens, n runs each.

    python records/originals.py --originals .originals --out records/h200-enwiki/originals --seeds 3 \\
        --input_bin 'data/enwiki/*_train_*.bin' --input_val_bin 'data/enwiki/*_val_*.bin' [--preset compare] \\
        [--which muon,soap] [--parallel 1] [--project_records DIR] [--deadline S] [--first_seed K] [--dry_run] \\
        [-- settings]

--originals holds the user's copies (never committed):
    modded-nanogpt/train_gpt2.py                  KellerJordan/modded-nanogpt at b9979e6 (Muon, as OrthogonalNesterov)
    modded-nanogpt-SOAP/train_gpt2.py + soap.py   nikhilvyas/modded-nanogpt-SOAP (SOAP)
    modded-nanogpt-track3/train_gpt_simple.py     KellerJordan/modded-nanogpt at f411b3d,
                                                  records/track_3_optimization/ (the optimization
                                                  track's baseline: --which track3 --preset track3)
The project's protocol (--preset and the settings after --) is mapped onto each original's command line
(original_args): its d12 model, --batch_size = the project's device batch, --accumulation the rest of its batch,
--sequence_length, --num_iterations, --warmup_iters, --warmdown_iters, --learning_rate, --val_loss_every, and
--val_max_steps = val_tokens / (device batch x sequence length); settings an original hard-codes (its learning-rate
ratios, betas, SOAP's refresh period, no weight decay) must match the project's or the script refuses;
the preset's tuned rates (PRESET_TUNED) are not applied here: both sides run the record's (untuned). Runs go one
after the other on one GPU (--parallel k: k at once; the later runs of an original wait until its first has compiled,
~2 min for b9979e6, and load its compile cache), each original in its own folder under --work (its
logs/<id>/log.txt, kept, and its final checkpoint, deleted: ~1.5 GB each), then its log is converted into <out>/
original-<opt>/<time>-original-<opt>-<i>.txt (convert_log: an upstream-format log whose header names the original,
its sha256 and the optimizers it builds, so records/compare.py groups it), and the project's runs write records into
<out>/project-<opt>/ (--label project-<opt>, --seed i; checkpoints under --work, deleted at the end). With
--project_records DIR the project is not run: DIR's complete records of each optimizer under the same protocol
(same_protocol: the model, batch, schedule, validation, shard names and what the original hard-codes) are copied
into <out>/project-<opt>/ instead, and the others named with the first setting that differs. Every run's output:
<out>/stdout/<label>-<i>.log; the command and every job's: <out>/originals.json. Runs are numbered i = K .. K+n-1
(--first_seed K, default 0), so a later call adds runs to an experiment without repeating a seed or a run's name.
--deadline S (a time-limited machine): no run starts that would not finish within S seconds of the start (judged
by the longest finished run of its kind; a run that loads the compile cache by such runs or, before one has
finished, by the first less its compile plus a cache-loading run's compile), and at S the running ones are stopped
(one past its last training step has 30 s more to print its final val loss); SIGTERM or Ctrl-C stops them at once.
A stopped original's log is still converted (compare.py lists it as incomplete, with the steps it reached).
A run that runs out of GPU memory beside others is started again once, with --parallel lowered to the number it ran
beside (the SOAP fork holds ~64 GiB at 64 x 1024: two of it and a project run do not fit a 140 GiB H200); a failed
run's own error line is printed.
Last, compare.py --by optimizer over <out> (the originals as upstream-<opt>), and per optimizer whether the
project's mean lies within two standard errors of the original's.

train_gpt_simple.py (track3) has no command line: its settings are literals. Each run gets a copy
in its folder under --work, made by track3_source with track3_edits (the shard patterns, made
absolute; train_steps, batch_size, val_tokens; torch.manual_seed(i) before its model, since
unseeded all its runs would start from torch's default seed and one init), its other settings
checked against the project's (ORIGINALS["track3"].fixed; its cooldown_frac 0.7: --warmdown_iters
= 0.7 x --num_iterations). The compare shape beside it, one 64 x 1024 micro-batch a step for 400
steps with the track's schedule scaled:
    python records/originals.py --originals .originals --out records/EXP --which track3 \
        --preset track3 --input_bin ... --input_val_bin ... -- --batch_size 64 \
        --num_iterations 400 --warmdown_iters 280 --val_tokens 4194304
Its log (logs/<id>.txt: its code, then `step:N/M val_loss:X train_time:Ys` lines) is copied into
<out>/original-track3/ below the header lines a converted log has.

The originals seed nothing, and their runs do not start from one init: two runs of b9979e6 on one H200 began at
val loss 10.9895 and 11.0351 (step 0), so their spread includes the init's, as the project's runs with --seed 0 .. n-1
do.
The originals validate without autocast (fp32 forward), the project under bf16 autocast.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
import compare  # noqa: E402
# the queue (tests reach estimate, finishing and run_jobs through this module)
from jobs import Job, estimate, finishing, local_gpus, output, run_jobs  # noqa: E402,F401
import train_gpt2  # noqa: E402

LAUNCHER = "torchrun --standalone --nproc_per_node=1"  # the originals need torchrun's RANK/WORLD_SIZE (NCCL)
# the originals' models: (n_layer, n_head, n_embd, vocab_size) -> --model
MODELS = {(12, 12, 768, 50257): "d12", (24, 16, 1024, 50257): "d24", (36, 20, 1280, 50257): "d36",
          (48, 25, 1600, 50257): "d48"}


@dataclass
class Original:
    """One original trainer: where its files are under --originals, what it is, and the project settings it
    hard-codes (project field -> the value its code uses; "lr": its --learning_rate, "10lr": 10x that)."""
    name: str
    repo: str
    commit: str
    files: list[str]
    sha256: str  # of files[0] at that commit
    fixed: dict = field(default_factory=dict)


# what track3_edits replaces in train_gpt_simple.py
TRACK3_LITERALS = dict(train="data/fineweb10B/fineweb_train_*.bin",
                       val="data/fineweb10B/fineweb_val_*.bin",
                       steps="train_steps = 3250", batch="batch_size = 8 * 64 * 1024",
                       val_tokens="val_tokens = 20 * 524288",
                       model="model = GPT(vocab_size=50304, num_layers=12, model_dim=768).cuda()",
                       glob="files = sorted(Path.cwd().glob(filename_pattern))")
TRACK3_MBS = 64  # its micro-batch (sequences): a step's and the val tokens come in whole ones
ORIGINALS = {
    "muon": Original("muon", "KellerJordan/modded-nanogpt", "b9979e6df16c7e18c3bb4da0070ad88bae530de4",
                     ["modded-nanogpt/train_gpt2.py"],
                     "02b9a5723e63af85ccb41fae9925fd2e43b823837ff882e058607bf1a8a3b569",
                     dict(optimizer="muon", embed_lr="lr", muon_lr="10lr", muon_momentum=0.95, muon_nesterov=True,
                          ns_coeffs="simple", muon_shape_scale=False, embed_betas=(0.9, 0.95))),
    "soap": Original("soap", "nikhilvyas/modded-nanogpt-SOAP", "618af27156c1875ef028882f543bb1be04485eb2",
                     ["modded-nanogpt-SOAP/train_gpt2.py", "modded-nanogpt-SOAP/soap.py"],
                     "9f01d9475f2469b29f576fbf14012e3279a387e334286df689cd762dcc1b174c",
                     dict(optimizer="soap", embed_lr=0.0018, soap_lr="lr", soap_betas=(0.95, 0.95),
                          soap_shampoo_beta=-1.0, soap_eps=1e-8, soap_weight_decay=0.0,
                          soap_precondition_frequency=10, soap_max_precond_dim=10000, embed_betas=(0.9, 0.95))),
    "track3": Original("track3", "KellerJordan/modded-nanogpt",
                       "f411b3d346aa52d3504324ca93c230fd84c6c07f",
                       ["modded-nanogpt-track3/train_gpt_simple.py"],
                       "d39470e5b0535baf9c6caf7dbcd15efa79d8eacc9badf6e7c45b536e8537deec",
                       dict(model="track3", vocab_size=50304, n_layer=12, n_head=6, n_embd=768,
                            sequence_length=1024, optimizer="muon", embed_lr=0.7, head_lr=0.004,
                            scalar_lr=0.015, embed_betas=(0.8, 0.95), embed_eps=1e-10,
                            embed_weight_decay=0.001, muon_lr=0.025, muon_weight_decay=0.05,
                            muon_momentum=0.95, muon_nesterov=True, muon_lerp=True,
                            ns_coeffs="convergent", muon_shape_scale=True, warmup_iters=0,
                            val_loss_every=125, val_tail_every=25)),
}


def optimizer_of(name: str) -> str:
    """The project's --optimizer for an original (track3: its Muon)."""
    return ORIGINALS[name].fixed["optimizer"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def untuned(preset: str, extra: list[str], optimizer: str) -> list[str]:
    """`--name value` for each setting the preset's PRESET_TUNED row gives `optimizer` and `extra`
    does not: its value without that row (the preset's, else the default). The originals hard-code
    the record's rates, so beside them the project runs those, not the preset's tuned ones."""
    given = {a[2:].partition("=")[0] for a in extra if a.startswith("--")}
    row = train_gpt2.PRESET_TUNED.get(preset, {}).get(optimizer, {})
    plain = train_gpt2.Hyperparameters(**train_gpt2.PRESETS[preset])
    return [x for name in row if name not in given
            for x in (f"--{name}", str(getattr(plain, name)))]


def project_settings(preset: str, extra: list[str], optimizer: str) -> train_gpt2.Hyperparameters:
    """The project's settings for one optimizer: --preset, the settings after --, --optimizer; the
    preset's tuned rates left out (untuned)."""
    return train_gpt2.parse_args(["--preset", preset, *extra, *untuned(preset, extra, optimizer),
                                  "--optimizer", optimizer])


def refuse_unlike(args: train_gpt2.Hyperparameters, original: Original,
                  lr: float | None = None) -> None:
    """SystemExit (one line) at the first setting `original` hard-codes that the project's `args`
    set otherwise ("lr": the original's --learning_rate `lr`, "10lr": 10x that)."""
    for name, want in original.fixed.items():
        if isinstance(want, str) and want.endswith("lr"):
            want = {"lr": lr, "10lr": 10 * (lr or 0)}.get(want, want)
        have = getattr(args, name)
        if (math.isclose(have, want, rel_tol=1e-12)
                if isinstance(want, float) and not isinstance(have, bool) else have == want):
            continue
        raise SystemExit(f"--{name} {have}: {original.repo} at {original.commit[:7]} hard-codes "
                         f"{want}" + (f" (with --learning_rate {lr})" if lr is not None else "")
                         + f"; set --{name} {want} to compare like with like")


def track3_edits(args: train_gpt2.Hyperparameters, seed: int) -> list[tuple[str, str, str]]:
    """(old, new, why) of the copy of train_gpt_simple.py that runs the project's settings `args`
    on one GPU (each old text occurs once); refuses (SystemExit, one line) what it cannot run as
    the project does: a setting it hard-codes set otherwise, a cooldown other than 0.7 of the run,
    --stop_at, a step or val tokens not in whole micro-batches of 64 sequences."""
    refuse_unlike(args, ORIGINALS["track3"])
    n, cooldown = args.num_iterations, args.warmdown_iters
    if cooldown != round(0.7 * n) or not math.isclose(cooldown, 0.7 * n, rel_tol=1e-12):
        raise SystemExit(f"--warmdown_iters {cooldown}: train_gpt_simple.py cools down over 0.7 "
                         f"of the run; with --num_iterations {n} that is {0.7 * n:g} steps (it "
                         f"must be whole)")
    if args.stop_at:
        raise SystemExit("--stop_at: the originals have no such setting; run the whole schedule")
    T = args.sequence_length
    for name, tokens in (("batch_size", args.batch_size * T), ("val_tokens", args.val_tokens)):
        if tokens % (TRACK3_MBS * T):
            raise SystemExit(f"--{name}: train_gpt_simple.py takes {tokens} tokens in "
                             f"micro-batches of {TRACK3_MBS} x {T}; make it a multiple of that")
    L = TRACK3_LITERALS
    return [(L["train"], args.input_bin, "the train shards (--input_bin)"),
            (L["val"], args.input_val_bin, "the val shards (--input_val_bin)"),
            (L["glob"], "files = sorted(Path('/').glob(filename_pattern.lstrip('/')))",
             "absolute shard patterns (Path.glob takes relative ones only)"),
            (L["steps"], f"train_steps = {n}", "the run's steps (--num_iterations)"),
            (L["batch"], f"batch_size = {args.batch_size * T}",
             "the step's tokens (--batch_size x --sequence_length)"),
            (L["val_tokens"], f"val_tokens = {args.val_tokens}", "the val tokens (--val_tokens)"),
            (L["model"], f"torch.manual_seed({seed})\n" + L["model"],
             "a seed: unseeded, every run starts from torch's default seed (one init); the "
             "project's --seed")]


def track3_source(text: str, edits: list[tuple[str, str, str]]) -> str:
    """train_gpt_simple.py's `text` with `edits` made, each old text found exactly once (else
    SystemExit)."""
    for old, new, _ in edits:
        if text.count(old) != 1:
            raise SystemExit(f"train_gpt_simple.py: {old!r} occurs {text.count(old)} times, "
                             f"expected once (is it {ORIGINALS['track3'].repo} at "
                             f"{ORIGINALS['track3'].commit[:7]}?)")
        text = text.replace(old, new)
    return text


def original_args(args: train_gpt2.Hyperparameters, original: Original) -> list[str]:
    """The original's command-line arguments for the project's settings `args` on one GPU; refuses (SystemExit, one
    line) what an original cannot run as the project does: another model, --stop_at, val tokens not whole batches,
    or a setting the original hard-codes set otherwise in the project. track3 has no command line
    (none; its copy is edited: track3_edits, which does its checks)."""
    if original.name == "track3":
        track3_edits(args, 0)
        return []
    model = MODELS.get((args.n_layer, args.n_head, args.n_embd, args.vocab_size))
    if model is None:
        raise SystemExit(f"--n_layer {args.n_layer} --n_head {args.n_head} --n_embd {args.n_embd} --vocab_size "
                         f"{args.vocab_size}: the originals build only {', '.join(MODELS.values())}")
    if args.stop_at:
        raise SystemExit("--stop_at: the originals have no such setting; run the whole schedule")
    if args.batch_size % args.device_batch_size:
        raise SystemExit(f"--device_batch_size {args.device_batch_size} does not divide --batch_size {args.batch_size}")
    per_batch = args.device_batch_size * args.sequence_length
    if args.val_tokens % per_batch:
        raise SystemExit(f"--val_tokens {args.val_tokens}: the originals validate on whole batches of {per_batch} "
                         f"tokens (--device_batch_size x --sequence_length)")
    lr = args.embed_lr if original.fixed.get("embed_lr") == "lr" else getattr(args, f"{original.name}_lr")
    refuse_unlike(args, original, lr)
    return ["--input_bin", args.input_bin, "--input_val_bin", args.input_val_bin, "--model", model,
            "--batch_size", str(args.device_batch_size),
            "--accumulation", str(args.batch_size // args.device_batch_size),
            "--sequence_length", str(args.sequence_length), "--num_iterations", str(args.num_iterations),
            "--warmup_iters", str(args.warmup_iters), "--warmdown_iters", str(args.warmdown_iters),
            "--learning_rate", repr(lr), "--weight_decay", "0", "--val_loss_every", str(args.val_loss_every),
            "--val_max_steps", str(args.val_tokens // per_batch)]


PROTOCOL = ("optimizer", "n_layer", "n_head", "n_embd", "vocab_size", "batch_size", "device_batch_size",
            "sequence_length", "num_iterations", "stop_at", "warmup_iters", "warmdown_iters", "val_loss_every",
            "val_tokens", "embed_lr", "embed_betas")  # what a record must share with the originals' runs


def same_protocol(args: train_gpt2.Hyperparameters, have: dict, original: Original) -> str | None:
    """None if a record's settings `have` match the protocol `args` on PROTOCOL, the fields `original` hard-codes
    and the shards' file names (the folder may differ); else the first setting that differs, as `name: have != want`.
    A field the record lacks (written before the field existed) is not compared."""
    def norm(v):
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v
    for name in ("input_bin", "input_val_bin"):
        if os.path.basename(str(have.get(name))) != os.path.basename(getattr(args, name)):
            return f"{name}: {have.get(name)} != {getattr(args, name)}"
    for name in (*PROTOCOL, *original.fixed, f"{original.name}_lr"):
        if name not in have:
            continue
        want, got = norm(getattr(args, name)), norm(have[name])
        if not (math.isclose(got, want, rel_tol=1e-12) if isinstance(want, float) and isinstance(got, (int, float))
                else got == want):
            return f"{name}: {got} != {want}"
    return None


def project_records(folder: Path, ns: argparse.Namespace) -> tuple[dict[str, list[Path]], list[str]]:
    """Per optimizer of ns.which, the complete records under `folder` (recursively) with its protocol; and one line
    per record left out, saying why."""
    found, skipped = {name: [] for name in ns.which}, []
    for path in compare.find_files([str(folder)])[0]:
        run = compare.parse_record(path)
        if run is None or run.format != "ours":
            continue
        hp = run.hyperparameters
        # the original it stands beside
        name = "track3" if hp.get("model") == "track3" else hp.get("optimizer")
        if name not in found:
            continue
        protocol = project_settings(ns.preset, ns.project, optimizer_of(name))
        why = "incomplete" if not run.complete else same_protocol(protocol, hp, ORIGINALS[name])
        if why:
            skipped.append(f"{path}: {why}")
        else:
            found[name].append(Path(path))
    return found, skipped


def plan(ns: argparse.Namespace) -> list[Job]:
    """The jobs: per optimizer, --seeds runs of the original (each in its folder under ns.work;
    track3: the copy track3_copy writes there, unless ns.dry_run), then as many of the project
    (checkpoints under ns.work); every run's output in <out>/stdout/<label>-<i>.log."""
    root, out, work = Path(ns.originals), Path(ns.out), Path(ns.work)
    jobs = []
    for name in ns.which:
        original = ORIGINALS[name]
        missing = [f for f in original.files if not (root / f).is_file()]
        if missing:
            raise SystemExit(f"{root / missing[0]}: missing; put {original.repo} (commit {original.commit[:7]}) there")
        args = project_settings(ns.preset, ns.project, optimizer_of(name))
        oargs = original_args(args, original)
        script = (root / original.files[0]).resolve()
        for k in range(ns.seeds):
            i = ns.first_seed + k
            cwd = work / f"original-{name}-{i}"
            if name == "track3":
                copy = track3_copy(script, cwd, args, i, ns.dry_run)
                cmd, after = [*shlex.split(ns.launcher), str(copy)], collect_track3
            else:
                cmd, after = [*shlex.split(ns.launcher), str(script), *oargs], collect
            jobs.append(Job(f"original-{name} run {i}", cmd, cwd,
                            out / "stdout" / f"original-{name}-{i}.log",
                            after=lambda job, name=name, i=i, after=after: after(
                                job, ORIGINALS[name], root, out, i),
                            kind=f"original-{name}", first=jobs[-k] if k else None))
        for i in range(ns.first_seed, ns.first_seed + (0 if ns.project_records else ns.seeds)):
            label = f"project-{name}"
            cmd = [sys.executable, str(REPO / "train_gpt2.py"), "--preset", ns.preset, *ns.project,
                   *untuned(ns.preset, ns.project, optimizer_of(name)),
                   "--optimizer", optimizer_of(name), "--seed", str(i), "--label", label,
                   "--records_dir", str((out / label).resolve()),
                   "--checkpoint_dir", str((work / "checkpoints").resolve())]
            jobs.append(Job(f"{label} seed {i}", cmd, REPO, out / "stdout" / f"{label}-{i}.log", kind=label))
    return jobs


def track3_copy(script: Path, folder: Path, args: train_gpt2.Hyperparameters, seed: int,
                dry_run: bool) -> Path:
    """folder/train_gpt_simple.py: `script` with track3_edits(args, seed) made (written unless
    dry_run)."""
    path = folder / script.name
    text = track3_source(script.read_text(), track3_edits(args, seed))
    if not dry_run:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path


_STDOUT_STEP = re.compile(r"^step\s+(\d+)/(\d+) \| train loss (\S+) \|.*\(([\d.]+) ms \|")
_PEAK = re.compile(r"^peak memory consumption: (\d+) MiB")
_OLD = re.compile(r"^s:(\d+) (tel|trl):(\S+)")
UNTIMED = 10  # as the project: the first 10 steps are compile warm-up, left out of train_time


def convert_log(log: str, stdout: str, header: list[str]) -> str:
    """An original's logs/<id>/log.txt (`s:N tel:X`, `s:N trl:X`) and stdout (`step   s/N | train loss X | ... (T ms
    | ...`) as an upstream-format log compare.py reads: `header` lines, a `====` line, then `step:s/N val_loss:X
    train_time:Tms step_avg:Ams` (val at step s, 0 .. N) and `step:s+1/N train_loss:X train_time:... step_avg:...`
    (the train line of step index s), train_time summing the stdout's step times after the first UNTIMED steps, and
    `peak memory consumption: M MiB` when the run got there."""
    ms, n, peak = {}, None, None
    for line in stdout.splitlines():
        if m := _STDOUT_STEP.match(line):
            ms[int(m[1])], n = float(m[4]), int(m[2])
        elif m := _PEAK.match(line):
            peak = int(m[1])
    elapsed = lambda s: sum(t for k, t in ms.items() if UNTIMED < k <= s)
    avg = lambda s: f"{elapsed(s) / (s - UNTIMED):.2f}" if s > UNTIMED else "nan"
    steps = []
    for line in log.splitlines():
        if m := _OLD.match(line):
            s, kind, value = int(m[1]), m[2], float(m[3])
            steps.append((s, kind, value))
    if n is None:  # no step finished: N from the last val step (the log never says it)
        n = max((s for s, k, _ in steps if k == "tel"), default=0)
    out = [*header, "=" * 100]
    for s, kind, value in steps:
        done = s if kind == "tel" else s + 1
        what = "val_loss" if kind == "tel" else "train_loss"
        out.append(f"step:{done}/{n} {what}:{value:.4f} train_time:{elapsed(done):.0f}ms step_avg:{avg(done)}ms")
    if peak is not None:
        out.append(f"peak memory consumption: {peak} MiB")
    return "\n".join(out) + "\n"


def header_lines(original: Original, root: Path, cmd: list[str]) -> list[str]:
    """What a converted log says of its original: repo, commit, files with sha256 (and whether they are that
    commit's), the optimizers its code builds (by name, as compare.upstream_optimizer finds them), the command, and
    that it seeds nothing."""
    lines = [f"original: {original.repo} at {original.commit}"]
    for f in original.files:
        digest = sha256(root / f)
        note = "" if f != original.files[0] or digest == original.sha256 else " (not that commit's file)"
        lines.append(f"file: {f} sha256:{digest}{note}")
    code = "\n".join((root / f).read_text() for f in original.files[:1])
    code = "\n".join(line.split("#", 1)[0] for line in code.splitlines())
    built = sorted({m[1] for m in compare._BUILT.finditer(code)})
    lines.append("builds: " + ", ".join(f"{b}(...)" for b in built))
    lines.append("command: " + shlex.join(cmd))
    lines.append("seed: none (the original seeds nothing; its init differs from run to run)")
    return lines


def collect(job: Job, original: Original, root: Path, out: Path, i: int) -> Path | None:
    """Convert the run's log into <out>/original-<name>/ and remove its folder's checkpoints; the converted path, or
    None (said) when the run left no log."""
    logs = sorted(job.cwd.glob("logs/*/log.txt"), key=lambda p: p.stat().st_mtime)  # newest last: a retried run
    stdout = output(job)
    if not logs:
        print(f"{job.what}: no logs/<id>/log.txt in {job.cwd}; its output: {job.stdout}")
        return None
    text = convert_log(logs[-1].read_text(), stdout, header_lines(original, root, job.cmd))
    if not re.search(r"^step:", text, re.M):
        print(f"{job.what}: its log {logs[-1]} has no step; its output: {job.stdout}")
        return None
    folder = out / f"original-{original.name}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-original-{original.name}-{i}.txt"
    path.write_text(text)
    for state in job.cwd.glob("logs/*/state_step*.pt"):  # the original saves its model at the end
        state.unlink()
    print(f"{job.what}: {path}", flush=True)
    return path


def collect_track3(job: Job, original: Original, root: Path, out: Path, i: int) -> Path | None:
    """Copy the run's newest logs/<id>.txt (its code, then its `step:N/M val_loss:X ...` lines)
    into <out>/original-track3/ below header_lines, then the `step:N/M train_time:Xs ...` lines it
    printed only to the console (job.stdout: the time of every step, for compare.py --step_time);
    the copied path, or None (said) when the run left no log."""
    logs = sorted(job.cwd.glob("logs/*.txt"), key=lambda p: p.stat().st_mtime)
    if not logs:
        print(f"{job.what}: no logs/<id>.txt in {job.cwd}; its output: {job.stdout}")
        return None
    folder = out / f"original-{original.name}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-original-{original.name}-{i}.txt"
    header = header_lines(original, root, job.cmd)[:-1]
    header.append(f"seed: {i} (torch.manual_seed({i}) in its copy)")
    console = job.stdout.read_text(errors="replace").splitlines() if job.stdout.is_file() else []
    steps = [line for line in console if re.match(r"step:\d+/\d+ train_time:", line)]
    log = logs[-1].read_text()
    path.write_text("\n".join(header) + "\n" + log + ("" if log.endswith("\n") else "\n")
                    + "".join(line + "\n" for line in steps))
    print(f"{job.what}: {path}", flush=True)
    return path


def within_two_se(out: Path, which: list[str]) -> list[str]:
    """Per optimizer: the project's mean final val loss against the original's, whether it lies within two
    standard errors (std / sqrt(n)) of the original's mean, and Welch's p of the two (few runs of an original can
    agree closely enough that its standard error undercounts its spread)."""
    groups = {}
    for kind in ("original", "project"):
        for name in which:
            paths = sorted((out / f"{kind}-{name}").glob("*.txt"))
            groups[f"{kind}-{name}"] = [r for r in map(compare.parse_record, paths) if r is not None]
    rows = {r["group"]: r for r in compare.summarize(groups)}
    lines = []
    for name in which:
        o, p = rows.get(f"original-{name}"), rows.get(f"project-{name}")
        if not o or not p or o["mean"] is None or p["mean"] is None:
            lines.append(f"{name}: no complete runs of both to compare")
            continue
        if o["std"] is None:
            lines.append(f"{name}: project {p['mean']:.4f} vs original {o['mean']:.4f} (one original run: no standard "
                         f"error)")
            continue
        se = o["std"] / math.sqrt(o["runs"])
        diff = p["mean"] - o["mean"]
        w = compare.welch(p["losses"], o["losses"])
        welch = "" if w is None else f" (Welch p = {w['p_value']:.3g}: {compare.verdict(w)})"
        lines.append(f"{name}: project {p['mean']:.4f} (n={p['runs']}) - original {o['mean']:.4f} (n={o['runs']}) = "
                     f"{diff:+.4f}; 2 standard errors of the original's mean: {2 * se:.4f}: "
                     + ("within" if abs(diff) <= 2 * se else "outside") + welch)
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    project = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage="%(prog)s --originals DIR --out DIR --input_bin GLOB --input_val_bin GLOB "
                                           "[options] [-- train_gpt2.py settings]")
    parser.add_argument("--originals", required=True, help="folder of the copies (see above)")
    parser.add_argument("--out", required=True, help="the experiment's records folder")
    parser.add_argument("--input_bin", required=True, help="train shards (glob), for every run")
    parser.add_argument("--input_val_bin", required=True, help="val shards (glob), for every run")
    parser.add_argument("--seeds", type=int, default=3, help="runs of each, n (the project's: --seed K .. K+n-1)")
    parser.add_argument("--first_seed", type=int, default=0, help="K: the first run's number and the project's "
                                                                  "first --seed (default 0): more runs for an "
                                                                  "experiment")
    parser.add_argument("--which", default="muon,soap", help="originals to run: muon, soap or both (comma-separated)")
    parser.add_argument("--preset", default="compare", help="the project's protocol (train_gpt2.py --preset)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once on the GPU")
    parser.add_argument("--launcher", default=LAUNCHER, help=f"what runs an original (default: {LAUNCHER})")
    parser.add_argument("--work", help="where the originals run and the project's checkpoints go (default: a new "
                                       "temporary folder; the originals' raw logs stay there)")
    parser.add_argument("--project_records", help="a folder of the project's records under the same protocol: "
                                                  "compared instead of running the project")
    parser.add_argument("--deadline", type=float, default=0, help="seconds: start no run that would not finish by "
                                                                   "then (by the finished runs of its kind), stop "
                                                                   "the ones still running then (default 0: none)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    ns = parser.parse_args(argv)
    ns.which = [w.strip() for w in ns.which.split(",") if w.strip()]
    bad = [w for w in ns.which if w not in ORIGINALS]
    if bad or not ns.which:
        parser.error(f"--which: {', '.join(bad) or 'nothing'}; choose from {', '.join(ORIGINALS)}")
    if ns.seeds < 1 or ns.parallel < 1:
        parser.error("--seeds and --parallel must be >= 1")
    if ns.first_seed < 0:
        parser.error("--first_seed must be >= 0")
    if ns.deadline < 0:
        parser.error("--deadline must be >= 0 (0: none)")
    # absolute: the originals run in their own folders
    ns.input_bin, ns.input_val_bin = os.path.abspath(ns.input_bin), os.path.abspath(ns.input_val_bin)
    ns.project = ["--input_bin", ns.input_bin, "--input_val_bin", ns.input_val_bin, *project]
    ns.work = ns.work or (os.path.join(tempfile.gettempdir(), "originals-<new>") if ns.dry_run
                          else tempfile.mkdtemp(prefix="originals-"))
    try:
        jobs = plan(ns)
    except SystemExit as e:
        print(f"error: {e.code}", file=sys.stderr)
        return 2
    mine, skipped = project_records(Path(ns.project_records), ns) if ns.project_records else ({}, [])
    for name, paths in mine.items():
        print(f"project-{name}: {len(paths)} record(s) under {ns.project_records}")
    for line in skipped:
        print(f"  left out: {line}")
    if ns.dry_run:
        for job in jobs:
            print(f"{job.what} (in {job.cwd}): {shlex.join(job.cmd)}")
        if "track3" in ns.which:  # what its copies change (run i: torch.manual_seed(i))
            args = project_settings(ns.preset, ns.project, optimizer_of("track3"))
            for old, new, why in track3_edits(args, ns.first_seed):
                print(f"train_gpt_simple.py: {old!r} -> {new!r} ({why})")
        return 0
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, paths in mine.items():
        (out / f"project-{name}").mkdir(exist_ok=True)
        for path in paths:
            shutil.copy2(path, out / f"project-{name}" / path.name)
    (out / "originals.json").write_text(json.dumps(dict(
        command=shlex.join(["python", "records/originals.py", *given]),
        jobs=[dict(what=j.what, cmd=shlex.join(j.cmd)) for j in jobs]), indent=1) + "\n")
    codes = run_jobs(jobs, ns.parallel, ns.deadline, gpus=local_gpus() or None)
    shutil.rmtree(Path(ns.work) / "checkpoints", ignore_errors=True)  # the project's: ~1.5 GB a run
    print(f"\nthe originals' own logs: {ns.work}")
    print()
    compare.main([str(out), "--by", "optimizer"])
    print()
    for line in within_two_se(out, ns.which):
        print(line)
    failed = [j.what for j, c in zip(jobs, codes) if c not in (0, None)]
    skipped = [j.what for j, c in zip(jobs, codes) if c is None]
    if failed:
        print(f"\n{len(failed)} run(s) failed or were stopped: {', '.join(failed)}")
    if skipped:
        print(f"\n{len(skipped)} run(s) not started: {', '.join(skipped)}")
    return 1 if failed or skipped else 0


if __name__ == "__main__":
    sys.exit(main())
