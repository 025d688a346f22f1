"""World size: 2 processes under torchrun (gloo) compute what 1 process with accumulation 2 computes."""
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DRIVERS, REPO, TINY, make_shards, subprocess_env, train_here

sys.path.insert(0, str(REPO / "records"))
import compare  # noqa: E402

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([\d.]+)", re.M)


def torchrun(nproc: int, args: list[str], params: Path) -> str:
    """tests/drivers/train_save_params.py under torchrun (gloo; 1 process: alone): the record's
    text; the final parameters saved to `params`."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = dict(subprocess_env(), FINAL_PARAMS=str(params))
    r = subprocess.run(launcher + [str(DRIVERS / "train_save_params.py")] + args,
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    (record,) = Path(args[len(args) - 1 - args[::-1].index("--records_dir") + 1]).glob("*.txt")  # the last one given
    return record.read_text()


@pytest.fixture(scope="module")
def adamw_runs(tmp_path_factory):
    """AdamW on the tiny model for 12 steps (val every 2) on 1 process with accumulation 2 and on 2 processes:
    {nproc: (train losses, final parameters, record text, record path)}."""
    root = tmp_path_factory.mktemp("adamw")
    train, val = make_shards(root / "shards")
    args = TINY + ["--input_bin", train, "--input_val_bin", val, "--optimizer", "adamw", "--num_iterations", "12",
                   "--val_loss_every", "2"]
    runs = {n: (torchrun(n, args + ["--records_dir", str(root / f"w{n}")], root / f"w{n}.pt"),
                torch.load(root / f"w{n}.pt")) for n in (1, 2)}
    out = {}
    for nproc, (text, params) in runs.items():
        assert f"world_size: {nproc}\n" in text and f"accumulation {2 // nproc}," in text
        (record,) = (root / f"w{nproc}").glob("*.txt")
        out[nproc] = [float(v) for _, v in STEP.findall(text)], params, text, record
    return out


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(adamw_runs):
    """2 processes (gloo, one node) train what 1 process with accumulation 2 trains: train and val losses, parameters
    (Muon: test_run_sh_on_two_nodes_equals_one_process_with_accumulation, 2 nodes x 1 process)."""
    (losses1, params1, text1, _), (losses2, params2, text2, _) = adamw_runs[1], adamw_runs[2]
    assert len(losses1) == len(losses2) == 12
    assert losses1 == pytest.approx(losses2, abs=2e-4)  # printed with 4 decimals
    for k in params1:
        torch.testing.assert_close(params2[k], params1[k], rtol=1e-4, atol=1e-5)
    assert params1.keys() == params2.keys()
    val = re.compile(r"^step:(\d+)/12 val_loss:([\d.]+)", re.M)
    assert val.findall(text1) == val.findall(text2) and len(val.findall(text1)) == 7


@pytest.mark.slow
def test_matmul_check_before_and_after_training_on_one_and_two_processes(adamw_runs):
    """Before training and after the timed steps (past the 10 warm-up steps) every process times a matmul on its
    device (CPU: 512^3 fp32); the record gets both mean rates and MFU = floor / step_avg, floor = model FLOPs a step
    / (W x the larger rate)."""
    line = re.compile(r"^matmul: 512\^3 float32 \(cpu(, mean of 2)?; ([\d.]+) before training, ([\d.]+) after: the "
                      r"larger\) ([\d.]+) TFLOP/s per device, mfu: ([\d.]+)% \(floor ([\d.]+) ms a step, step_avg "
                      r"([\d.]+) ms\)$", re.M)
    for nproc in (1, 2):
        *_, text, record = adamw_runs[nproc]
        m = line.search(text)
        assert m and bool(m[1]) == (nproc == 2), text[-600:]
        assert float(m[4]) == max(float(m[2]), float(m[3])) > 0  # the rate used: the larger of the two timings
        mfu, floor, step_avg = float(m[5]), float(m[6]), float(m[7])
        assert floor > 0 and mfu == pytest.approx(100 * floor / step_avg, rel=0.01, abs=0.06)  # floor: 0.1 ms
        assert "step:12/12 val_loss" in text and f"step_avg:{step_avg:.2f}ms" in text
        assert compare.parse_record(record).mfu == mfu  # records/compare.py reads the same line


@pytest.mark.slow
def test_four_processes_equal_one_within_rounding_noise(tiny_args, tmp_path):
    """4 processes (gloo, device batch 1) against 1 process with accumulation 4, Muon: a 4-way all-reduce sums the
    gradients in another order than accumulation does, and bf16 Newton-Schulz amplifies that rounding; so the
    difference must stay within the noise between two 1-process runs that differ only in summation order
    (accumulation 4 vs 2), and far below one step's change (lr 0.018)."""
    runs = {}
    for nproc, device_batch in ((1, 1), (1, 2), (4, 1)):
        args = tiny_args + ["--records_dir", str(tmp_path / f"r{nproc}{device_batch}"), "--device_batch_size",
                            str(device_batch)]
        if nproc == 1:
            path, model = train_here(args)
            text = Path(path).read_text()
            params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            text = torchrun(nproc, args, tmp_path / f"p{nproc}.pt")
            params = torch.load(tmp_path / f"p{nproc}.pt")
        assert f"world_size: {nproc}\n" in text and f"accumulation {4 // (nproc * device_batch)}," in text
        runs[nproc, device_batch] = [float(v) for _, v in STEP.findall(text)], params
    (ref_loss, ref), (noise_loss, noise), (four_loss, four) = runs[1, 1], runs[1, 2], runs[4, 1]
    assert len(four_loss) == 5 and four_loss[0] == ref_loss[0]  # step 1: no optimizer step has happened yet
    assert max(abs(a - b) for a, b in zip(four_loss, ref_loss)) <= 3 * max(abs(a - b) for a, b in
                                                                           zip(noise_loss, ref_loss)) + 2e-4
    for k in ref:
        d4, dn = (four[k] - ref[k]).abs().max().item(), (noise[k] - ref[k]).abs().max().item()
        assert d4 <= 3 * dn + 1e-6 and d4 < 0.01, (k, d4, dn)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_optimizer_work_splits_evenly_over_processes(world):
    """GPT-124M's 48 block matrices over W processes: the busiest process's share of the optimizer cost (m n min(m, n)
    per matrix) is within 1% of 1/W, so the optimizer time per step falls about W-fold."""
    import train_gpt2 as t
    model = t.GPT(t.parse_args(["--vocab_size", "64"]))
    costs = [t.MatrixOptimizer.cost(p) for p in model.transformer.h.parameters()]
    owner = t.assign_owners(costs, world)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(world)]
    assert len(costs) == 48 and set(owner) == set(range(world))
    assert max(loads) <= 1.01 * sum(costs) / world, loads  # measured: exactly 1/W for W = 1, 2, 4, 8
    assert owner == t.assign_owners(costs, world)  # deterministic


def run_sh(args, env, **kw):
    """./run.sh as a user starts it, on the CPU (CUDA hidden)."""
    return subprocess.Popen(["bash", str(REPO / "run.sh"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(subprocess_env(), CUDA_VISIBLE_DEVICES="", **env), **kw)


def finished(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def record_and_model(records):
    """The one record under records/ (losses, text) and the model of its final checkpoint."""
    (record,) = records.glob("*.txt")
    (ckpt,) = (records / "checkpoints").glob("*/step_*")
    text = record.read_text()
    return [float(v) for _, v in STEP.findall(text)], text, torch.load(ckpt / "main.pt")["model"]


@pytest.mark.slow
def test_run_sh_on_two_nodes_equals_one_process_with_accumulation(tiny_args, tmp_path):
    """run.sh without a GPU says so and runs the smoke preset (here overridden by the tiny settings) in one process;
    with NNODES=2 NODE_RANK=0/1 MASTER_ADDR/MASTER_PORT it starts torchrun's static rendezvous: 2 "nodes" x 1 gloo
    process on localhost train what 1 process with accumulation 2 trains (train and val losses, final parameters)."""
    extra = ["--optimizer", "muon", "--val_loss_every", "2", "--final_checkpoint", "1"]  # the smoke preset saves none
    out = finished(run_sh(tiny_args + extra + ["--records_dir", str(tmp_path / "one")], {}))
    assert out.splitlines()[0].startswith("run.sh: no CUDA GPU found: running the smoke preset on the CPU")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [run_sh(tiny_args + extra + ["--records_dir", str(tmp_path / "two")],
                    dict(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in (0, 1)]
    for node in nodes:
        finished(node)
    losses1, text1, params1 = record_and_model(tmp_path / "one")
    losses2, text2, params2 = record_and_model(tmp_path / "two")
    assert '"preset": "smoke"' in text1 and "world_size: 1\n" in text1 and "accumulation 2," in text1
    assert "world_size: 2\n" in text2 and "accumulation 1," in text2
    assert len(losses1) == len(losses2) == 5
    assert losses1 == pytest.approx(losses2, abs=2e-4)  # printed with 4 decimals
    val = re.compile(r"^step:(\d+)/5 val_loss:([\d.]+)", re.M)
    assert val.findall(text1) == val.findall(text2) and [s for s, _ in val.findall(text1)] == ["0", "2", "4", "5"]
    assert params1.keys() == params2.keys()
    for k in params1:
        torch.testing.assert_close(params2[k], params1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("env, message", [
    (dict(NNODES="2", NODE_RANK="0"), "NNODES=2 needs MASTER_ADDR"),
    (dict(NNODES="2", MASTER_ADDR="127.0.0.1"), "NNODES=2 needs NODE_RANK, this node's number: 0 .. 1"),
    (dict(NNODES="2", NODE_RANK="2", MASTER_ADDR="127.0.0.1"), "NNODES=2 needs NODE_RANK, this node's number: 0 .. 1 (got '2')"),
    (dict(NNODES="two"), "NNODES=two: must be a positive number"),
    (dict(NGPU="0"), "NGPU=0: must be a positive number"),
])
def test_run_sh_refuses_incomplete_node_settings(env, message):
    """A bad node or process count stops run.sh before anything starts: one line naming the variable, exit status 2."""
    proc = run_sh(["--preset", "smoke"], env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and len(out.splitlines()) == 1 and out.startswith(f"run.sh: {message}"), out
