"""Adding a rule is one place: LION below, written into one spot of a copy of train_gpt2.py (before the AdamW
declaration, nothing else edited), is an `--optimizer` at once: its settings are command-line settings under
their flat names, checked before anything is built, written into the record and the checkpoints, and its state
(momentum buffers) saved and resumed. README's "Adding an optimizer" shows the same class."""
import difflib
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, subprocess_env

# Lion (Chen et al. 2023, arXiv:2302.06675) on the block matrices, as a user would add it
LION = '''
@optimizer("lion")
class Lion(MatrixOptimizer):
    """Lion (Chen et al. 2023): p = (1 - lr wd) p - lr sign(b1 m + (1-b1) G); m = b2 m + (1-b2) G"""
    settings = dict(
        lr=positive("lion_lr", 1e-4, "step size"),
        betas=betas("lion_betas", (0.9, 0.99), "b1 of the step's sign, b2 of the momentum"),
        weight_decay=nonnegative("lion_weight_decay", 0.0, "decoupled weight decay"),
    )

    def update(self, params, group):
        (b1, b2), lr = group["betas"], group["lr"]
        grads, bufs = self.gradients(params, group), self.momentum_buffers(params)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, [torch.lerp(g, m, b1).sign() for g, m in zip(grads, bufs)],
                            alpha=-lr)
        torch._foreach_lerp_(bufs, grads, 1 - b2)

'''
SPOT = '\n\n@optimizer("adamw")\n'  # the rule goes right before the AdamW declaration


@pytest.fixture(scope="module")
def with_lion(tmp_path_factory) -> Path:
    """A copy of train_gpt2.py with LION inserted at SPOT and nothing else changed."""
    source = (REPO / "train_gpt2.py").read_text()
    assert source.count(SPOT) == 1
    path = tmp_path_factory.mktemp("with_lion") / "train_gpt2.py"
    path.write_text(source.replace(SPOT, "\n" + LION + SPOT[1:]))
    return path


def test_the_rule_is_one_insertion_of_at_most_30_lines(with_lion):
    old, new = (REPO / "train_gpt2.py").read_text().splitlines(), with_lion.read_text().splitlines()
    changes = [op for op in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
               if op[0] != "equal"]
    assert [op[0] for op in changes] == ["insert"]
    tag, i1, i2, j1, j2 = changes[0]
    assert sum(1 for line in new[j1:j2] if line.strip()) <= 30


def test_the_readme_shows_this_rule():
    assert textwrap.indent(LION.strip("\n"), "    ") in (REPO / "README.md").read_text()


def load(path: Path):
    spec = importlib.util.spec_from_file_location("train_gpt2_with_lion", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_rule_is_declared_everywhere_and_steps_as_lion(with_lion):
    """--optimizer lion, its settings in Hyperparameters and the command line, each refused out of range, and
    three steps equal to the formula in float64."""
    t = load(with_lion)
    assert "lion" in t.OPTIMIZERS
    args = t.parse_args(["--optimizer", "lion", "--lion_lr", "0.001", "--lion_betas", "0.8,0.9"])
    t.check_optimizer_args(args)
    assert (args.lion_lr, args.lion_betas, args.lion_weight_decay) == (0.001, (0.8, 0.9), 0.0)
    for setting, value in (("lion_lr", "-1"), ("lion_betas", "0.9,1.5"), ("lion_weight_decay", "-0.1")):
        with pytest.raises(SystemExit, match=f"--{setting}: must be"):
            t.check_optimizer_args(t.parse_args(["--optimizer", "lion", f"--{setting}", value]))

    gen = torch.Generator().manual_seed(0)
    p0 = [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    gs = [[torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in p0] for _ in range(3)]
    ps = [p.clone() for p in p0]
    opt = t.OPTIMIZERS["lion"](ps, lr=0.01, betas=(0.8, 0.9), weight_decay=0.1)
    want, m = [p.clone() for p in p0], [torch.zeros_like(p) for p in p0]
    for g in gs:
        for p, gi in zip(ps, g):
            p.grad = gi
        opt.step()
        for k, gi in enumerate(g):
            want[k] = want[k] * (1 - 0.01 * 0.1) - 0.01 * torch.sign(0.8 * m[k] + 0.2 * gi)
            m[k] = 0.9 * m[k] + 0.1 * gi
    for p, w in zip(ps, want):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-12)


def run(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script)] + args, capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


@pytest.mark.slow
def test_the_rule_trains_is_refused_recorded_saved_and_resumed(with_lion, tiny_args, tmp_path):
    """The trainer with LION: a bad setting refused with one line; a run whose record names the optimizer and
    its settings; a run stopped at step 3, then resumed from its checkpoint (the momentum buffers), ends with
    the uninterrupted run's parameters."""
    lion = ["--optimizer", "lion", "--lion_lr", "0.0003", "--lion_betas", "0.9,0.95"]
    refused = run(with_lion, tiny_args + ["--optimizer", "lion", "--lion_lr", "0"])
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == "--lion_lr: must be positive and finite, got 0.0"

    whole = run(with_lion, tiny_args + lion)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (record,) = (tmp_path / "records").glob("*-lion-*.txt")
    text = record.read_text()
    settings = json.loads(re.search(r"^hyperparameters: (.*)$", text, re.M).group(1))
    assert (settings["optimizer"], settings["lion_lr"], settings["lion_betas"]) == ("lion", 0.0003, [0.9, 0.95])
    assert 'class Lion(MatrixOptimizer)' in text  # the record's copy of the source
    assert re.search(r"^step:5/5 val_loss:", text, re.M)

    chain = tmp_path / "chain"
    first = run(with_lion, tiny_args + lion + ["--records_dir", str(chain), "--stop_at", "3"])
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = (chain / "checkpoints").iterdir()
    meta = json.loads((run_dir / "step_000003" / "meta.json").read_text())
    assert (meta["args"]["optimizer"], meta["args"]["lion_lr"]) == ("lion", 0.0003)
    state = torch.load(run_dir / "step_000003" / "rank0.pt", weights_only=True)["optimizers"][1]
    assert len(state) == 8 and all(set(s) == {"momentum_buffer"} for s in state.values())
    resumed = run(with_lion, ["--resume", "latest", "--records_dir", str(chain)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    digest = re.compile(r"^params_sha256: (\w+)$", re.M)
    (chained,) = chain.glob("*-lion-*.txt")  # the stopped run's lines, then the resumed run's
    assert digest.findall(chained.read_text())[-1] == digest.findall(text)[-1]
