"""records/originals.py: the originals' command lines from the project's protocol, the conversion of their logs into
logs compare.py groups by optimizer, and one whole run beside the project with stand-ins for the originals."""
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import train_gpt2 as t
from conftest import SMALL_VOCAB, TINY, make_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "records"))
import compare as c  # noqa: E402
import originals as o  # noqa: E402

# a stand-in for an original trainer: its command line (the originals' argparse), its log.txt and stdout formats,
# the checkpoint it saves at the end; BUILDS is the optimizer line its code carries
FAKE = '''import argparse, json, os, sys, time, uuid
class OrthogonalNesterov:
    pass
def make():
    return BUILDS
p = argparse.ArgumentParser()
for name, kind in [("input_bin", str), ("input_val_bin", str), ("model", str), ("batch_size", int),
                   ("accumulation", int), ("sequence_length", int), ("num_iterations", int), ("learning_rate", float),
                   ("warmup_iters", int), ("warmdown_iters", int), ("weight_decay", float), ("val_loss_every", int),
                   ("val_max_steps", int), ("save_every", int)]:
    p.add_argument("--" + name, type=kind)
args = p.parse_args()
json.dump(sys.argv[1:], open("argv.json", "w"))
run = "logs/" + str(uuid.uuid4())
os.makedirs(run)
n, final = args.num_iterations, float(os.environ.get("FAKE_FINAL", "5.0")) + 0.01 * len(os.listdir(".."))
with open(run + "/log.txt", "w") as f:
    for step in range(n + 1):
        if step == n or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            f.write("s:%d tel:%f\\n" % (step, final + (n - step) * 0.1))
        if step == n:
            break
        print(f"step {step + 1:4d}/{n} | train loss {7.5:.4f} | lr_scale {1.0:.2e} | ({12.5:.2f} ms | 1000 tok/s)",
              flush=True)
        f.write("s:%d trl:%f\\n" % (step, 7.5))
        f.flush()
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
open(run + "/state_step%06d.pt" % n, "w").write("weights")
print("peak memory consumption: 123 MiB")
'''


def fake_originals(root: Path) -> Path:
    """An --originals folder whose trainers are FAKE, building Muon (OrthogonalNesterov) and SOAP."""
    (root / "modded-nanogpt").mkdir(parents=True)
    (root / "modded-nanogpt-SOAP").mkdir(parents=True)
    (root / "modded-nanogpt" / "train_gpt2.py").write_text(FAKE.replace(
        "BUILDS", "OrthogonalNesterov(params, lr=10 * learning_rate, momentum=0.95)"))
    (root / "modded-nanogpt-SOAP" / "train_gpt2.py").write_text(FAKE.replace(
        "BUILDS", "SOAP(params, lr=learning_rate, betas=(.95, .95))"))
    (root / "modded-nanogpt-SOAP" / "soap.py").write_text("class SOAP:\n    pass\n")
    return root


def test_compare_preset_maps_onto_the_originals_command_line():
    """--preset compare is the originals' `--batch_size 64 --num_iterations 400 --warmup_iters 15 --warmdown_iters 115
    --learning_rate 0.0018 --val_loss_every 25 --val_max_steps 16`, with their d12 model and 1024-token sequences
    (their default is 64) on one GPU without accumulation: the record's Muon rate 0.018 (b9979e6's is 10 x its
    --learning_rate), not the preset's tuned one (PRESET_TUNED), unless given."""
    assert o.untuned("compare", [], "muon") == ["--muon_lr", "0.018"]
    assert o.untuned("compare", ["--muon_lr=0.02"], "muon") == [] == o.untuned("compare", [], "soap")
    args = o.project_settings("compare", ["--input_bin", "/d/tr_*.bin", "--input_val_bin", "/d/va_*.bin"], "muon")
    want = ["--input_bin", "/d/tr_*.bin", "--input_val_bin", "/d/va_*.bin", "--model", "d12", "--batch_size", "64",
            "--accumulation", "1", "--sequence_length", "1024", "--num_iterations", "400", "--warmup_iters", "15",
            "--warmdown_iters", "115", "--learning_rate", "0.0018", "--weight_decay", "0", "--val_loss_every", "25",
            "--val_max_steps", "16"]
    assert o.original_args(args, o.ORIGINALS["muon"]) == want
    soap = o.project_settings("compare", ["--input_bin", "/d/tr_*.bin", "--input_val_bin", "/d/va_*.bin"], "soap")
    assert o.original_args(soap, o.ORIGINALS["soap"]) == want
    big = o.project_settings("compare", ["--batch_size", "256", "--val_tokens", str(32 * 64 * 1024)], "muon")
    got = dict(zip(o.original_args(big, o.ORIGINALS["muon"])[::2], o.original_args(big, o.ORIGINALS["muon"])[1::2]))
    assert (got["--batch_size"], got["--accumulation"], got["--val_max_steps"]) == ("64", "4", "32")


@pytest.mark.parametrize("optimizer,extra,fragments", [
    ("muon", ["--muon_lr", "0.02"], ["--muon_lr 0.02", "hard-codes 0.018", "set --muon_lr 0.018"]),
    ("muon", ["--muon_momentum", "0.9"], ["--muon_momentum 0.9", "hard-codes 0.95"]),
    ("soap", ["--soap_betas", "0.9,0.95"], ["--soap_betas (0.9, 0.95)", "hard-codes (0.95, 0.95)"]),
    ("soap", ["--embed_lr", "0.003"], ["--embed_lr 0.003", "hard-codes 0.0018"]),
    ("muon", ["--n_layer", "2"], ["--n_layer 2", "the originals build only d12"]),
    ("muon", ["--stop_at", "100"], ["--stop_at", "run the whole schedule"]),
    ("muon", ["--val_tokens", "1000"], ["--val_tokens 1000", "whole batches of 65536"]),
])
def test_what_an_original_cannot_run_as_the_project_is_refused(optimizer, extra, fragments):
    with pytest.raises(SystemExit) as refused:
        o.original_args(o.project_settings("compare", extra, optimizer), o.ORIGINALS[optimizer])
    for fragment in fragments:
        assert fragment in refused.value.code


def test_converted_log_is_read_by_compare_with_its_optimizer(tmp_path):
    """log.txt + stdout -> an upstream-format log: val lines at 0 and N, a train line per step, train_time over the
    steps after the first 10, the peak memory; compare groups it by the optimizer its header names (built, not
    defined) and labels it by its folder."""
    log = "".join(f"s:{s} tel:{6 - s / 10:.6f}\n" if s in (0, 20) else "" for s in range(21))
    log += "".join(f"s:{s} trl:{7 - s / 10:.6f}\n" for s in range(20))
    stdout = "".join(f"step {s:4d}/20 | train loss 7.0 | lr_scale 1.00e+00 | (20.00 ms | 100 tok/s)\n"
                     for s in range(1, 21)) + "peak memory consumption: 77 MiB\n"
    header = ["original: KellerJordan/modded-nanogpt at b9979e6", "builds: AdamW(...), OrthogonalNesterov(...)"]
    path = tmp_path / "original-muon" / "x.txt"
    path.parent.mkdir()
    path.write_text(o.convert_log(log, stdout, header))
    run = c.parse_record(path)
    assert run.format == "upstream" and run.complete and run.optimizer == "upstream-muon"
    assert run.label == "original-muon" and run.peak_mib == 77
    assert run.val == [(0, 6.0, 0.0), (20, 4.0, 200.0)]  # steps 11..20 timed, 20 ms each
    assert len(run.train) == 20 and run.train[-1] == (20, 5.1, 200.0, None) and run.step_avg == 20.0
    soap = o.convert_log(log, stdout, ["builds: AdamW(...), SOAP(...)"])
    (tmp_path / "s.txt").write_text(soap)
    assert c.parse_record(tmp_path / "s.txt").optimizer == "upstream-soap"


@pytest.mark.slow
def test_originals_beside_the_project_in_one_command(tmp_path, monkeypatch, capsys):
    """A stand-in original (muon, 2 runs) and the project's tiny runs (seeds 0 and 1), 2 at once: the original got
    the mapped command line and ran in its own folder, its checkpoint removed, its log converted into original-muon/;
    the project's records are in project-muon/; compare.py reads both groups side by side and the project's mean is
    set against two standard errors of the original's. Again with --project_records: the original runs alone and the
    project's matching records are compared instead."""
    monkeypatch.setitem(o.MODELS, (2, 2, 64, SMALL_VOCAB), "tiny")
    train, val = make_shards(tmp_path / "shards", vocab=SMALL_VOCAB)
    root, out, work = fake_originals(tmp_path / "orig"), tmp_path / "exp", tmp_path / "work"
    code = o.main(["--originals", str(root), "--out", str(out), "--work", str(work), "--input_bin", train,
                   "--input_val_bin", val, "--seeds", "2", "--parallel", "2", "--launcher", sys.executable,
                   "--which", "muon", "--",
                   *TINY, "--vocab_size", str(SMALL_VOCAB), "--matmul_check", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for name in ["muon"]:
        argv = json.loads((work / f"original-{name}-0" / "argv.json").read_text())
        assert argv[argv.index("--model") + 1] == "tiny" and argv[argv.index("--accumulation") + 1] == "2"
        assert argv[argv.index("--val_max_steps") + 1] == "4"  # 256 val tokens in batches of 2 x 32
        assert not list((work / f"original-{name}-0").glob("logs/*/state_step*.pt"))
        converted = sorted((out / f"original-{name}").glob("*.txt"))
        assert len(converted) == 2 and "seed: none" in converted[0].read_text()
        runs = [c.parse_record(p) for p in converted]
        assert all(r.complete and r.optimizer == f"upstream-{name}" and r.label == f"original-{name}" for r in runs)
        records = [c.parse_record(p) for p in sorted((out / f"project-{name}").glob("*.txt"))]
        assert sorted(r.hyperparameters["seed"] for r in records) == [0, 1] and all(r.complete for r in records)
        assert {r.label for r in records} == {f"project-{name}"}
        assert len(list((out / "stdout").glob(f"*-{name}-*.log"))) == 4
    assert not (out / "original-soap").exists()
    assert not (work / "checkpoints").exists()
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["optimizer", "runs"])
    rows = {line.split()[0]: line.split()[1] for line in lines[head + 2: head + 4]}
    assert rows == {"upstream-muon": "2", "muon": "2"}
    assert "muon - upstream-muon:" in printed
    finals = [c.parse_record(p).final_val_loss for p in sorted((out / "original-muon").glob("*.txt"))]
    mine = [c.parse_record(p).final_val_loss for p in sorted((out / "project-muon").glob("*.txt"))]
    se = (sum((x - sum(finals) / 2) ** 2 for x in finals) / 1) ** 0.5 / math.sqrt(2)
    diff = sum(mine) / 2 - sum(finals) / 2
    assert f"muon: project {sum(mine) / 2:.4f} (n=2) - original {sum(finals) / 2:.4f} (n=2) = {diff:+.4f}; 2 " \
           f"standard errors of the original's mean: {2 * se:.4f}: " + ("within" if abs(diff) <= 2 * se else
                                                                       "outside") in printed
    p = c.welch(mine, finals)["p_value"]
    assert f"(Welch p = {p:.3g}: " + ("differ at 95%)" if p < 0.05 else "not told apart at 95%)") in printed
    assert json.loads((out / "originals.json").read_text())["command"].startswith("python records/originals.py")

    # again with the project's records of the first: only the original runs; the two records are copied, a record of
    # another schedule is left out with the setting that differs
    other = tmp_path / "mine"
    shutil.copytree(out / "project-muon", other)
    text = next(other.iterdir()).read_text()
    assert text.count('"warmdown_iters": 2,') == 1  # TINY's
    (other / "long.txt").write_text(text.replace('"warmdown_iters": 2,', '"warmdown_iters": 3,'))
    out2 = tmp_path / "exp2"
    code = o.main(["--originals", str(root), "--out", str(out2), "--work", str(tmp_path / "work2"), "--input_bin",
                   train, "--input_val_bin", val, "--seeds", "2", "--launcher", sys.executable, "--which", "muon",
                   "--project_records", str(other), "--", *TINY, "--vocab_size", str(SMALL_VOCAB), "--matmul_check",
                   "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "project-muon: 2 record(s) under" in printed and "long.txt: warmdown_iters: 3 != 2" in printed
    assert "project-muon seed" not in printed and len(list((out2 / "stdout").glob("*.log"))) == 2
    assert sorted(p.name for p in (out2 / "project-muon").iterdir()) == sorted(
        p.name for p in (out / "project-muon").iterdir())
    assert "muon: project " in printed and "(n=2) - original " in printed


def job(tmp_path: Path, name: str, code: str, **kw) -> o.Job:
    """A Job running `code` in Python; its stdout in tmp_path/<name>.log."""
    return o.Job(name, [sys.executable, "-c", code], tmp_path, tmp_path / f"{name}.log", kind=name.rstrip("0123456789"),
                 **kw)


STEPS = ("import time\nprint('start', time.time(), flush=True)\ntime.sleep({pause})\n"
         "print('step    1/5 | train loss 7.0', time.time(), flush=True)\ntime.sleep({after})")


def test_later_runs_of_an_original_wait_for_its_first_to_compile(tmp_path):
    """With 3 slots, run b (first=a) starts only once a has printed its first step; c (no first) starts at once."""
    a = job(tmp_path, "a", STEPS.format(pause=1.5, after=0.5))
    b = job(tmp_path, "b", STEPS.format(pause=0, after=0), first=a)
    c = job(tmp_path, "c", STEPS.format(pause=0, after=0))
    assert o.run_jobs([a, b, c], parallel=3) == [0, 0, 0]
    times = {j.what: [float(line.split()[-1]) for line in j.stdout.read_text().splitlines()] for j in (a, b, c)}
    assert times["b"][0] >= times["a"][1]  # b started after a's first step
    assert times["c"][0] < times["a"][1]


def test_estimate_of_a_run_that_loads_the_compile_cache(tmp_path):
    """a compiles (120 s of its 300 s), b and c load its cache: before any cache-loading run has finished, c's estimate
    is a's time less a's compile plus b's compile (180 + 70); once b has finished, b's time; a compiling run and
    another kind go by the longest finished run of their kind."""
    a = job(tmp_path, "x0", "")
    b, c = job(tmp_path, "x1", "", first=a), job(tmp_path, "x2", "", first=a)
    d, y = job(tmp_path, "x3", ""), job(tmp_path, "y", "")
    jobs = [a, b, c, d, y]
    assert o.estimate(jobs, 2, {}, {}) == 0.0
    assert o.estimate(jobs, 2, {0: 300.0}, {0: 120.0}) == 300.0  # no cache-loading compile seen yet
    assert o.estimate(jobs, 2, {0: 300.0}, {0: 120.0, 1: 70.0}) == 250.0
    assert o.estimate(jobs, 2, {0: 300.0, 1: 200.0}, {0: 120.0, 1: 70.0}) == 200.0
    assert o.estimate(jobs, 3, {0: 300.0, 1: 200.0}, {0: 120.0, 1: 70.0}) == 300.0
    assert o.estimate(jobs, 4, {0: 300.0}, {0: 120.0}) == 0.0


def test_deadline_starts_a_cache_loading_run_that_fits(tmp_path):
    """deadline 7 s, 2 slots: a compiles 2 s and runs 1.5 s; b and c load its cache (0.3 s) and run 1.5 s (b 3.5 s).
    When a ends (~3.6 s) c is estimated at 3.6 - 2 + 0.3 ~ 1.9 s, so it starts then, before b has ended, and
    finishes; judged by a's 3.6 s it would not have started."""
    a = job(tmp_path, "x0", STEPS.format(pause=2.0, after=1.5))
    b = job(tmp_path, "x1", STEPS.format(pause=0.3, after=3.5) + "\nprint('end', time.time(), flush=True)", first=a)
    c = job(tmp_path, "x2", STEPS.format(pause=0.3, after=1.5), first=a)
    assert o.run_jobs([a, b, c], parallel=2, deadline=7.0, grace=5.0) == [0, 0, 0]
    b_end = float(b.stdout.read_text().splitlines()[-1].split()[-1])
    c_start = float(c.stdout.read_text().splitlines()[0].split()[-1])
    assert c_start < b_end - 0.5


def test_deadline_stops_running_runs_keeps_their_output_and_skips_what_cannot_finish(tmp_path):
    """deadline 3 s: x0 (2 s) ends; x1 of the same kind would need 2 s more than is left after x0 and a slow y, so it is
    never started (code None); y (60 s) is stopped at the deadline with SIGTERM, its process group with it, and its
    after() still runs."""
    seen = []
    x0 = job(tmp_path, "x0", "import time; time.sleep(2)")
    y = job(tmp_path, "y", "import subprocess, sys, time\nprint('up', flush=True)\n"
                           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\ntime.sleep(60)",
            after=lambda j: seen.append(j.what))
    x1 = job(tmp_path, "x1", "import time; time.sleep(2)")
    start = time.time()
    codes = o.run_jobs([x0, y, x1], parallel=2, deadline=3.0, grace=5.0)
    assert time.time() - start < 10
    assert codes[0] == 0 and codes[1] not in (0, None) and codes[2] is None
    assert seen == ["y"] and "up" in y.stdout.read_text()


def test_a_stopped_original_is_converted_as_incomplete(tmp_path, monkeypatch, capsys):
    """A slow stand-in original under --deadline: stopped, its partial log converted; compare.py lists it as
    incomplete with the step it reached; the script exits 1 and names the stopped run."""
    monkeypatch.setitem(o.MODELS, (2, 2, 64, SMALL_VOCAB), "tiny")
    monkeypatch.setenv("FAKE_SLEEP", "1")
    train, val = make_shards(tmp_path / "shards", vocab=SMALL_VOCAB)
    root, out = fake_originals(tmp_path / "orig"), tmp_path / "exp"
    (tmp_path / "none").mkdir()
    code = o.main(["--originals", str(root), "--out", str(out), "--work", str(tmp_path / "work"), "--input_bin",
                   train, "--input_val_bin", val, "--seeds", "2", "--launcher", sys.executable, "--which", "muon",
                   "--project_records", str(tmp_path / "none"), "--deadline", "3", "--",
                   *TINY, "--vocab_size", str(SMALL_VOCAB), "--num_iterations", "50", "--matmul_check", "0"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    converted = sorted((out / "original-muon").glob("*.txt"))
    assert len(converted) == 1
    run = c.parse_record(converted[0])
    assert not run.complete and run.optimizer == "upstream-muon" and 1 <= max(s for s, *_ in run.train) < 50
    assert "deadline: stopping original-muon run 0" in printed and "failed or were stopped: original-muon run 0" \
        in printed and "not started: original-muon run 1" in printed
    assert "incomplete" in printed


def test_sigterm_stops_the_runs_and_keeps_their_output(tmp_path):
    """SIGTERM to the script 1 s in: the running job is stopped at once (its after() runs), the queued one never
    starts, and the signal handlers are restored."""
    seen = []
    y = job(tmp_path, "y", "import time\nprint('up', flush=True)\ntime.sleep(60)", after=lambda j: seen.append(j.what))
    z = job(tmp_path, "z", "pass")
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    start = time.time()
    timer.start()
    codes = o.run_jobs([y, z], parallel=1, grace=5.0)
    assert time.time() - start < 10
    assert codes[0] not in (0, None) and codes[1] is None and seen == ["y"]
    assert signal.getsignal(signal.SIGTERM) is before


OOM_ONCE = ("import os, sys, time\nprint('start', time.time(), flush=True)\n"
            "if not os.path.exists({marker!r}):\n    open({marker!r}, 'w').close()\n"
            "    print('[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 6.14 GiB. '\n"
            "          'GPU 0 has a '\n"
            "          'total capacity of 139.80 GiB', flush=True)\n"
            "    print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ', flush=True)\n"
            "    sys.exit(1)\n"
            "time.sleep(0.3)\nprint('end', time.time(), flush=True)")
TIMED = "import time\nprint('start', time.time(), flush=True)\ntime.sleep({t})\nprint('end', time.time(), flush=True)"


def test_a_run_out_of_gpu_memory_beside_others_runs_again_with_fewer_at_once(tmp_path, capsys):
    """2 slots: b runs out of GPU memory beside a; it is started again after a ends (its first output kept as
    b.oom.log), and from then on one run at a time, so c starts after b's second run ends; all end 0."""
    a = job(tmp_path, "a", TIMED.format(t=1.5))
    b = job(tmp_path, "b", OOM_ONCE.format(marker=str(tmp_path / "b.once")))
    c = job(tmp_path, "c", TIMED.format(t=0.1))
    assert o.run_jobs([a, b, c], parallel=2) == [0, 0, 0]
    t = {j.what: [float(line.split()[-1]) for line in j.stdout.read_text().splitlines()] for j in (a, b, c)}
    assert t["b"][0] >= t["a"][1] and t["c"][0] >= t["b"][1]
    assert "OutOfMemoryError" in (tmp_path / "b.oom.log").read_text()
    printed = capsys.readouterr().out
    assert "b: out of GPU memory beside 1 other run(s)" in printed and "--parallel lowered to 1" in printed


def test_a_run_out_of_gpu_memory_alone_fails_and_says_why(tmp_path, capsys):
    """Out of memory with nothing beside it: no second try; the exit line names the run's own error (not
    torchrun's ChildFailedError) and its output file."""
    b = job(tmp_path, "b", OOM_ONCE.format(marker=str(tmp_path / "b.once")))
    assert o.run_jobs([b], parallel=2) == [1]
    printed = capsys.readouterr().out
    assert f"done b: exit 1 (torch.OutOfMemoryError: CUDA out of memory; see {b.stdout})" in printed
    assert not (tmp_path / "b.oom.log").exists()


def test_collect_converts_the_newest_log_of_a_run_started_again(tmp_path):
    """A run started again leaves its first attempt's logs/<id>/ beside the second's; ids are random, so the newest
    log (by time), not the last by name, is the run's."""
    root = fake_originals(tmp_path / "orig")
    run = o.Job("original-muon run 0", ["x"], tmp_path / "work", tmp_path / "run.log")
    attempts = [("ffff", "s:0 tel:11.0\n", 1_000_000), ("0000", "s:0 tel:10.5\ns:0 trl:10.4\n", 2_000_000)]
    for name, text, when in attempts:
        (run.cwd / "logs" / name).mkdir(parents=True)
        (run.cwd / "logs" / name / "log.txt").write_text(text)
        os.utime(run.cwd / "logs" / name / "log.txt", (when, when))
    path = o.collect(run, o.ORIGINALS["muon"], root, tmp_path / "out", 0)
    assert "val_loss:10.5000" in path.read_text() and "11.0000" not in path.read_text()


def test_first_seed_numbers_the_runs_of_a_later_call(tmp_path, capsys):
    """--first_seed 3 --seeds 2: the originals' runs 3 and 4 (their folders and outputs), the project's --seed 3 and 4,
    and run 4 waits for run 3's compile, as run 1 for run 0."""
    root = fake_originals(tmp_path / "orig")
    ns = o.argparse.Namespace(originals=str(root), out=str(tmp_path / "exp"), work=str(tmp_path / "work"),
                              which=["muon"], preset="compare", project=[], launcher=sys.executable, seeds=2,
                              first_seed=3, project_records=None)
    jobs = o.plan(ns)
    assert [j.what for j in jobs] == ["original-muon run 3", "original-muon run 4", "project-muon seed 3",
                                      "project-muon seed 4"]
    assert [j.cwd.name for j in jobs[:2]] == ["original-muon-3", "original-muon-4"]
    assert [j.stdout.name for j in jobs] == ["original-muon-3.log", "original-muon-4.log", "project-muon-3.log",
                                             "project-muon-4.log"]
    assert jobs[0].first is None and jobs[1].first is jobs[0]
    assert [j.cmd[j.cmd.index("--seed") + 1] for j in jobs[2:]] == ["3", "4"]
    with pytest.raises(SystemExit):
        o.main(["--originals", str(root), "--out", "x", "--input_bin", "a", "--input_val_bin", "b",
                "--first_seed", "-1"])
    assert "--first_seed must be >= 0" in capsys.readouterr().err


def test_deadline_lets_a_run_past_its_last_step_finish_its_final_val(tmp_path, capsys):
    """deadline 1 s, grace 5 s: z has printed its last step (5/5) and needs 2 s more for its final val: it is left to
    end (exit 0, val printed); y, at step 1 of 5, is stopped at the deadline."""
    z = job(tmp_path, "z", "import time\nprint('step    5/5 | train loss 7.0', flush=True)\ntime.sleep(2)\n"
                           "print('val loss 4.9', flush=True)")
    y = job(tmp_path, "y", "import time\nprint('step:1/5 train_loss:7.0', flush=True)\ntime.sleep(60)")
    start = time.time()
    codes = o.run_jobs([z, y], parallel=2, deadline=1.0, grace=5.0)
    assert time.time() - start < 8
    assert codes[0] == 0 and "val loss 4.9" in z.stdout.read_text() and codes[1] not in (0, None)
    printed = capsys.readouterr().out
    assert "deadline: z is past its last step, left 5 s to finish" in printed and "deadline: stopping y" in printed
    assert o.finishing(z) and not o.finishing(y)


# ------------------------------------------------------------- the optimization track (track3)

TRACK3_COMPARE = [
    "--batch_size",
    "64",
    "--num_iterations",
    "400",
    "--warmdown_iters",
    "280",
    "--val_tokens",
    "4194304",
]


def track3_settings(*extra: str) -> t.Hyperparameters:
    return o.project_settings(
        "track3",
        ["--input_bin", "/d/tr_*.bin", "--input_val_bin", "/d/va_*.bin", *TRACK3_COMPARE, *extra],
        "muon",
    )


def fake_track3(root: Path) -> Path:
    """An --originals folder whose train_gpt_simple.py holds each literal track3_edits replaces,
    once."""
    (root / "modded-nanogpt-track3").mkdir(parents=True)
    L = o.TRACK3_LITERALS
    text = "\n".join(
        [
            L["glob"],
            f'a = "{L["val"]}"',
            f'b = "{L["train"]}"',
            L["steps"],
            L["batch"],
            L["val_tokens"],
            L["model"],
            "optimizer2 = Muon(params, lr=0.025, weight_decay=0.05)",
            "",
        ]
    )
    (root / "modded-nanogpt-track3" / "train_gpt_simple.py").write_text(text)
    return root


def test_track3_compare_shape_maps_onto_its_edits():
    """The compare shape (one 64 x 1024 micro-batch a step, 400 steps, cooldown 280 = 0.7 x 400,
    4,194,304 val tokens) is train_gpt_simple.py with those literals, the shard patterns, an
    absolute glob and a seed; it has no command line."""
    args = track3_settings()
    assert o.original_args(args, o.ORIGINALS["track3"]) == []
    edits = {old: new for old, new, _ in o.track3_edits(args, 2)}
    assert edits == {
        "data/fineweb10B/fineweb_train_*.bin": "/d/tr_*.bin",
        "data/fineweb10B/fineweb_val_*.bin": "/d/va_*.bin",
        "files = sorted(Path.cwd().glob(filename_pattern))":
            "files = sorted(Path('/').glob(filename_pattern.lstrip('/')))",
        "train_steps = 3250": "train_steps = 400",
        "batch_size = 8 * 64 * 1024": "batch_size = 65536",
        "val_tokens = 20 * 524288": "val_tokens = 4194304",
        o.TRACK3_LITERALS["model"]: "torch.manual_seed(2)\n" + o.TRACK3_LITERALS["model"],
    }
    full = o.project_settings(
        "track3", ["--input_bin", "/d/tr_*.bin", "--input_val_bin", "/d/va_*.bin"], "muon"
    )
    edits = {
        old: new for old, new, _ in o.track3_edits(full, 0)
    }  # the track's own run: its literals' values
    assert (
        edits["train_steps = 3250"],
        edits["batch_size = 8 * 64 * 1024"],
        edits["val_tokens = 20 * 524288"],
    ) == ("train_steps = 3250", "batch_size = 524288", "val_tokens = 10485760")


@pytest.mark.parametrize(
    "extra,fragments",
    [
        (["--warmdown_iters", "279"], ["--warmdown_iters 279", "0.7 of the run", "280 steps"]),
        (["--num_iterations", "401", "--warmdown_iters", "281"], ["0.7 of the run", "280.7 steps"]),
        (["--muon_lr", "0.02"], ["--muon_lr 0.02", "hard-codes 0.025", "set --muon_lr 0.025"]),
        (["--muon_lerp", "0"], ["--muon_lerp False", "hard-codes True"]),
        (["--val_tail_every", "0"], ["--val_tail_every 0", "hard-codes 25"]),
        (["--n_layer", "2"], ["--n_layer 2", "hard-codes 12"]),
        (["--stop_at", "100"], ["--stop_at", "run the whole schedule"]),
        (
            ["--batch_size", "32", "--device_batch_size", "32"],
            ["--batch_size", "micro-batches of 64 x 1024"],
        ),
        (["--val_tokens", "1048000"], ["--val_tokens", "micro-batches of 64 x 1024"]),
    ],
)
def test_what_track3_cannot_run_as_the_project_is_refused(extra, fragments):
    with pytest.raises(SystemExit) as refused:
        o.original_args(track3_settings(*extra), o.ORIGINALS["track3"])
    for fragment in fragments:
        assert fragment in refused.value.code


def test_track3_beside_the_project_dry_run(tmp_path, capsys):
    """--which track3 --preset track3 --dry_run: per seed the original's copy (in its run folder,
    not written) under torchrun without arguments, and the project's --preset track3 --optimizer
    muon runs; the edits are listed."""
    root = fake_track3(tmp_path / "orig")
    work = tmp_path / "work"
    code = o.main(
        [
            "--originals",
            str(root),
            "--out",
            str(tmp_path / "exp"),
            "--work",
            str(work),
            "--input_bin",
            "/d/tr_*.bin",
            "--input_val_bin",
            "/d/va_*.bin",
            "--which",
            "track3",
            "--preset",
            "track3",
            "--seeds",
            "2",
            "--dry_run",
            "--",
            *TRACK3_COMPARE,
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = printed.splitlines()
    assert lines[0] == (
        f"original-track3 run 0 (in {work}/original-track3-0): torchrun --standalone "
        f"--nproc_per_node=1 {work}/original-track3-0/train_gpt_simple.py"
    )
    assert lines[2].startswith(f"project-track3 seed 0 (in {o.REPO}): ") and lines[2].endswith(
        "--preset track3 --input_bin '/d/tr_*.bin' --input_val_bin '/d/va_*.bin' --batch_size 64 "
        "--num_iterations 400 --warmdown_iters 280 --val_tokens 4194304 --optimizer muon --seed 0 "
        f"--label project-track3 --records_dir {(tmp_path / 'exp' / 'project-track3').resolve()} "
        f"--checkpoint_dir {(work / 'checkpoints').resolve()}"
    )
    assert (
        "train_gpt_simple.py: 'train_steps = 3250' -> 'train_steps = 400' (the run's steps"
        in printed
    )
    assert not work.exists() and not (tmp_path / "exp").exists()
    assert (
        o.main(
            [
                "--originals",
                str(root),
                "--out",
                str(tmp_path / "exp"),
                "--input_bin",
                "/d/tr_*.bin",
                "--input_val_bin",
                "/d/va_*.bin",
                "--which",
                "track3",
                "--dry_run",
            ]
        )
        == 2
    )  # preset compare
    assert (
        "--model gpt2: KellerJordan/modded-nanogpt at f411b3d hard-codes track3"
        in capsys.readouterr().err
    )


def test_track3_copy_and_its_collected_log(tmp_path):
    """The copy a run gets is the original with the edits made (each found once; a file without one
    is refused); the run's logs/<id>.txt is copied into original-track3/ below the header naming the
    original and the seed."""
    root = fake_track3(tmp_path / "orig")
    script = root / "modded-nanogpt-track3" / "train_gpt_simple.py"
    copy = o.track3_copy(script, tmp_path / "run-1", track3_settings(), 1, dry_run=False)
    text = copy.read_text()
    assert (
        "train_steps = 400" in text
        and "torch.manual_seed(1)\nmodel = GPT(" in text
        and "/d/va_*.bin" in text
    )
    script.write_text(script.read_text().replace("train_steps = 3250", "train_steps = 3000"))
    with pytest.raises(SystemExit, match="'train_steps = 3250' occurs 0 times, expected once"):
        o.track3_copy(script, tmp_path / "run-2", track3_settings(), 2, dry_run=True)
    (tmp_path / "run-1" / "logs").mkdir()
    (tmp_path / "run-1" / "logs" / "u.txt").write_text(
        "code\n" + "=" * 100 + "\nstep:0/400 val_loss:10.8 " "train_time:0.000s step_avg:nanms\n"
    )
    job = o.Job(
        "original-track3 run 1", ["torchrun", str(copy)], tmp_path / "run-1", tmp_path / "1.log"
    )
    path = o.collect_track3(job, o.ORIGINALS["track3"], root, tmp_path / "exp", 1)
    lines = path.read_text().splitlines()
    assert path.parent.name == "original-track3" and lines[0] == (
        "original: KellerJordan/modded-nanogpt at " "f411b3d346aa52d3504324ca93c230fd84c6c07f"
    )
    assert "seed: 1 (torch.manual_seed(1) in its copy)" in lines and lines[-1].startswith(
        "step:0/400 val_loss:10.8"
    )
    # its console's per-step lines (not in its log) follow, so compare.py --step_time reads its step time
    (tmp_path / "1.log").write_text("logs/u.txt\n" + "".join(
        f"step:{s}/400 train_time:{60 + 1.25 * s:.3f}s step_avg:1.0ms\n" for s in range(1, 41)) + "noise\n")
    path = o.collect_track3(job, o.ORIGINALS["track3"], root, tmp_path / "exp", 1)
    lines = path.read_text().splitlines()
    assert lines[-1] == "step:40/400 train_time:110.000s step_avg:1.0ms" and "noise" not in lines
    run = c.parse_record(path)
    assert run.format == "upstream" and not run.complete and run.val == [(0, 10.8, 0.0)]
    assert run.ms_per_step(20, 40) == pytest.approx(1250.0) and run.ms_per_step(20, 41) is None


TRACK3_ORIGINAL = (
    Path(__file__).resolve().parents[1] / ".originals" / o.ORIGINALS["track3"].files[0]
)


@pytest.mark.skipif(
    not TRACK3_ORIGINAL.is_file(),
    reason=f"no copy of train_gpt_simple.py at {TRACK3_ORIGINAL} "
    "(KellerJordan/modded-nanogpt at f411b3d)",
)
def test_track3_edits_apply_to_the_original():
    """On train_gpt_simple.py itself (its sha256 that of f411b3d) every edit applies once, the copy
    compiles and differs from it in those lines only."""
    import difflib

    assert o.sha256(TRACK3_ORIGINAL) == o.ORIGINALS["track3"].sha256
    before = TRACK3_ORIGINAL.read_text()
    after = o.track3_source(before, o.track3_edits(track3_settings(), 0))
    compile(after, "train_gpt_simple.py", "exec")
    changed = [
        line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"
    ]
    assert len([line for line in changed if line[0] == "-"]) == 6 and len(changed) == 6 + 7
