"""The one queue of the runners under records/ (sweep.py, originals.py): training commands over the local GPUs.

    codes = run_jobs(jobs, parallel=3, deadline=540, gpus=local_gpus())

Each Job is one command with its folder and output file. run_jobs starts them in order, each in its own process
group, at most `parallel` at a time on each GPU and, when a job says how much GPU memory it needs (mem_mib), only
on a GPU whose free memory (its capacity less what the jobs running there need) holds it; each job sees its GPU as
CUDA_VISIBLE_DEVICES. A deadline keeps runs from starting that would not finish by it and stops the ones still
running then; a run that runs out of GPU memory beside others is started again with fewer at once; one line per
finished run says how many are done and left and when the rest should end. `more()` may add jobs as runs end (a
sweep's seeds at the best setting once the grid is done).
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    """One run: its command, working folder and stdout file; after(): what to do with its output (also when it was
    stopped), its return value printed on the run's progress line when it is a string. kind: runs of one kind take
    about as long (the deadline's estimate and the ETA); first: a run this one waits for until that one has finished
    its first step (it compiled; this one loads the compile cache) or ended. mem_mib: the GPU memory it needs (0:
    not known, only `parallel` limits it). expected_s: the seconds it should take before a run of its kind has
    finished (the deadline's estimate)."""
    what: str
    cmd: list[str]
    cwd: Path
    stdout: Path
    after: object = None
    env: dict | None = None
    kind: str = ""
    first: Job | None = None
    mem_mib: float = 0.0
    expected_s: float = 0.0


@dataclass
class GPU:
    """One local GPU: its CUDA index and memory in MiB."""
    index: int
    capacity_mib: float
    running: list = field(default_factory=list)  # the jobs on it now

    def free_mib(self) -> float:
        return self.capacity_mib - sum(j.mem_mib for j in self.running)


def local_gpus(visible: str | None = None) -> list[GPU]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES, as torch sees them), with their total memory; [] without
    CUDA. Each job is then given one of them as its CUDA_VISIBLE_DEVICES."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    names = (visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "")).split(",")
    gpus = []
    for i in range(torch.cuda.device_count()):
        index = int(names[i]) if i < len(names) and names[i].strip().isdigit() else i
        gpus.append(GPU(index, torch.cuda.get_device_properties(i).total_memory / 2**20))
    return gpus


def output(job: Job) -> str:
    """What the run has printed so far ("" before it starts)."""
    return job.stdout.read_text(errors="replace") if job.stdout.exists() else ""


_STEP = re.compile(r"^step[:\s]+(\d+)/(\d+)\b", re.M)  # the originals' `step    k/N |`, the project's `step:k/N`


def estimate(jobs: list[Job], i: int, finished: dict[int, float], compiles: dict[int, float]) -> float:
    """Seconds job i should take, from the seconds of the finished runs (by index) and the seconds to their first
    step of the runs seen so far (compiles): the longest finished run of its kind; for a run that loads the compile
    cache (first set), the longest such run, or before one has finished, the longest run of its kind less its compile
    plus the longest compile of a cache-loading run (b9979e6: 67-75 s against 121-154 s compiling afresh); before
    any run of its kind has finished, its expected_s."""
    kind = [k for k in finished if jobs[k].kind == jobs[i].kind]
    longest = max((finished[k] for k in kind), default=jobs[i].expected_s)
    if jobs[i].first is None:
        return longest
    if warm := [finished[k] for k in kind if jobs[k].first is not None]:
        return max(warm)
    cold = [finished[k] - compiles[k] for k in kind if k in compiles]
    warm_compiles = [c for k, c in compiles.items() if jobs[k].kind == jobs[i].kind and jobs[k].first is not None]
    return max(cold) + max(warm_compiles) if cold and warm_compiles else longest


def eta(left: list[Job], finished: dict[int, float], jobs: list[Job], at_once: int) -> float | None:
    """Seconds until the runs `left` (queued and running) should have ended, `at_once` at a time: each run takes the
    mean of the finished runs of its kind (of all finished runs where its kind has none); None before any has
    finished."""
    if not finished or not left:
        return None if not finished else 0.0
    mean_all = sum(finished.values()) / len(finished)
    by_kind: dict[str, list[float]] = {}
    for k, s in finished.items():
        by_kind.setdefault(jobs[k].kind, []).append(s)
    total = sum((sum(by_kind[j.kind]) / len(by_kind[j.kind])) if j.kind in by_kind else mean_all for j in left)
    return total / max(1, at_once)


def _minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


_ERROR = re.compile(r"^(?:\[rank\d+\]: )?(\S*(?:Error|Exception)\b:.*)$", re.M)
_OOM = re.compile(r"OutOfMemoryError|CUDA out of memory")
_LAUNCHER_ERRORS = ("ChildFailedError", "SignalException")  # torchrun's own, after the run's error


def cause(job: Job) -> str:
    """The run's own error, as its output says it (the last `...Error: message` or `...Exception: message` line, not
    torchrun's), cut to its first sentence; "" when it says none."""
    errors = [m[1] for m in _ERROR.finditer(output(job)) if not any(e in m[1] for e in _LAUNCHER_ERRORS)]
    if not errors:
        return ""
    first = errors[-1].split(". ")[0]
    return first if len(first) <= 160 else first[:157] + "..."


def compiled(job: Job) -> bool:
    """Whether the run has printed its first training step (so its compile caches are written)."""
    return any(int(k) >= 1 for k, _ in _STEP.findall(output(job)))


def finishing(job: Job) -> bool:
    """Whether the run has printed its last training step (step N/N): what is left is its final val and save."""
    steps = _STEP.findall(output(job))
    return bool(steps) and steps[-1][0] == steps[-1][1]


class Stop(Exception):
    """SIGTERM or SIGINT to this script: stop the runs, keep what they wrote."""


def run_jobs(jobs: list[Job], parallel: int, deadline: float = 0.0, grace: float = 30.0,
             gpus: list[GPU] | None = None, more=None) -> list[int | None]:
    """Run the jobs in order, each in its own process group, stdout and stderr into its file, after() of each as it
    ends. Without gpus, `parallel` at a time; with gpus, `parallel` at a time on each GPU, a job with mem_mib only on a
    GPU with that much free (the GPU with the most free memory first; one job alone on a GPU always fits), each
    started with CUDA_VISIBLE_DEVICES set to its GPU. A job whose `first` is still compiling waits (later jobs may
    start meanwhile).
    deadline > 0 (seconds from now): a job is not started when less time is left than it should take (estimate: from
    the finished runs of its kind and the compile times seen), and at the deadline the running ones get SIGTERM
    (SIGKILL `grace` seconds later), except one past its last training step, which has until the SIGKILL to end
    (its final val loss takes seconds); SIGTERM/SIGINT to this script stops all at once. A stopped run's after()
    still runs. A run that fails out of GPU memory while others run beside it is started again once (its first
    output kept as <stdout>.oom.log) and `parallel` drops to the number it ran beside; a failed run's own error line
    is printed. Each ended run prints `[done/all] done WHAT: exit C in T s; ...; N left, about M more` (the ETA from
    the finished runs of each kind). more(): called after each run ends, returns jobs to append (or nothing).
    Returns the exit codes (of the jobs given and those more() added, in order), None for a job never started."""
    jobs = list(jobs)
    codes, running, queue = [None] * len(jobs), [], list(enumerate(jobs))
    finished, compiles, t0, stopping, signalled, retried = {}, {}, time.time(), None, False, set()
    slots = gpus or [None]

    def chained(job: Job) -> bool:
        return job.first is not None or any(j.first is job for j in jobs)

    def place(job: Job):
        """The GPU (or None without gpus) this job may start on now; False when none has room."""
        if gpus is None:
            return None if len(running) < parallel else False
        fits = [g for g in gpus if len(g.running) < parallel and (not g.running or job.mem_mib <= g.free_mib())]
        return max(fits, key=lambda g: g.free_mib()) if fits else False

    def stop(*_):
        raise Stop

    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            try:
                now = time.time() - t0
                if (signalled or deadline and now >= deadline) and stopping is None:
                    stopping = time.time()
                    for _, job, _, proc, _, _ in running:
                        if not signalled and finishing(job):  # its final val, seconds away: let it end by the kill
                            print(f"deadline: {job.what} is past its last step, left {grace:.0f} s to finish",
                                  flush=True)
                            continue
                        print(f"{'stopped' if signalled else 'deadline'}: stopping {job.what}", flush=True)
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGTERM)
                if stopping is not None and time.time() - stopping > grace:
                    for _, _, _, proc, _, _ in running:
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                for i, job in list(queue) if stopping is None else []:
                    gpu = place(job)
                    if gpu is False:
                        if gpus is None:
                            break
                        continue  # a smaller job later in the queue may fit
                    if job.first is not None and codes[jobs.index(job.first)] is None and not compiled(job.first):
                        continue
                    if deadline and deadline - now < estimate(jobs, i, finished, compiles):
                        continue
                    queue.remove((i, job))
                    job.cwd.mkdir(parents=True, exist_ok=True)
                    job.stdout.parent.mkdir(parents=True, exist_ok=True)
                    f = open(job.stdout, "w")
                    env = job.env
                    if gpu is not None:
                        env = dict(os.environ if env is None else env, CUDA_VISIBLE_DEVICES=str(gpu.index))
                        gpu.running.append(job)
                    where = "" if gpu is None or len(slots) == 1 else f" on GPU {gpu.index}"
                    print(f"start {job.what}{where}: {shlex.join(job.cmd)}", flush=True)
                    proc = subprocess.Popen(job.cmd, cwd=job.cwd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
                    running.append((i, job, f, proc, time.time(), gpu))
                if stopping is not None or (deadline and not running and queue):
                    for i, job in queue:
                        print(f"skipped {job.what}: " + ("stopped" if signalled else
                                                          "would not finish before the deadline"), flush=True)
                    queue.clear()
                for entry in list(running):
                    i, job, f, proc, started, gpu = entry
                    if proc.poll() is not None:
                        f.close()
                        running.remove(entry)
                        beside = [e for e in running if e[5] is gpu]
                        if gpu is not None:
                            gpu.running.remove(job)
                        if proc.returncode and stopping is None and beside and i not in retried and \
                                _OOM.search(output(job)):
                            # out of GPU memory beside other runs: fewer at once from now on, and this one again
                            retried.add(i)
                            parallel = len(beside)
                            kept = job.stdout.with_name(job.stdout.stem + ".oom.log")
                            job.stdout.replace(kept)
                            print(f"done {job.what}: out of GPU memory beside {len(beside)} other run(s) (output: "
                                  f"{kept}); --parallel lowered to {parallel}, the run is started again",
                                  flush=True)
                            queue.insert(0, (i, job))
                            continue
                        codes[i] = proc.returncode
                        seconds = time.time() - started
                        if proc.returncode == 0:
                            finished[i] = seconds
                        what = job.after(job) if job.after is not None else None
                        why = cause(job) if proc.returncode else ""
                        left = [j for _, j in queue] + [e[1] for e in running]
                        ended = sum(c is not None for c in codes)
                        line = (f"[{ended}/{len(jobs)}] done {job.what}: exit {proc.returncode}"
                                + ("" if proc.returncode == 0 else
                                   f" ({why + '; ' if why else ''}see {job.stdout})")
                                + f" in {seconds:.0f} s" + (f"; {what}" if isinstance(what, str) else ""))
                        if left and stopping is None:
                            at_once = max(1, min(len(left), parallel * len(slots)))
                            line += f"; {len(left)} left, about {_minutes(eta(left, finished, jobs, at_once))} more"
                        print(line, flush=True)
                        added = list(more() or []) if more is not None and stopping is None else []
                        for new in added:
                            jobs.append(new)
                            codes.append(None)
                            queue.append((len(jobs) - 1, new))
                    elif i not in compiles and chained(job) and compiled(job):
                        compiles[i] = time.time() - started
                time.sleep(0.2)
            except Stop:
                signalled = True
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return codes
