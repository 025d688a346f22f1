"""records/compare.py's tuned-comparison tools: the optimization track's two rules (its README's worked examples),
steps to a target loss, --sweep, and the track's logs (train_time in seconds)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt2 as t

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "records"))
import compare as c  # noqa: E402
from test_sweep import fake_record  # noqa: E402

# KellerJordan/modded-nanogpt records/track_3_optimization/README.md, "Pairwise statistical significance":
# (old, new) = ((loss, n, steps), (loss, n, steps)) and the left-hand side the README gives
WORKED = [
    ("#13 vs #11", (3.2785, 16, 3225), (3.2785, 10, 3210), 0.00167),
    ("#13 vs #8", (3.2778, 16, 3250), (3.2785, 10, 3210), 0.0027),  # the README's arithmetic uses n = 10 and 16
    ("#12 vs #6", (3.2788, 20, 3375), (3.2790, 20, 3325), 0.00648),
]


@pytest.mark.parametrize("name,old,new,lhs", WORKED, ids=[w[0] for w in WORKED])
def test_pairwise_rule_reproduces_the_tracks_worked_examples(name, old, new, lhs):
    got = c.track_pairwise(*old, *new)
    assert round(got, len(str(lhs)) - 2) == lhs
    assert (got >= c.TRACK_MARGIN) == (name == "#12 vs #6")
    assert c.track_pairwise(*new, *old) == pytest.approx(-got)


def test_one_sided_rule_as_the_track_states_it():
    """One run below 3.276 passes, n = 4 needs an average below 3.278 (the README's examples)."""
    assert c.track_one_sided(3.2759, 1) >= c.TRACK_MARGIN > c.track_one_sided(3.2761, 1)
    assert c.track_one_sided(3.2779, 4) >= c.TRACK_MARGIN > c.track_one_sided(3.2781, 4)
    assert c.track_one_sided(3.2787, 10) == pytest.approx(0.0013 * math.sqrt(10))


def run_with(val) -> c.Run:
    return c.Run(path="x", format="ours", optimizer="muon", label="", config="", hyperparameters={}, val=val,
                 train=[], num_iterations=400, final_val_loss=val[-1][1], step_avg=None, peak_mib=1, complete=True)


def test_steps_to_interpolates_between_val_points():
    run = run_with([(0, 11.0, 0.0), (100, 6.0, 10000.0), (125, 5.0, 12000.0), (150, 4.0, 14000.0)])
    assert c.steps_to(run, 5.5) == (112.5, 11000.0)
    assert c.steps_to(run, 5.0) == (125.0, 12000.0)
    assert c.steps_to(run, 3.9) is None
    assert c.steps_to(run, 20.0) == (0.0, 0.0)


def test_steps_rows_speedup_over_the_baseline():
    fast = [run_with([(0, 11.0, 0.0), (100, 5.0, 100.0)]), run_with([(0, 11.0, 0.0), (100, 4.0, 100.0)])]
    slow = [run_with([(0, 11.0, 0.0), (200, 5.0, 200.0)]), run_with([(0, 11.0, 0.0), (200, 5.0, 200.0)])]
    never = [run_with([(0, 11.0, 0.0), (200, 6.0, 200.0)])]
    rows = {r["group"]: r for r in c.steps_rows({"fast": fast, "slow": slow, "never": never}, 5.0, "slow")}
    assert rows["slow"]["mean"] == 200.0 and rows["fast"]["mean"] == pytest.approx((100 + 100 * 6 / 7) / 2)
    # the speedup compares mean curves: fast's mean curve (0, 11), (100, 4.5) reaches 5.0 at 100 * 6 / 6.5
    assert rows["fast"]["curve"] == pytest.approx(100 * 6 / 6.5) and rows["slow"]["curve"] == 200.0
    assert rows["fast"]["speedup"] == pytest.approx(200.0 / (100 * 6 / 6.5))
    assert rows["never"]["reached"] == 0 and rows["never"]["speedup"] is None


def test_speedup_with_the_baselines_own_mean_as_the_target():
    """The default target is the baseline's mean final loss: one of its two runs ends above it and never reaches it,
    but its mean curve does, at its last val step, so the speedup is defined."""
    base = [run_with([(0, 11.0, 0.0), (100, 6.0, 100.0), (200, 5.0, 200.0)]),
            run_with([(0, 11.0, 0.0), (100, 6.2, 100.0), (200, 5.2, 200.0)])]
    other = [run_with([(0, 11.0, 0.0), (100, 5.0, 100.0), (200, 4.0, 200.0)])]
    assert c.mean_curve(base) == [(0, 11.0, 0.0), (100, 6.1, 100.0), (200, 5.1, 200.0)]
    rows = {r["group"]: r for r in c.steps_rows({"base": base, "other": other}, 5.1, "base")}
    assert rows["base"]["reached"] == 1 and rows["base"]["curve"] == pytest.approx(200.0)
    assert rows["other"]["curve"] == pytest.approx(100 * 5.9 / 6) and rows["other"]["speedup"] == \
        pytest.approx(200.0 / (100 * 5.9 / 6))


def test_sweep_table_best_edge_warning_and_plot(tmp_path):
    """Per optimizer: each lr's mean ± std (n), the best, a warning when it is the first or last value, diverged
    runs counted as infinite; the plot has a line per optimizer on a log axis."""
    out = tmp_path / "exp"
    for lr, loss in [(0.009, 4.9), (0.018, 4.8), (0.036, 4.7)]:
        fake_record(out, "muon", lr, 0, loss)
    fake_record(out, "muon", 0.018, 1, 4.82)
    fake_record(out, "adamw", 0.0003, 0, 5.2)
    fake_record(out, "adamw", 0.0006, 0, 5.1)
    fake_record(out, "adamw", 0.0012, 0, 5.1, diverged=True)
    runs = [c.parse_record(p) for p in sorted(out.glob("*.txt"))]
    rows = c.sweep_rows(c.group_runs(runs), "lr")
    assert [(r["value"], r["runs"]) for r in rows["muon"]] == [(0.009, 1), (0.018, 2), (0.036, 1)]
    assert rows["muon"][1]["mean"] == pytest.approx(4.81) and rows["muon"][1]["std"] == pytest.approx(0.01414, 1e-3)
    assert math.isinf(rows["adamw"][2]["mean"]) and rows["adamw"][2]["diverged"] == 1
    text = c.format_sweep(rows, "lr")
    assert "best lr = 0.036; WARNING: at the high edge" in text
    assert "best lr = 0.0006\n" in text + "\n" and "diverged (n=1)" in text
    fig = c.plot_sweep(rows, "lr", tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert fig.axes[0].get_xscale() == "log"
    assert sorted(ax.get_label() for ax in fig.axes[0].containers) == ["adamw", "muon"]


def test_best_keeps_each_group_at_its_best_setting(tmp_path, capsys):
    """--best lr: each optimizer's runs at its best lr only (a diverged run counts as infinite), so the table, Welch,
    --steps_to and --track compare optimizers at their best; --sweep still sees every value."""
    out = tmp_path / "exp"
    for seed, loss in enumerate([4.70, 4.72, 4.71]):
        fake_record(out, "muon", 0.036, seed, loss)
    fake_record(out, "muon", 0.018, 0, 4.69)  # one lucky run at another lr: the mean of 0.036's three is lower
    fake_record(out, "muon", 0.018, 1, 4.80)
    for seed, loss in enumerate([5.13, 5.15, 5.14]):
        fake_record(out, "adamw", 0.00015, seed, loss)
    fake_record(out, "adamw", 0.0003, 0, 5.0, diverged=True)
    runs = [c.parse_record(p) for p in sorted(out.glob("*.txt"))]
    kept, best = c.at_best(c.group_runs(runs), "lr")
    assert best == {"muon": (0.036, 3), "adamw": (0.00015, 3)}
    assert sorted(r.final_val_loss for r in kept["muon"]) == [4.70, 4.71, 4.72]
    assert c.main([str(out), "--best", "lr", "--baseline", "adamw", "--steps_to", "--sweep", "lr"]) == 0
    text = capsys.readouterr().out
    assert "each optimizer at its best lr: adamw 0.00015 (n=3), muon 0.036 (n=3)" in text
    assert "muon          3      4.7100 ± 0.0100" in text and "0.018  4.7450 ± 0.0778 (n=2)" in text
    assert "adamw          2/3      399.5 ± 0.7       400.0" in text
    assert "muon           3/3      357.0 ± 1.0       357.0" in text and "1.120x" in text


def test_sweep_splits_runs_that_differ_in_another_setting(tmp_path):
    out = tmp_path / "exp"
    fake_record(out, "adamw", 0.0003, 0, 5.2, warmup_iters=15)
    fake_record(out, "adamw", 0.0003, 0, 5.0, warmup_iters=50)
    rows = c.sweep_rows(c.group_runs([c.parse_record(p) for p in out.glob("*.txt")]), "lr")
    assert sorted(rows) == ["adamw (warmup_iters=15)", "adamw (warmup_iters=50)"]


TRACK_LOG = '''import torch
class Muon(torch.optim.Optimizer):
    pass
opt = Muon([])
====================================================================================================
Running PyTorch 2.10.0+cu128 compiled for CUDA 12.8 on NVIDIA H100 80GB HBM3 with world_size 8
====================================================================================================
step:0/3250 val_loss:10.82584 train_time:0.000s step_avg:nanms
step:125/3250 val_loss:4.58616 train_time:21.243s step_avg:169.94ms
step:3225/3250 val_loss:3.28788 train_time:499.288s step_avg:154.05ms
step:3250/3250 val_loss:3.27722 train_time:503.169s step_avg:155.25ms
'''


def test_a_track_log_reads_with_its_final_loss_steps_and_time(tmp_path, capsys):
    """The track's logs (code before `====`, train_time in seconds): final val loss, step count, time, the optimizer
    its code builds, steps to a target and the rules."""
    folder = tmp_path / "20260610_tuned_baseline_3250"
    folder.mkdir()
    (folder / "263ea3c4.txt").write_text(TRACK_LOG)
    run = c.parse_record(folder / "263ea3c4.txt")
    assert run.complete and run.final_val_loss == 3.27722 and run.end_step == 3250
    assert run.train_time_ms == pytest.approx(503169.0) and run.optimizer == "upstream-muon"
    assert c.steps_to(run, 3.28)[0] == pytest.approx(3225 + 25 * (3.28788 - 3.28) / (3.28788 - 3.27722))
    assert c.main([str(tmp_path), "--by", "label", "--track", "--steps_to", "3.28", "--runs"]) == 0
    out = capsys.readouterr().out
    assert "20260610_tuned_baseline_3250  3.2772  step 3250  8.39m  " in out
    assert "20260610_tuned_baseline_3250: (3.28 - 3.2772) * sqrt(1) = 0.00278: fails" in out
    assert "8.39m" in out


def test_step_time_between_two_steps_per_group_and_over_the_baseline(tmp_path, capsys):
    """--step_time A:B: (train_time at B - at A) / (B - A) per run, mean ± std per group, ratio to --baseline; the
    track's seconds and the project's ms alike; a group whose runs lack a step says so; a bad A:B is refused."""
    def log(name, ms_a_step, unit):  # compile in the first step: 50 s
        times = [50000 + ms_a_step * s for s in range(1, 61)]
        lines = [f"step:{s}/60 train_time:" + (f"{t / 1000:.3f}s" if unit == "s" else f"{t:.1f}ms")
                 for s, t in zip(range(1, 61), times)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.txt").write_text("code\n" + "=" * 100 + "\n" + "\n".join(lines) + "\n")
    log("original", 1000.0, "s")
    log("project", 900.0, "ms")
    assert c.main([str(tmp_path), "--by", "label", "--step_time", "20:60", "--baseline", "original"]) == 0
    out = capsys.readouterr().out
    assert "| original | 1000.00 | 1 | 1.0000 |" in out and "| project | 900.00 | 1 | 0.9000 |" in out
    assert c.main([str(tmp_path), "--by", "label", "--step_time", "20:61"]) == 0
    assert "| project | — (no run logs a train_time at both steps) | 0 | — |" in capsys.readouterr().out
    assert c.main([str(tmp_path), "--step_time", "60:20"]) == 2


TRACK_RESULTS = os.environ.get("MODDED_NANOGPT_GIT", "")  # a clone of KellerJordan/modded-nanogpt (its .git)


@pytest.mark.slow
@pytest.mark.skipif(not TRACK_RESULTS, reason="MODDED_NANOGPT_GIT (a modded-nanogpt clone's .git) is not set")
def test_the_tracks_published_logs(tmp_path):
    """The track's own results (MODDED_NANOGPT_GIT=path/to/modded-nanogpt/.git): #36's ten logs read as ten
    complete runs at 3250 steps, their mean 3.2787 as the README says."""
    folder = tmp_path / "20260610_tuned_baseline_3250"
    folder.mkdir()
    git = ["git", f"--git-dir={TRACK_RESULTS}"]
    where = "records/track_3_optimization/results/20260610_tuned_baseline_3250/"
    names = subprocess.run([*git, "ls-tree", "--name-only", "HEAD", where], capture_output=True, text=True,
                           check=True).stdout.split()
    for name in names:
        text = subprocess.run([*git, "show", f"HEAD:{name}"], capture_output=True, text=True, check=True).stdout
        (folder / Path(name).name).write_text(text)
    runs = [c.parse_record(p) for p in folder.glob("*.txt")]
    assert len(runs) == 10 and all(r.complete and r.end_step == 3250 for r in runs)
    assert round(sum(r.final_val_loss for r in runs) / 10, 4) == 3.2787


def test_lr_settings_are_the_rules_declared_lr():
    """compare.py (which does not import the trainer) names each rule's learning rate as the rule declares it."""
    assert {n: c.lr_setting(n) for n in t.OPTIMIZERS} == {
        n: t.optimizer_class(n).declared()["lr"].name for n in t.OPTIMIZERS}
    assert c.lr_setting("lion") == "lion_lr"
