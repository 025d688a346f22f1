"""records/sweep.py and records/jobs.py: the grid, the plan a sweep's records ask for (skip, grow, seeds at the best),
the queue over GPUs by memory with its progress lines; and one tiny sweep end to end."""
import json
import sys
import time
from pathlib import Path

import pytest

import train_gpt2 as t
from conftest import TINY, make_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "records"))
import compare as c  # noqa: E402
import jobs as j  # noqa: E402
import sweep as s  # noqa: E402


def ns(tmp_path, **kw):
    """sweep.py's settings as its main() leaves them."""
    base = dict(out=str(tmp_path / "exp"), optimizers=["muon", "adamw"], grid=["lr=default*2^-1..1"], seeds=1,
                first_seed=0, best_seeds=0, extend=2, preset="compare", parallel=1, deadline=0, expect=0,
                work=str(tmp_path / "work"), dry_run=False, train=[])
    base.update(kw)
    return s.argparse.Namespace(**base)


def test_grid_values_log_spaced_and_listed():
    """BASE*F^K1..K2 is BASE x F^k (6 significant digits); `default` is the optimizer's default; `lr` maps to each
    optimizer's own setting; an optimizer's own grid replaces the general one of the same setting."""
    grids = s.parse_grids(["lr=default*2^-1..1", "adamw:lr=0.0003*2^-2..0", "warmup_iters=15,50"],
                          ["muon", "newton_muon", "adamw"])
    assert grids["muon"][0].setting == "muon_lr" and grids["muon"][0].values == (0.009, 0.018, 0.036)
    assert grids["newton_muon"][0].setting == "muon_lr"
    assert grids["adamw"][0].values == (0.000075, 0.00015, 0.0003) and grids["adamw"][0].ks == (-2, -1, 0)
    assert grids["muon"][1].setting == "warmup_iters" and grids["muon"][1].values == (15, 50)
    assert grids["muon"][0].extended(1, 2).values == (0.0045, 0.009, 0.018, 0.036, 0.072, 0.144)
    for bad, words in [("lr=0.1*0.5^0..2", "F > 1"), ("nope=1,2", "no such setting"), ("soap:lr=1,2", "not among"),
                       ("lr", "[OPTIMIZER:]SETTING=VALUES"), ("muon_lr=1,1", "distinct"),
                       ("muon_lr=x*2^0..1", "needs numbers")]:
        with pytest.raises(SystemExit, match=s.re.escape(words)):
            s.parse_grids([bad], ["muon", "adamw"])


def test_a_setting_train_gpt2_refuses_stops_the_sweep_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match=r"muon muon_lr=-0.018 seed 0: --muon_lr: must be positive"):
        s.Sweep(ns(tmp_path, optimizers=["muon"], grid=["lr=-0.018,0.018"]))


def fake_record(folder: Path, optimizer: str, lr: float, seed: int, loss: float, diverged: bool = False,
                complete: bool = True, **settings) -> Path:
    """A record in the trainer's format with the compare preset's settings, optimizer, lr and seed, ending at `loss`
    (or diverged at step 100, or stopped at step 200)."""
    args = t.parse_args(["--preset", "compare", "--optimizer", optimizer, f"--{c.LR_SETTING[optimizer]}", str(lr),
                         "--seed", str(seed), *[x for k, v in settings.items() for x in (f"--{k}", str(v))]])
    lines = [t.RECORD_MARK, "source", t.RECORD_MARK, "hyperparameters: " + json.dumps(t.dataclasses.asdict(args)),
             "world_size 1, device_batch 64 x 1024, accumulation 1, 65536 tokens/step"]
    for step in range(0, 401, 100):
        if diverged and step > 100:
            lines.append(f"diverged: step:101/400 last_good_step:100 optimizer:{optimizer}")
            break
        if not complete and step > 200:
            lines.append("stopped: step:200/400 by SIGTERM")
            break
        lines.append(f"step:{step}/400 val_loss:{loss + (400 - step) / 100:.4f} train_time:{step * 100}ms "
                     f"step_avg:100.00ms")
    else:
        lines.append("peak memory consumption: 30000 MiB")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"20261207-000000-compare-{optimizer}-{lr}-{seed}-{len(list(folder.iterdir()))}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plan_skips_recorded_runs_and_runs_a_stopped_one_again(tmp_path):
    """Complete and diverged records count; a stopped one does not; another seed or other shards do not match."""
    sw = s.Sweep(ns(tmp_path, optimizers=["muon"]))
    out = Path(sw.ns.out)
    fake_record(out, "muon", 0.009, 0, 4.7)
    fake_record(out, "muon", 0.036, 0, 4.7, diverged=True)
    fake_record(out, "muon", 0.018, 0, 4.6, complete=False)
    fake_record(out, "muon", 0.018, 1, 4.6)
    todo, notes = sw.plan()
    assert [p.text() for p in todo] == ["muon muon_lr=0.018 seed 0"]
    assert notes == ["muon: 2 of 3 grid runs have records"]
    fake_record(out, "muon", 0.018, 0, 4.6, input_bin="other/x_train_*.bin")
    assert [p.text() for p in sw.plan()[0]] == ["muon muon_lr=0.018 seed 0"]


def test_a_grid_whose_best_is_at_its_edge_grows_then_seeds_run_at_the_best(tmp_path):
    """Best at the high edge: one more value past it; once the best is inside, --best_seeds 3 adds seeds 1 and 2
    there; --extend bounds the growth."""
    sw = s.Sweep(ns(tmp_path, optimizers=["muon"], best_seeds=3))
    out = Path(sw.ns.out)
    for lr, loss in [(0.009, 4.9), (0.018, 4.8), (0.036, 4.7)]:
        fake_record(out, "muon", lr, 0, loss)
    todo, notes = sw.plan()
    assert [p.text() for p in todo] == ["muon muon_lr=0.072 seed 0"]
    assert "at the grid's edge: adding muon_lr=0.072" in notes[0]
    fake_record(out, "muon", 0.072, 0, 4.75)
    todo, notes = sw.plan()
    assert [p.text() for p in todo] == ["muon muon_lr=0.036 seed 1", "muon muon_lr=0.036 seed 2"]
    assert notes[-1].startswith("muon: best muon_lr=0.036 (0.009: 4.9000, 0.018: 4.8000, 0.036: 4.7000, 0.072: 4.7500")
    fake_record(out, "muon", 0.036, 1, 4.72)
    assert [p.text() for p in sw.plan()[0]] == ["muon muon_lr=0.036 seed 2"]
    # the seeds' mean decides the best: seed 1 of 0.036 and seeds of 0.072 move the best to 0.072 (the edge again)
    for seed, loss in [(1, 4.6), (2, 4.6)]:
        fake_record(out, "muon", 0.072, seed, loss)
    todo, notes = sw.plan()
    assert [p.text() for p in todo] == ["muon muon_lr=0.144 seed 0"]
    fake_record(out, "muon", 0.144, 0, 4.5)
    todo, notes = sw.plan()
    assert todo == [] and "after --extend 2: widen the grid" in notes[-1]


def test_a_record_that_predates_a_setting_matches_when_the_setting_is_at_its_default():
    want = t.dataclasses.asdict(t.parse_args(["--preset", "compare", "--seed", "2"]))
    have = {k: v for k, v in want.items() if k != "gram_beta"}
    assert s.matches(have, want)
    assert not s.matches(have, dict(want, gram_beta=0.5))
    assert not s.matches(dict(have, seed=1), want)
    assert s.matches(dict(have, label="x", records_dir="elsewhere", input_bin="/a/" + want["input_bin"]), want)


def test_memory_need_from_the_records_else_the_table(tmp_path):
    sw = s.Sweep(ns(tmp_path, optimizers=["muon", "adamw"]))
    fake_record(Path(sw.ns.out), "muon", 0.018, 0, 4.6)  # peak 30000 MiB
    assert sw.mem_mib("muon") == 30000 * s.MEM_FACTOR + s.MEM_SLACK_MIB
    assert sw.mem_mib("adamw") == s.MEM_MIB["adamw"] * s.MEM_FACTOR + s.MEM_SLACK_MIB
    # the table's needs: 3 Muon runs fit an 80 GB H100 (81559 MiB), 2 SOAP runs and a Muon run do not
    need = {k: v * s.MEM_FACTOR + s.MEM_SLACK_MIB for k, v in s.MEM_MIB.items()}
    assert 3 * need["muon"] <= 81559 < 2 * need["soap"] + need["muon"]


TIMED = "import time, os\nprint('start', time.time(), os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True)\n" \
        "time.sleep({t})\nprint('end', time.time(), flush=True)"


def job(tmp_path, what, code, **kw):
    return j.Job(what, [sys.executable, "-c", code], tmp_path, tmp_path / f"{what}.log", **kw)


def test_jobs_go_to_gpus_by_memory_and_see_only_their_gpu(tmp_path):
    """Two GPUs of 80 GiB: a (50) and b (50) go one to each GPU at once; c (40) waits for room although each GPU
    holds one job (parallel 2); d (10) fits beside a job at once, on the GPU with more free memory."""
    gpus = [j.GPU(3, 80.0), j.GPU(5, 80.0)]
    a, b = job(tmp_path, "a", TIMED.format(t=1.0), mem_mib=50), job(tmp_path, "b", TIMED.format(t=2.0), mem_mib=50)
    cc, d = job(tmp_path, "c", TIMED.format(t=0.1), mem_mib=40), job(tmp_path, "d", TIMED.format(t=0.1), mem_mib=10)
    assert j.run_jobs([a, b, cc, d], parallel=2, gpus=gpus) == [0, 0, 0, 0]
    seen = {x.what: x.stdout.read_text().split() for x in (a, b, cc, d)}
    assert {seen["a"][2], seen["b"][2]} == {"3", "5"}
    assert float(seen["d"][1]) < float(seen["a"][4])  # d started while a ran
    assert float(seen["c"][1]) >= float(seen["a"][4])  # c waited for a to end
    assert seen["c"][2] == seen["a"][2]


def test_progress_lines_count_runs_and_give_an_eta(tmp_path, capsys):
    """One line per ended run: [done/all], exit, seconds, what after() says, runs left and the ETA from the
    finished runs of the same kind; more() adds jobs as runs end."""
    a = job(tmp_path, "a", TIMED.format(t=0.3), kind="x", after=lambda job: "val 4.5 at step 400")
    b = job(tmp_path, "b", TIMED.format(t=0.3), kind="x")
    added = []

    def more():
        if not added:
            added.append(job(tmp_path, "e", TIMED.format(t=0.1), kind="y"))
            return added
        return []

    assert j.run_jobs([a, b], parallel=1, more=more) == [0, 0, 0]
    out = capsys.readouterr().out
    assert s.re.search(r"^\[1/2\] done a: exit 0 in \d s; val 4.5 at step 400; 1 left, about \d s more$", out, s.re.M)
    assert s.re.search(r"^\[2/3\] done b: exit 0 in \d s; 1 left, about \d s more$", out, s.re.M)
    assert s.re.search(r"^\[3/3\] done e: exit 0 in \d s$", out, s.re.M)
    done = {0: 100.0, 1: 300.0}
    jobs_ = [a, b, job(tmp_path, "y", "", kind="y")]
    assert j.eta([b, jobs_[2]], done, jobs_, 2) == (200.0 + 200.0) / 2


def test_deadline_uses_expected_seconds_before_a_run_of_the_kind_has_finished(tmp_path):
    a = job(tmp_path, "a", TIMED.format(t=0.1), expected_s=100.0)
    assert j.estimate([a], 0, {}, {}) == 100.0
    assert j.run_jobs([a], parallel=1, deadline=5.0) == [None]


@pytest.mark.slow
def test_a_tiny_sweep_end_to_end_and_again(tmp_path, capsys):
    """Two optimizers x 2 learning rates on the TINY model: 4 records, then the same command runs nothing; compare.py
    --sweep reads them."""
    train, val = make_shards(tmp_path / "shards")
    argv = ["--out", str(tmp_path / "exp"), "--optimizers", "muon,adamw", "--grid", "lr=default*2^0..1",
            "--extend", "0", "--parallel", "2", "--", *TINY, "--input_bin", train, "--input_val_bin", val,
            "--matmul_check", "0", "--final_checkpoint", "0"]
    start = time.time()
    assert s.main(argv) == 0
    out = capsys.readouterr().out
    records = sorted((tmp_path / "exp").glob("*.txt"))
    assert len(records) == 4 and "[4/4] done" in out and "best lr = " in out
    assert s.main(argv) == 0
    again = capsys.readouterr().out
    assert "0 run(s) to do" in again and "start " not in again
    assert time.time() - start < 300
