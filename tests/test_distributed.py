"""World size: 2 processes under torchrun (gloo) compute what 1 process with accumulation 2 computes."""
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, subprocess_env

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+)", re.M)


def run(tiny_args, tmp_path, nproc, name, extra=()):
    out = tmp_path / f"{name}.pt"
    records = tmp_path / name
    args = tiny_args + ["--records_dir", str(records), *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    r = subprocess.run(launcher + [str(REPO / "tests" / "run_train.py")] + args, capture_output=True, text=True,
                       env=dict(subprocess_env(), FINAL_PARAMS=str(out)), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    (record,) = records.glob("*.txt")
    text = record.read_text()
    assert f"world_size: {nproc}\n" in text
    assert f"accumulation {2 // nproc}," in text
    return [float(v) for _, v in STEP.findall(text)], torch.load(out), text


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_two_processes_equal_one_with_accumulation(tiny_args, tmp_path, optimizer):
    extra = ["--optimizer", optimizer, "--val_loss_every", "2"]
    losses1, params1, text1 = run(tiny_args, tmp_path, 1, "one", extra)
    losses2, params2, text2 = run(tiny_args, tmp_path, 2, "two", extra)
    assert len(losses1) == len(losses2) == 5
    assert losses1 == pytest.approx(losses2, abs=2e-4)  # printed with 4 decimals
    for k in params1:
        torch.testing.assert_close(params2[k], params1[k], rtol=1e-4, atol=1e-5)
    assert params1.keys() == params2.keys()
    val = re.compile(r"val_loss:([\d.]+)")
    assert val.findall(text1) == val.findall(text2)
