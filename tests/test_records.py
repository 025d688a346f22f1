"""Records: a smoke run on the shipped sample writes a new record whose lines parse back to the logged numbers."""
import json
import re
import subprocess
import sys

import pytest

import train_gpt2 as t
from conftest import REPO, subprocess_env, train_here

LINE = re.compile(r"^step:(\d+)/(\d+) (val_loss|train_loss):([\d.]+) train_time:(\d+)ms step_avg:([\d.]+|nan)ms",
                  re.M)


@pytest.mark.slow
def test_smoke_run_writes_a_record(tmp_path):
    """The smoke model on the shipped sample, 12 steps (the first 10 untimed) of 4 sequences, val on 2048 tokens."""
    cmd = [sys.executable, str(REPO / "train_gpt2.py"), "--preset", "smoke", "--num_iterations", "12",
           "--warmdown_iters", "6", "--val_loss_every", "6", "--batch_size", "4", "--val_tokens", "2048",
           "--records_dir", str(tmp_path), "--label", "unit"]
    short = cmd[:2] + ["--preset", "smoke", "--num_iterations", "1", "--warmup_iters", "1", "--warmdown_iters", "0",
                       "--val_tokens", "1024", "--records_dir", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    train_here(short[2:])  # a second run into the same folder, in this process
    records = sorted(tmp_path.glob("*.txt"))
    assert len(records) == 2  # never overwritten
    out, text = run.stdout, next(p for p in records if p.name in run.stdout).read_text()
    assert text.startswith(t.RECORD_MARK + "\n") and open(REPO / "train_gpt2.py").read() in text
    hyper = json.loads(re.search(r"^hyperparameters: (.*)$", text, re.M).group(1))
    assert hyper == {**hyper, "preset": "smoke", "num_iterations": 12, "label": "unit", "n_layer": 2,
                     "n_embd": t.PRESETS["smoke"]["n_embd"]}
    assert t.Hyperparameters(**{k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}) == \
        t.parse_args(cmd[2:])
    assert re.search(r"^torch: \S+ cuda: \S+ python: 3\.", text, re.M)
    assert "devices: [\"cpu\"]\nworld_size: 1\n" in text
    logged, printed = LINE.findall(text), LINE.findall(out)
    assert logged == printed
    vals = [(int(s), float(v)) for s, _, kind, v, *_ in logged if kind == "val_loss"]
    assert [s for s, _ in vals] == [0, 6, 12]
    trains = [(int(s), float(v)) for s, _, kind, v, *_ in logged if kind == "train_loss"]
    assert [s for s, _ in trains] == list(range(1, 13))
    assert vals[-1][1] < vals[0][1] - 0.5  # it learns
    assert [a for *_, a in logged][:3] == ["nan", "nan", "nan"]  # the first 10 steps are not timed
    assert float(logged[-1][5]) > 0
    # every step times its optimizers (opt_ms) and, inside that, the block matrices' optimizer alone (blocks_ms)
    timers = [tuple(map(float, m)) for m in re.findall(r"^step:\d+/12 train_loss:.* opt_ms:([\d.]+) blocks_ms:([\d.]+)$",
                                                        text, re.M)]
    assert len(timers) == 12 and all(0 < b <= o for o, b in timers)
    assert text.rstrip().endswith("MiB") and "peak memory consumption:" in text.splitlines()[-1]
