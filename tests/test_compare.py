"""records/compare.py: parsing the three log formats, grouping, statistics against scipy, the plot and the CLI."""
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import train_gpt2 as t
from conftest import train_here

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "records"))
import compare as c  # noqa: E402

SOURCE = (Path(t.__file__).read_text())  # what Record writes between the two marks


# ----------------------------------------------------------------------------- fixtures: files in the three formats


def val_curve(step: int, n: int, final: float) -> float:
    return round(final + (10.8 - final) * (1 - step / n) ** 3, 4)


def write_ours(folder: Path, *, optimizer="muon", label="", seed=0, n=40, val_every=10, final=3.3, stop_at=None,
               opt_ms=None, step_ms=lambda s: 50.0, stamp="20250301-120000", tag="a", peak=1234, matmul=None,
               blocks_ms=None, **settings) -> Path:
    """A record as train_gpt2.Record and the training loop write it; stop_at < n: cut off after that step's lines,
    without the peak-memory line (a crash). opt_ms: a function of the step giving the ` opt_ms:` field, or None
    (blocks_ms: the same for ` blocks_ms:`, written after it);
    step_ms: the training time of logged step s (the first 10 are untimed); matmul: a matmul rate (TFLOP/s), which
    adds the trainer's `matmul: ... mfu: ...` line (train_gpt2.mfu_line) at the end."""
    args = t.Hyperparameters(optimizer=optimizer, label=label, seed=seed, num_iterations=n, val_loss_every=val_every,
                             preset="smoke", batch_size=8, device_batch_size=4, sequence_length=128, **settings)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stamp}-{args.preset}-{args.optimizer}-{tag:0>8}.txt"
    B, T, accum = args.device_batch_size, args.sequence_length, 2
    lines = [f"{t.RECORD_MARK}\n{SOURCE}\n{t.RECORD_MARK}",
             f"hyperparameters: {json.dumps(dataclasses.asdict(args))}",
             "torch: 2.13.0 cuda: None python: 3.11.9", f"devices: {json.dumps(['cpu'])}", "world_size: 1",
             f"world_size 1, device_batch {B} x {T}, accumulation {accum}, {args.batch_size * T} tokens/step"]
    elapsed = [0.0]  # training time at logged step s
    for s in range(1, n + 1):
        elapsed.append(elapsed[-1] + (step_ms(s) if s > 10 else 0.0))
    for step in range(n + 1):
        if stop_at is not None and step > stop_at:
            break
        timed = max(step - 10, 0)
        training_ms = elapsed[step]
        if step == n or step % val_every == 0:
            lines.append(f"step:{step}/{n} val_loss:{val_curve(step, n, final):.4f} train_time:{training_ms:.0f}ms "
                         f"step_avg:{training_ms / timed if timed else float('nan'):.2f}ms")
        if step == n:
            break
        now_ms = elapsed[step + 1]
        line = (f"step:{step + 1}/{n} train_loss:{val_curve(step, n, final) + 0.01:.4f} train_time:{now_ms:.0f}ms "
                f"step_avg:{now_ms / (step + 1 - 10) if step + 1 > 10 else float('nan'):.2f}ms")
        if opt_ms is not None:
            line += f" opt_ms:{opt_ms(step + 1):.2f}"
        if blocks_ms is not None:
            line += f" blocks_ms:{blocks_ms(step + 1):.2f}"
        lines.append(line)
    if stop_at is None:
        if matmul is not None:
            lines.append(t.mfu_line(args, elapsed[n] / (n - 10), matmul, 1, "8192^3 bf16 (a test card)"))
        lines.append(f"peak memory consumption: {peak} MiB")
    path.write_text("\n".join(lines) + "\n")
    return path


UPSTREAM_SOURCE = '''import os
import torch
class Muon(torch.optim.Optimizer):
    pass
optimizer2 = Muon(hidden_matrix_params, lr=0.05, momentum=0.95)
print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms")
'''

NVIDIA_SMI = '''Running Python 3.12.7 (main, Jan 17 2025, 03:57:17) [GCC 13.2.0]
Running PyTorch 2.7.0.dev20250110+cu126 compiled for CUDA 12.6
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.127.05             Driver Version: 550.127.05     CUDA Version: 12.6     |
|=========================================+========================+======================|
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:61:00.0 Off |                    0 |
| N/A   32C    P0            116W /  700W |    7746MiB /  81559MiB |      0%      Default |
+-----------------------------------------+------------------------+----------------------+
'''


def write_upstream(path: Path, *, n=30, final=3.27, val_every=10, peak=32296, cut=None) -> Path:
    """A modded-nanogpt log: source, ====, versions and nvidia-smi, ====, step lines (train lines without a loss)."""
    lines = [UPSTREAM_SOURCE, "=" * 100, NVIDIA_SMI, "=" * 100]
    for step in range(n + 1):
        if cut is not None and step > cut:
            break
        ms = 30 * step
        if step == n or step % val_every == 0:
            lines.append(f"step:{step}/{n} val_loss:{val_curve(step, n, final):.4f} train_time:{ms}ms "
                         f"step_avg:{ms / max(step, 1):.2f}ms" + (" final_eval" if step == n else ""))
        if step < n:
            lines.append(f"step:{step + 1}/{n} train_time:{30 * (step + 1)}ms step_avg:30.00ms")
    if cut is None:
        lines.append(f"peak memory allocated: {peak} MiB reserved: {peak + 1000} MiB")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_upstream_old(path: Path, *, n=20, final=3.29, val_every=8) -> Path:
    lines = []
    for step in range(n + 1):
        if step % val_every == 0 or step == n:
            lines.append(f"s:{step} tel:{val_curve(step, n, final):.6f}")
        if step < n:
            lines.append(f"s:{step} trl:{val_curve(step, n, final) + 0.02:.4f} lr:0.000100 norm:1.23")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def final_of(path: Path) -> float:
    return c.parse_record(path).final_val_loss


# ----------------------------------------------------------------------------- parsing


def test_record_mark_in_sync():
    assert c.RECORD_MARK == t.RECORD_MARK


def test_parse_ours(tmp_path):
    path = write_ours(tmp_path, optimizer="adamw", label="base", n=40, final=3.31, opt_ms=lambda s: 2.0 + s / 100,
                      stamp="20250302-134501")
    run = c.parse_record(path)
    assert run.format == "ours" and run.complete
    assert (run.optimizer, run.label, run.num_iterations, run.peak_mib) == ("adamw", "base", 40, 1234)
    args = t.Hyperparameters(optimizer="adamw", label="base", seed=0, num_iterations=40, val_loss_every=10,
                             preset="smoke", batch_size=8, device_batch_size=4, sequence_length=128)
    assert run.hyperparameters == json.loads(json.dumps(dataclasses.asdict(args)))
    assert run.config == c.config_hash(json.loads(json.dumps(dataclasses.asdict(args))), run.code)
    assert run.val == [(s, val_curve(s, 40, 3.31), 50.0 * max(s - 10, 0)) for s in (0, 10, 20, 30, 40)]
    assert run.final_val_loss == val_curve(40, 40, 3.31) == 3.31
    assert len(run.train) == 40
    assert run.train[0] == (1, round(val_curve(0, 40, 3.31) + 0.01, 4), 0.0, 2.01)
    assert run.train[-1] == (40, round(val_curve(39, 40, 3.31) + 0.01, 4), 1500.0, 2.4)
    assert run.step_avg == 50.0 and run.train_time_ms == 1500.0
    assert run.opt_ms == pytest.approx(np.mean([round(2.0 + s / 100, 2) for s in range(11, 41)]))
    assert run.tokens == 40 * 8 * 128 and run.meta["tokens_per_step"] == 8 * 128
    assert run.meta["devices"] == ["cpu"] and run.meta["world_size"] == 1
    assert run.timestamp.isoformat() == "2025-03-02T13:45:01"
    assert run.last_step == 40


def test_parse_ours_without_opt_ms_and_truncated(tmp_path):
    run = c.parse_record(write_ours(tmp_path, n=40, stop_at=23))
    assert run.format == "ours" and not run.complete
    assert run.last_step == 24 and run.num_iterations == 40 and run.peak_mib is None
    assert run.opt_ms is None and all(o is None for *_, o in run.train)
    assert run.blocks_ms is None and "blocks" not in c.format_table(c.summarize({"a": [run]}), "label", 3.28)
    assert run.final_val_loss == val_curve(20, 40, 3.3)  # the last one seen
    # cut off before the hyperparameters were written: still a record, incomplete at step 0
    cut = tmp_path / "cut.txt"
    cut.write_text(f"{t.RECORD_MARK}\nimport os\n")
    run = c.parse_record(cut)
    assert run.format == "ours" and not run.complete and run.last_step == 0


def test_blocks_ms_is_parsed_averaged_over_the_timed_steps_and_shown(tmp_path):
    """The trainer's `blocks_ms:` (the block matrices' optimizer, inside opt_ms): mean over the steps opt_ms uses."""
    path = write_ours(tmp_path / "a", optimizer="muon", label="new", n=40, opt_ms=lambda s: 5.0 + s / 100,
                      blocks_ms=lambda s: 4.0 + s / 100)
    run = c.parse_record(path)
    assert run.blocks == {s: round(4.0 + s / 100, 2) for s in range(1, 41)}
    assert run.blocks_ms == pytest.approx(np.mean([round(4.0 + s / 100, 2) for s in range(11, 41)]))
    old = c.parse_record(write_ours(tmp_path / "b", optimizer="muon", label="old", n=40, opt_ms=lambda s: 6.0))
    rows = c.summarize({"new": [run], "old": [old]})
    assert rows[0]["blocks_ms"] == pytest.approx(run.blocks_ms) and rows[1]["blocks_ms"] is None
    head, _, new_row, old_row = c.format_table(rows, "label", 3.28).splitlines()
    cells = lambda line: line.split()
    assert "blocks" in head and f"{run.blocks_ms:.2f}" in cells(new_row) and "-" in cells(old_row)
    short = c.parse_record(write_ours(tmp_path / "c", n=40, stop_at=23, opt_ms=lambda s: 5.0, blocks_ms=lambda s: 4.5))
    assert not short.complete and "opt ms 5.00, blocks ms 4.50" in c._timing(short)


def test_parse_upstream(tmp_path):
    run = c.parse_record(write_upstream(tmp_path / "011625_Sub3Min" / "c8cb.txt", n=30, final=3.27))
    assert run.format == "upstream" and run.complete
    assert (run.optimizer, run.label, run.num_iterations, run.peak_mib) == ("upstream-muon", "011625_Sub3Min", 30,
                                                                           32296)
    assert run.val == [(s, val_curve(s, 30, 3.27), 30.0 * s) for s in (0, 10, 20, 30)]
    assert run.final_val_loss == 3.27 and run.step_avg == 30.0 and run.train_time_ms == 900.0
    assert run.train[:2] == [(1, None, 30.0, None), (2, None, 60.0, None)] and len(run.train) == 30
    assert run.config.startswith("upstream-") and run.tokens is None and run.opt_ms is None
    assert run.timestamp.date().isoformat() == "2025-01-16"  # from the folder name, MMDDYY
    cut = c.parse_record(write_upstream(tmp_path / "2024-11-03_X" / "cut.txt", cut=17))
    assert not cut.complete and cut.last_step == 18 and cut.num_iterations == 30
    assert cut.timestamp.date().isoformat() == "2024-11-03"


def test_parse_upstream_old(tmp_path):
    run = c.parse_record(write_upstream_old(tmp_path / "2024-06-06_AdamW" / "f66d.log", n=20, final=3.29))
    assert run.format == "upstream_old" and run.complete
    assert run.val == [(s, val_curve(s, 20, 3.29), None) for s in (0, 8, 16, 20)]
    assert run.train[3] == (3, round(val_curve(3, 20, 3.29) + 0.02, 4), None, None) and len(run.train) == 20
    assert (run.num_iterations, run.final_val_loss, run.label, run.optimizer) == (20, 3.29, "2024-06-06_AdamW",
                                                                                 "? 2024-06-06_AdamW/f66d.log")
    assert run.train_time_ms is None and run.step_avg is None and run.peak_mib is None


def test_not_records(tmp_path):
    (tmp_path / "notes.txt").write_text("step 3: remember to check the lr\nval loss looked fine\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    for name in ("notes.txt", "empty.txt", "bin.txt"):
        assert c.parse_record(tmp_path / name) is None


# ----------------------------------------------------------------------------- grouping and statistics


def test_group_runs(tmp_path):
    paths = [write_ours(tmp_path, optimizer="muon", label="x", seed=0, tag="1"),
             write_ours(tmp_path, optimizer="muon", label="y", seed=1, tag="2"),
             write_ours(tmp_path, optimizer="muon", label="x", seed=2, muon_lr=0.02, tag="3"),
             write_ours(tmp_path, optimizer="adamw", label="", tag="4"),
             write_upstream(tmp_path / "up" / "u.txt")]
    runs = [c.parse_record(p) for p in paths]
    by_opt = c.group_runs(runs, "optimizer")
    assert list(by_opt) == ["adamw", "muon", "upstream-muon"]
    assert [r.path for r in by_opt["muon"]] == [str(p) for p in paths[:3]]
    by_label = c.group_runs(runs, "label")
    assert {k: len(v) for k, v in by_label.items()} == {c.NO_LABEL: 1, "up": 1, "x": 2, "y": 1}
    by_config = c.group_runs(runs, "config")
    assert runs[0].config == runs[1].config != runs[2].config  # seed and label do not count, muon_lr does
    assert sorted(len(v) for v in by_config.values()) == [1, 1, 1, 2]
    with pytest.raises(ValueError):
        c.group_runs(runs, "colour")


def test_summarize_matches_scipy(tmp_path):
    finals = {"muon": [3.2712, 3.2790, 3.2755, 3.2801], "adamw": [3.3012, 3.2950, 3.3101], "solo": [3.2700]}
    runs = []
    for opt, losses in finals.items():
        for i, loss in enumerate(losses):
            runs.append(c.parse_record(write_ours(tmp_path, optimizer=opt, seed=i, final=loss, tag=f"{opt}{i}",
                                                  peak=1000 + i, opt_ms=lambda s: 3.0)))
    runs.append(c.parse_record(write_ours(tmp_path, optimizer="muon", final=3.0, stop_at=12, tag="crash")))
    rows = {r["group"]: r for r in c.summarize(c.group_runs(runs, "optimizer"), target=3.28)}
    assert [r.final_val_loss for r in runs[:4]] == finals["muon"]  # parsed numbers equal the written ones
    for opt, losses in finals.items():
        row = rows[opt]
        assert row["runs"] == len(losses) and row["losses"] == losses
        assert row["mean"] == pytest.approx(np.mean(losses)) and row["min"] == min(losses)
        assert row["steps"] == [40] and row["tokens"] == 40 * 8 * 128 and row["opt_ms"] == 3.0
        assert row["peak_mib"] == 1000 + len(losses) - 1
        assert row["train_time_ms"] == 1500.0 and row["step_avg_ms"] == 50.0
        if len(losses) > 1:
            assert row["std"] == pytest.approx(np.std(losses, ddof=1))
            assert row["p_value"] == pytest.approx(stats.ttest_1samp(losses, 3.28, alternative="less").pvalue,
                                                   rel=1e-12)
        else:
            assert row["std"] is None and row["p_value"] is None
    assert rows["muon"]["incomplete"] == 1  # the crashed run is counted apart, not in the statistics


def test_welch_matches_scipy():
    a, b = [3.2712, 3.2790, 3.2755, 3.2801], [3.3012, 3.2950, 3.3101]
    w = c.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["statistic"] == pytest.approx(ref.statistic, rel=1e-12)
    assert w["p_value"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert w["df"] == pytest.approx(ref.df, rel=1e-12)
    assert w["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    ci = ref.confidence_interval(confidence_level=0.95)
    assert (w["low"], w["high"]) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    assert c.welch(a, b[:1]) is None
    assert (w["flips"], w["pairs"]) == (0, 12)  # every run of a below every run of b
    w = c.welch([1.0, 2.0, 5.0], [3.0, 4.0])  # mean(a) < mean(b): 5.0 lies above both runs of b
    assert (w["flips"], w["pairs"]) == (2, 6)
    assert c.welch([1.0, 5.0], [3.0, 3.0])["flips"] == 0  # equal means: no order to flip


# ----------------------------------------------------------------------------- plot


def test_plot_one_line_per_run_and_colour_per_group(tmp_path):
    paths = [write_ours(tmp_path, optimizer="muon", seed=0, final=3.27, tag="1"),
             write_ours(tmp_path, optimizer="muon", seed=1, final=3.28, tag="2"),
             write_ours(tmp_path, optimizer="adamw", final=3.31, tag="3"),
             write_ours(tmp_path, optimizer="adamw", final=3.0, stop_at=25, tag="4"),
             write_upstream(tmp_path / "up" / "u.txt", n=40)]
    runs = [c.parse_record(p) for p in paths]
    out = tmp_path / "cmp.png"
    fig = c.plot_runs(runs, "optimizer", out)
    assert out.stat().st_size > 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 3
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == len(runs)
        colour = {line.get_gid(): line.get_color() for line in lines}
        assert colour[str(paths[0])] == colour[str(paths[1])]
        assert colour[str(paths[2])] == colour[str(paths[3])]
        assert len({colour[str(paths[0])], colour[str(paths[2])], colour[str(paths[4])]}) == 3
    step_lines = {line.get_gid(): line for line in fig.axes[0].get_lines()}
    assert list(step_lines[str(paths[0])].get_xdata()) == [0, 10, 20, 30, 40]
    assert step_lines[str(paths[3])].get_linestyle() == "--"  # incomplete
    time_lines = {line.get_gid(): line for line in fig.axes[1].get_lines()}
    assert list(time_lines[str(paths[0])].get_xdata()) == pytest.approx([0, 0, 500 / 60000, 1000 / 60000,
                                                                         1500 / 60000])
    assert fig.axes[2].get_xlim()[0] == pytest.approx(32)  # the last 20% of 40 steps
    legend = fig.axes[0].get_legend()
    assert [x.get_text() for x in legend.get_texts()] == ["adamw (2)", "muon (2)", "upstream-muon (1)"]
    # old logs have no times: in the step panels, not in the time panel; a target adds one line per panel
    runs.append(c.parse_record(write_upstream_old(tmp_path / "old" / "main.log", n=40)))
    fig = c.plot_runs(runs, "optimizer", None, target=3.28)
    assert [len(ax.get_lines()) for ax in fig.axes] == [len(runs) + 1, len(runs), len(runs) + 1]


# ----------------------------------------------------------------------------- command line


def test_main_table_incomplete_skipped(tmp_path, capsys):
    recs = tmp_path / "records"
    for i, loss in enumerate([3.271, 3.279, 3.275]):
        write_ours(recs, optimizer="muon", seed=i, final=loss, tag=f"m{i}")
    for i, loss in enumerate([3.301, 3.296]):
        write_ours(recs / "sub", optimizer="adamw", seed=i, final=loss, tag=f"a{i}")
    crashed = write_ours(recs, optimizer="muon", stop_at=23, tag="crash")
    (recs / "notes.txt").write_text("not a record\n")
    png = tmp_path / "out.png"
    assert c.main([str(recs), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["optimizer", "runs"] and "p(mean<3.28)" in table[0]
    adamw, muon = table[2].split(), table[3].split()
    assert adamw[:2] == ["adamw", "2"] and muon[:2] == ["muon", "3"]
    p = stats.ttest_1samp([3.271, 3.279, 3.275], 3.28, alternative="less").pvalue
    assert muon[-1] == f"{p:.3g}"
    w = c.welch([3.301, 3.296], [3.271, 3.279, 3.275])
    assert f"adamw - muon: {w['diff']:+.4f}, 95% interval [{w['low']:+.4f}, {w['high']:+.4f}]" in out
    assert f"{crashed} [muon]: reached step 24/40" in out
    assert f"skipped {recs / 'notes.txt'}: not a record" in out
    assert png.exists()


def test_main_globs_formats_and_since(tmp_path, capsys):
    write_ours(tmp_path, optimizer="muon", stamp="20250101-090000", tag="old")
    write_ours(tmp_path, optimizer="muon", stamp="20250315-090000", tag="new1")
    write_ours(tmp_path, optimizer="muon", stamp="20250316-090000", tag="new2", seed=1)
    old_log = write_upstream_old(tmp_path / "up" / "main.log")
    assert c.main([str(tmp_path / "*.txt"), str(old_log), "--since", "2025-03-15", "--by", "label"]) == 0
    out = capsys.readouterr().out
    rows = out.split("\n\n")[0].splitlines()[2:]
    assert [r.split()[:3] for r in rows] == [["(no", "label)", "2"], ["up", "1", f"{3.29:.4f}"]]
    assert "1 run(s) before 2025-03-15 left out (--since)" in out
    # mtime decides for files without a timestamp in their name
    stale = write_upstream(tmp_path / "logs" / "stale.txt")
    os.utime(stale, (time.time() - 400 * 86400,) * 2)
    assert c.main([str(stale), "--since", time.strftime("%Y-%m-%d")]) == 1
    assert "no records found" in capsys.readouterr().out
    assert c.main([str(tmp_path / "nothing*.txt")]) == 1
    assert f"skipped {tmp_path / 'nothing*.txt'}: no such file" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        c.main(["--since", "15/03/2025"])


def test_default_input_is_the_trainers_default_records_dir(tmp_path, capsys, monkeypatch):
    """No paths: runs/ beside compare.py's folder, where the trainer run from the repo root (run.sh) writes its
    records by default; the experiments under records/ are not read."""
    assert t.Hyperparameters().records_dir == "runs"
    (tmp_path / "records").mkdir()
    shutil.copy(c.__file__, tmp_path / "records" / "compare.py")
    spec = importlib.util.spec_from_file_location("compare_copy", tmp_path / "records" / "compare.py")
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "compare_copy", copy)  # its dataclasses look their module up there
    spec.loader.exec_module(copy)
    write_ours(tmp_path / "runs", optimizer="muon", tag="mine")
    write_ours(tmp_path / "records" / "experiment", optimizer="adamw", tag="archived")
    assert copy.main([]) == 0
    rows = capsys.readouterr().out.split("\n\n")[0].splitlines()[2:]
    assert [r.split()[:2] for r in rows] == [["muon", "1"]]


def test_default_folder_is_next_to_script():
    files, missing = c.find_files([str(Path(c.__file__).resolve().parent)])
    assert not missing and all(f.suffix == ".txt" for f in files)


def test_config_differences(tmp_path, capsys):
    runs = [c.parse_record(write_ours(tmp_path, optimizer="muon", seed=0, tag="1")),
            c.parse_record(write_ours(tmp_path, optimizer="muon", seed=1, tag="2")),
            c.parse_record(write_ours(tmp_path, optimizer="muon", muon_lr=0.02, tag="3")),
            c.parse_record(write_upstream(tmp_path / "up" / "u.txt"))]
    groups = c.group_runs(runs, "config")
    diffs = c.config_differences(groups)
    assert diffs[runs[0].config] == {"muon_lr": 0.018} and diffs[runs[2].config] == {"muon_lr": 0.02}
    assert diffs[runs[3].config] == {}
    c.main([str(tmp_path), "--by", "config"])
    assert f"  {runs[2].config}: muon_lr=0.02" in capsys.readouterr().out


def test_reads_a_record_written_by_the_trainer(tiny_args, tmp_path):
    """The parser and the real writer agree: a tiny CPU run of train_gpt2.train, then parse_record on its record."""
    path, _ = train_here(tiny_args + ["--val_loss_every", "2", "--label", "tiny", "--optimizer",
                                      "adamw"])
    run = c.parse_record(path)
    if " opt_ms:" in Path(path).read_text():  # the trainer's optional field, when it writes it
        assert all(o is not None and o >= 0 for *_, o in run.train) and run.opt_ms is not None
    assert run.format == "ours" and run.complete and (run.optimizer, run.label) == ("adamw", "tiny")
    assert run.num_iterations == 5 and [s for s, *_ in run.val] == [0, 2, 4, 5]
    assert [s for s, *_ in run.train] == [1, 2, 3, 4, 5] and all(loss is not None for _, loss, *_ in run.train)
    assert run.peak_mib > 0 and run.tokens == 5 * 4 * 32 and run.meta["tokens_per_step"] == 4 * 32
    assert run.hyperparameters["label"] == "tiny" and run.timestamp is not None
    assert math.isfinite(run.final_val_loss)


# ----------------------------------------------------------------------------- resumed and diverged records


def step_of(line: str) -> int:
    return int(line.split("/")[0][len("step:"):])


def resumed_tail(whole: Path, s: int) -> list[str]:
    """What a run resumed from its checkpoint of step s logs: a `resumed:` line, then the lines of an uninterrupted
    record from the val line of step s on (the train line of step s was logged before that save)."""
    lines = whole.read_text().splitlines()
    return ([f"resumed: step:{s}/40 from /ckpt/step_{s:06d} world_size:1 (saved with 1)",
             "world_size 1, device_batch 4 x 128, accumulation 2, 1024 tokens/step"]
            + [x for x in lines if x.startswith("step:") and step_of(x) >= s and not x.startswith(f"step:{s}/40 train")]
            + [lines[-1]])


def test_parse_resumed_record(tmp_path, capsys):
    """Killed after step 27 with a checkpoint at 20 (its val line logged after the save): the resumed branch replaces
    the abandoned lines from step 21 (train) and 20 (val) on, whatever they said."""
    whole = write_ours(tmp_path / "whole", n=40, final=3.3)
    path = write_ours(tmp_path, n=40, stop_at=27, final=3.3)
    abandoned = [x.replace("train_loss:", "train_loss:9") if x.startswith("step:") and step_of(x) > 20 else x
                 for x in path.read_text().splitlines()]  # other losses on the abandoned branch
    path.write_text("\n".join(abandoned + resumed_tail(whole, 20)) + "\n")
    run, ref = c.parse_record(path), c.parse_record(whole)
    assert "train_loss:93." in path.read_text()
    assert run.complete and run.resumed_at == [20] and run.diverged_at is None
    assert c.config_hash({**ref.hyperparameters, "save_every": 500, "keep_checkpoints": 3, "checkpoint_dir": "/c",
                          "resume": "/c/step_000020", "final_checkpoint": not ref.hyperparameters["final_checkpoint"]}
                         , ref.code) == ref.config  # checkpointing is not a configuration
    assert run.val == ref.val and run.train == ref.train and [s for s, *_ in run.train] == list(range(1, 41))
    assert c.main([str(path)]) == 0 and "incomplete" not in capsys.readouterr().out


def test_parse_diverged_record_and_list_it(tmp_path, capsys):
    path = write_ours(tmp_path, n=40, stop_at=23, tag="div")
    path.write_text(path.read_text() + "diverged: step:24/40 last_good_step:23 optimizer:muon train loss nan; first "
                    "non-finite parameter: transformer.wte.weight (50257, 768), updated by the embedding/head AdamW\n")
    run = c.parse_record(path)
    assert (run.diverged_at, run.last_good_step, run.last_step, run.complete) == (24, 23, 24, False)
    done = [write_ours(tmp_path, seed=i, tag=f"ok{i}") for i in range(2)]
    rows = c.summarize(c.group_runs([c.parse_record(p) for p in done + [path]]))
    assert (rows[0]["runs"], rows[0]["incomplete"]) == (2, 1)  # counted apart, never dropped
    assert c.main([str(tmp_path)]) == 0
    assert f"{path} [muon]: diverged at step 24/40, last good step 23, last val_loss" in capsys.readouterr().out
    # resumed from the checkpoint of step 20 and finished: complete, no longer diverged
    path.write_text(path.read_text() + "\n".join(resumed_tail(write_ours(tmp_path / "whole", n=40), 20)) + "\n")
    run = c.parse_record(path)
    assert run.complete and run.diverged_at is None and run.resumed_at == [20] and run.last_step == 40


def test_collect_ms_of_a_feature_gram_run(tmp_path):
    """The collection cost: refresh steps (step s logged as s + 1, s % gram_every == 0) take 24 ms more training time
    than plain ones, of which the optimizer timer holds 10 ms more: (24 - 10) / 4 = 3.5 ms a step; none for Muon."""
    refresh = lambda s: (s - 1) % 4 == 0
    path = write_ours(tmp_path, optimizer="newton_muon", n=40, gram_every=4, tag="nm",
                      step_ms=lambda s: 150.0 + 24.0 * refresh(s), opt_ms=lambda s: 6.0 + 10.0 * refresh(s))
    run = c.parse_record(path)
    assert run.collect_ms == pytest.approx(3.5)
    muon = c.parse_record(write_ours(tmp_path, optimizer="muon", n=40, gram_every=4, tag="mu", opt_ms=lambda s: 6.0))
    assert muon.collect_ms is None
    rows = c.summarize(c.group_runs([run, muon], "optimizer"))
    assert [r["collect_ms"] for r in rows] == [None, pytest.approx(3.5)]
    table = c.format_table(rows, "optimizer", 3.28)
    assert "collect ms/step" in table.splitlines()[0] and "3.50" in table.splitlines()[3]
    assert "collect" not in c.format_table(rows[:1], "optimizer", 3.28)  # no feature-gram run: no such column


def test_collect_ms_follows_gram_phase(tmp_path):
    """gram_phase 1 (refresh when (s + 1) % gram_every == 0, s logged as s + 1): the refresh steps are those, so the
    collection cost and the opt ms split are those of the phase-0 case above; read as phase 0 they would mix."""
    refresh = lambda s: s % 4 == 0
    run = c.parse_record(write_ours(tmp_path, optimizer="newton_muon", n=40, gram_every=4, gram_phase=1, tag="ph",
                                    step_ms=lambda s: 150.0 + 24.0 * refresh(s),
                                    opt_ms=lambda s: 6.0 + 10.0 * refresh(s)))
    assert run.collect_ms == pytest.approx(3.5) and run.opt_ms_split == pytest.approx((6.0, 16.0))


def test_opt_ms_split_into_plain_and_refresh_steps(tmp_path):
    """SOAP refreshes at step s (logged s + 1) with s % soap_precondition_frequency == 0: opt ms of those steps and
    of the others apart, in the table's opt column; Muon has no split and the column keeps its plain header."""
    refresh = lambda s: (s - 1) % 5 == 0
    soap = c.parse_record(write_ours(tmp_path, optimizer="soap", n=40, soap_precondition_frequency=5, tag="so",
                                     opt_ms=lambda s: 40.0 + 500.0 * refresh(s)))
    assert soap.opt_ms_split == pytest.approx((40.0, 540.0))
    assert soap.opt_ms == pytest.approx(40.0 + 500.0 * 6 / 30)  # steps 11..40: 6 refreshes (11, 16, ..., 36)
    muon = c.parse_record(write_ours(tmp_path, optimizer="muon", n=40, tag="mu", opt_ms=lambda s: 6.0))
    assert muon.refresh_period is None and muon.opt_ms_split is None
    rows = c.summarize(c.group_runs([soap, muon], "optimizer"))
    table = c.format_table(rows, "optimizer", 3.28).splitlines()
    assert "opt ms/step (plain, refresh)" in table[0] and "(40.00, 540.0)" in table[3]
    assert "(plain, refresh)" not in c.format_table(rows[:1], "optimizer", 3.28)


def test_steps_after_a_resume_are_warm_up(tmp_path):
    """The trainer leaves the first 10 steps after a resume out of train_time (compile); their opt ms (a 1000 ms
    compile here) stays out of opt_ms, its split and collect_ms too."""
    refresh = lambda s: (s - 1) % 4 == 0
    kw = dict(optimizer="newton_muon", n=40, gram_every=4, step_ms=lambda s: 150.0 + 24.0 * refresh(s),
              opt_ms=lambda s: 6.0 + 10.0 * refresh(s))
    whole = write_ours(tmp_path / "whole", **kw)
    path = write_ours(tmp_path, stop_at=20, **kw)
    tail = resumed_tail(whole, 20)
    frozen = [x for x in whole.read_text().splitlines() if x.startswith("step:20/40 train")][0].split()[2]
    tail = [(" ".join([x.split()[0], x.split()[1], frozen, x.split()[3], "opt_ms:1000.00"])
             if x.startswith("step:") and "train_loss" in x and 20 < step_of(x) <= 30 else x) for x in tail]
    path.write_text(path.read_text() + "\n".join(tail) + "\n")
    run, ref = c.parse_record(path), c.parse_record(whole)
    assert run.resumed_at == [20] and run.complete
    kept = [s for s in range(11, 41) if not 20 < s <= 30]
    assert run.opt_ms == pytest.approx(sum(6.0 + 10.0 * refresh(s) for s in kept) / len(kept))
    assert run.opt_ms_split == pytest.approx((6.0, 16.0)) and ref.opt_ms_split == pytest.approx((6.0, 16.0))
    assert run.collect_ms == pytest.approx(3.5) and ref.collect_ms == pytest.approx(3.5)


def test_incomplete_runs_show_their_timing(tmp_path, capsys):
    """A run cut off (here after step 31 of 40, e.g. by a time limit) is listed apart with the speed it measured over the
    steps it logged: step_avg, opt ms with its plain/refresh split and collect ms (feature-gram)."""
    refresh = lambda s: (s - 1) % 4 == 0
    path = write_ours(tmp_path, optimizer="newton_muon", n=40, gram_every=4, tag="cut", stop_at=30,
                      step_ms=lambda s: 150.0 + 24.0 * refresh(s), opt_ms=lambda s: 6.0 + 10.0 * refresh(s))
    run = c.parse_record(path)
    assert not run.complete and run.collect_ms == pytest.approx(3.5)
    assert c.main([str(path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if str(path) in x)
    assert f"reached step {run.last_step}/40" in line and f"step_avg {run.step_avg:.2f}ms" in line
    assert f"opt ms {run.opt_ms:.2f} (6.00, 16.0)" in line and "collect ms 3.50" in line


def test_mfu_column_and_optimizer_ms_over_a_baseline(tmp_path, capsys):
    """The trainer's matmul line gives each run's MFU (its mean per group in an MFU column); --baseline adds each
    group's optimizer (+ collect) ms over the baseline group's; a baseline that is not a group is one error line."""
    for i, rate in enumerate((800.0, 400.0)):
        write_ours(tmp_path, optimizer="muon", tag=f"m{i}", seed=i, matmul=rate, opt_ms=lambda s: 5.0)
    write_ours(tmp_path, optimizer="adamw", tag="a", opt_ms=lambda s: 1.25)  # no matmul line (a CPU run)
    runs = [c.parse_record(p) for p in sorted(tmp_path.glob("*.txt"))]
    muon = [r for r in runs if r.optimizer == "muon"]
    # flops_per_token * 8 x 128 tokens a step / rate, over the 50 ms step
    want = [100 * t.flops_per_token(c_args(r)) * 8 * 128 / (rate * 1e12) * 1e3 / 50.0
            for r, rate in zip(muon, (800, 400))]
    assert [r.mfu for r in muon] == pytest.approx(want, abs=0.05)
    assert [r.mfu for r in runs if r.optimizer == "adamw"] == [None]
    assert c.main([str(tmp_path), "--baseline", "adamw"]) == 0
    out = capsys.readouterr().out
    head, _, *rows = out.splitlines()[:4]
    assert "MFU" in head and "over adamw ms" in head
    row = next(x for x in rows if x.startswith("muon"))
    assert f"{np.mean([r.mfu for r in muon]):.1f}%" in row and "+3.75" in row
    assert "+0.00" in next(x for x in rows if x.startswith("adamw"))
    assert c.main([str(tmp_path), "--baseline", "sgd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: baseline 'sgd'") and "adamw, muon" in err[0]


def c_args(run) -> t.Hyperparameters:
    return t.Hyperparameters(**run.hyperparameters)


# ----------------------------------------------------------------------------- upstream logs by optimizer

# short stand-ins for the code upstream logs carry: what each trainer builds (and what it defines but does not use)
ORTHOGONAL_NESTEROV = """class OrthogonalNesterov(torch.optim.Optimizer):
    pass
def zeroth_power_via_newtonschulz5(G, steps=5, eps=1e-7):
    pass
optimizer = CombinedOptimizer([
    torch.optim.AdamW(self.lm_head.parameters(), lr=learning_rate, betas=betas, weight_decay=0),
    OrthogonalNesterov(self.transformer.h.parameters(), lr=10 * learning_rate, momentum=0.95)
])
"""
SOAP_FORK = """from soap import SOAP
class OrthogonalNesterov(torch.optim.Optimizer):
    pass
optimizer = CombinedOptimizer([
    torch.optim.AdamW(self.lm_head.parameters(), lr=0.0018, betas=betas, weight_decay=0),
    SOAP(self.transformer.h.parameters(), lr=learning_rate, betas=(.95, .95), precondition_frequency=10)
    #OrthogonalNesterov(self.transformer.h.parameters(), lr=10 * learning_rate, momentum=0.95)
])
"""
ADAMW_ONLY = "optimizer = torch.optim.AdamW(model.parameters(), lr=0.0018, betas=(0.9, 0.95))\n"
NO_OPTIMIZER = "import torch\nprint('hello')\n"


def upstream_with(path: Path, source: str, final: float) -> Path:
    """write_upstream with `source` as the code the log carries."""
    write_upstream(path, final=final)
    path.write_text(path.read_text().replace(UPSTREAM_SOURCE, source, 1))
    return path


@pytest.mark.parametrize("source,optimizer", [(UPSTREAM_SOURCE, "upstream-muon"),
                                              (ORTHOGONAL_NESTEROV, "upstream-muon"), (SOAP_FORK, "upstream-soap"),
                                              (ADAMW_ONLY, "upstream-adamw"),
                                              (UPSTREAM_SOURCE + SOAP_FORK, "upstream-muon+soap"),
                                              (NO_OPTIMIZER, None), ("", None)])
def test_upstream_optimizer_is_what_the_code_builds(source, optimizer):
    """Built, not defined: the SOAP fork defines OrthogonalNesterov and builds SOAP (its OrthogonalNesterov call
    commented out); b9979e6 builds OrthogonalNesterov, current upstream Muon; AdamW alone is adamw."""
    assert c.upstream_optimizer(source) == optimizer


def test_upstream_folder_lists_runs_by_optimizer_and_names_what_it_skipped(tmp_path, capsys):
    """A folder of upstream logs: SOAP and Muon runs are separate groups (the SOAP fork also defines Muon's class);
    logs whose code builds no known optimizer, and old `s:N tel:X` .log files inside the folders, are one row per
    file; a .log that is not an old log is skipped and named, other files are counted by kind."""
    up = tmp_path / "upstream"
    upstream_with(up / "100424_Muon" / "a.txt", ORTHOGONAL_NESTEROV, 3.28)
    upstream_with(up / "101024_Muon" / "b.txt", UPSTREAM_SOURCE, 3.27)
    upstream_with(up / "100524_SOAP" / "s1.txt", SOAP_FORK, 3.31)
    upstream_with(up / "100524_SOAP" / "s2.txt", SOAP_FORK, 3.32)
    upstream_with(up / "misc" / "x.txt", NO_OPTIMIZER, 3.40)
    upstream_with(up / "misc" / "y.txt", NO_OPTIMIZER, 3.41)
    write_upstream_old(up / "2024-06-06_llmc" / "main.log", final=3.29)
    (up / "misc" / "stdout.log").write_text("step:1/10 train_time:3ms step_avg:3.00ms\n")
    (up / "misc" / "README.md").write_text("# notes\n")
    (up / "misc" / "curve.png").write_bytes(b"\x89PNG")
    assert c.main([str(up)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line.split() for line in out.split("\n\n")[0].splitlines()[2:]}
    assert set(rows) == {"upstream-muon", "upstream-soap", "? misc/x.txt", "? misc/y.txt",
                         "? 2024-06-06_llmc/main.log"}
    assert rows["upstream-muon"][1] == "2" and rows["upstream-muon"][2:5] == [f"{np.mean([3.28, 3.27]):.4f}", "±",
                                                                              f"{np.std([3.28, 3.27], ddof=1):.4f}"]
    assert rows["upstream-soap"][1] == "2" and rows["? 2024-06-06_llmc/main.log"][2] == "1"
    w = c.welch([3.28, 3.27], [3.31, 3.32])
    assert f"upstream-muon - upstream-soap: {w['diff']:+.4f}" in out
    assert f"skipped 1 .log file(s) under the folders, not `s:N tel:X` logs (read only when named): " \
           f"{up / 'misc' / 'stdout.log'}" in out
    assert "not read, under the folders (neither .txt nor .log): 1 .md, 1 .png" in out


# ----------------------------------------------------------------------------- Welch's tests between groups


def three_groups(folder: Path) -> dict[str, list[float]]:
    finals = {"adamw": [3.40, 3.41, 3.43], "muon": [3.30, 3.31, 3.29], "soap": [3.305, 3.32, 3.28]}
    for opt, losses in finals.items():
        for i, loss in enumerate(losses):
            write_ours(folder, optimizer=opt, seed=i, final=loss, tag=f"{opt}{i}")
    return finals


def test_welch_of_every_pair_says_whether_they_differ(tmp_path, capsys):
    """Three groups: one Welch line per pair (scipy's numbers), `differ at 95%` exactly where p < 0.05; the table
    gives n and mean ± std per group."""
    finals = three_groups(tmp_path)
    assert c.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for opt, losses in finals.items():
        row = next(line for line in out.splitlines() if line.startswith(opt + " ")).split()
        assert row[1:5] == ["3", f"{np.mean(losses):.4f}", "±", f"{np.std(losses, ddof=1):.4f}"]
    pairs = [("adamw", "muon"), ("adamw", "soap"), ("muon", "soap")]
    lines = [line.strip() for line in out.splitlines() if " - " in line and "Welch" in line]
    assert len(lines) == 3
    for (a, b), line in zip(pairs, lines):
        p = stats.ttest_ind(finals[a], finals[b], equal_var=False).pvalue
        assert line.startswith(f"{a} - {b}: {np.mean(finals[a]) - np.mean(finals[b]):+.4f}") and f"p={p:.3g}" in line
        assert line.endswith("differ at 95%" if p < 0.05 else "not told apart at 95%")
    assert lines[0].endswith(": differ at 95%") and lines[2].endswith("not told apart at 95%")
    assert "order flipped in 0 of 9 run pairs" in lines[0]  # every adamw run above every muon run
    assert "order flipped in 4 of 9 run pairs" in lines[2]  # muon's 3.30, 3.31 (twice), 3.29 above soap's runs


def test_welch_against_a_baseline_and_too_many_groups(tmp_path, capsys):
    """--baseline: each other group against it (baseline second), even where it has no optimizer ms; more than
    MAX_ALL_PAIRS groups without one: a line asking for it."""
    three_groups(tmp_path)
    assert c.main([str(tmp_path), "--baseline", "muon"]) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines() if " - " in line and "Welch" in line]
    assert [line.split(":")[0] for line in lines] == ["adamw - muon", "soap - muon"]
    assert "Welch's t-test against muon:" in out and "over muon ms" not in out  # no opt_ms in these records
    for i in range(c.MAX_ALL_PAIRS + 1):
        write_ours(tmp_path / "many", label=f"g{i}", seed=0, tag=f"g{i}")
        write_ours(tmp_path / "many", label=f"g{i}", seed=1, tag=f"h{i}")
    assert c.main([str(tmp_path / "many"), "--by", "label"]) == 0
    out = capsys.readouterr().out
    assert "7 groups: pass --baseline GROUP for Welch's t-test of each against it" in out and " - g" not in out


def test_at_a_step_counts_every_run_that_logged_a_val_loss_there(tmp_path, capsys):
    """--at 30: the val loss logged at step 30 of each run, runs cut later included; a run cut before 30 is
    listed as incomplete; the table says step 30 and the Welch line names it."""
    finals = {"m0": 3.27, "m1": 3.29}
    for tag, final in finals.items():
        write_ours(tmp_path, optimizer="muon", final=final, tag=tag)
    write_ours(tmp_path, optimizer="muon", final=3.31, stop_at=33, tag="cut33")
    early = write_ours(tmp_path, optimizer="muon", final=3.25, stop_at=23, tag="cut23")
    write_ours(tmp_path, optimizer="adamw", final=3.4, tag="a0")
    write_ours(tmp_path, optimizer="adamw", final=3.5, tag="a1")
    assert c.main([str(tmp_path), "--at", "30"]) == 0
    out = capsys.readouterr().out
    at30 = [val_curve(30, 40, f) for f in (3.27, 3.29, 3.31)]
    muon = next(line for line in out.splitlines() if line.startswith("muon ")).split()
    assert muon[1:5] == ["3", f"{np.mean(at30):.4f}", "±", f"{np.std(at30, ddof=1):.4f}"] and muon[6] == "30"
    assert "val loss at step 30, Welch's t-test" in out
    assert f"{early} [muon]: reached step 24/40" in out
    assert c.main([str(tmp_path)]) == 0  # without --at: the final val loss of the two complete runs
    muon = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("muon ")).split()
    assert muon[1] == "2"
