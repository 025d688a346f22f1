"""Run training commands on one GPU, k at a time, and stop launching before a deadline.

    python records/noise-400/queue.py --parallel 4 --deadline 540 --logs OUT/logs commands.txt

commands.txt: one command per line (blank lines and # comments skipped); a line may end with `# needs N`, the
seconds it takes (default --min_left). Each command's stdout+stderr goes to <logs>/<n>.log. A command still running
at the deadline + grace is stopped with SIGTERM (the trainer saves a checkpoint and its record says `stopped:`). A
command whose needs exceed the time left before the deadline is not started and is listed as skipped (a later, shorter
one may still start), so a time-limited machine leaves complete runs only.
"""
import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time


NEEDS = re.compile(r"\s+#\s*needs\s+(\d+(?:\.\d+)?)\s*$")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("commands")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds from start: launch nothing after this")
    ap.add_argument("--min_left", type=float, default=150.0, help="launch only with at least this many seconds left")
    ap.add_argument("--grace", type=float, default=20.0)
    ap.add_argument("--logs", default="logs")
    a = ap.parse_args()
    cmds = [c.strip() for c in open(a.commands) if c.strip() and not c.lstrip().startswith("#")]
    needs = [float(m[1]) if (m := NEEDS.search(c)) else a.min_left for c in cmds]
    cmds = [NEEDS.sub("", c) for c in cmds]
    os.makedirs(a.logs, exist_ok=True)
    t0, running, done, skipped = time.time(), {}, [], []
    pending = list(enumerate(cmds))
    while pending or running:
        now = time.time() - t0
        while pending and len(running) < a.parallel:
            i, cmd = pending.pop(0)
            if now > a.deadline - needs[i]:
                skipped.append((i, cmd))
                continue
            log = open(os.path.join(a.logs, f"{i:02d}.log"), "w")
            running[i] = (subprocess.Popen(shlex.split(cmd), stdout=log, stderr=subprocess.STDOUT), cmd, now, log)
            print(f"[{now:6.0f}s] start {i:02d}: {cmd}", flush=True)
        for i, (p, cmd, started, log) in list(running.items()):
            if p.poll() is not None:
                log.close()
                done.append((i, p.returncode, time.time() - t0 - started))
                print(f"[{time.time() - t0:6.0f}s] end   {i:02d}: rc {p.returncode} in {time.time() - t0 - started:.0f}s",
                      flush=True)
                del running[i]
            elif time.time() - t0 > a.deadline + a.grace and p.returncode is None:
                p.send_signal(signal.SIGTERM)
        time.sleep(1)
    for i, cmd in skipped:
        print(f"skipped {i:02d}: {cmd}")
    sys.exit(0 if not skipped and all(rc == 0 for _, rc, _ in done) else 1)


if __name__ == "__main__":
    main()
