"""The feature-gram optimizers inside the training loop: C refreshed at every gram_every-th step (shifted by
gram_phase), normalized by the step's tokens (all micro-batches), kept as an EMA with gram_beta; Cholesky fallbacks
written to the record."""
import subprocess
import sys

import pytest
import torch

import train_gpt2 as t
from conftest import DRIVERS, REPO, subprocess_env
from drivers import train_indefinite_gram

LOOP = ["--optimizer", "newton_muon", "--num_iterations", "5", "--gram_every", "2"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest


def test_refresh_every_gram_every_steps_with_the_steps_tokens_and_the_ema(small_vocab_args, tmp_path, monkeypatch):
    """5 steps, gram_every 2, 2 micro-batches a step, gram_beta 0.5: refresh_gram runs before the updates of steps
    0, 2, 4 with n_tokens = the step's 4 x 32 tokens; C of the normed inputs (c_attn, c_fc: rows of norm sqrt(d)) has
    tr(C)/d = 1, so the sums cover both micro-batches and are divided by the step's tokens; each C is
    0.5 C_before + 0.5 sums / n_tokens (the first: sums / n_tokens), and differs from the one before."""
    steps, seen = [], []  # the loop's steps so far (lr_multiplier is called once a step, after the refresh)
    real_refresh, real_multiplier = t.FeatureGram.refresh_gram, t.lr_multiplier

    def refresh(self, n_tokens, stream=None):
        ps = self._params()
        sums = [self.layers[id(p)].gram.double().clone() for p in ps]
        before = [self.state[p]["gram"].double().clone() if "gram" in self.state[p] else None for p in ps]
        real_refresh(self, n_tokens, stream)
        seen.append((len(steps), n_tokens, sums, before, [self.state[p]["gram"].double().clone() for p in ps]))

    monkeypatch.setattr(t.FeatureGram, "refresh_gram", refresh)
    monkeypatch.setattr(t, "lr_multiplier", lambda it, args: steps.append(it) or real_multiplier(it, args))
    t.train(t.parse_args(small_vocab_args + LOOP + ["--gram_beta", "0.5", "--records_dir", str(tmp_path)]))
    assert [s[0] for s in seen] == [0, 2, 4] and steps == [0, 1, 2, 3, 4]
    for _, n_tokens, sums, before, after in seen:
        assert n_tokens == 4 * 32
        for i in (0, 2, 4, 6):  # c_attn and c_fc of both blocks: inputs rms_norm(x) (its eps: 1 - 2e-4)
            assert (sums[i].diagonal().mean() / n_tokens).item() == pytest.approx(1.0, abs=1e-3)
        for s, b, a in zip(sums, before, after):
            want = s / n_tokens if b is None else 0.5 * b + 0.5 * s / n_tokens
            torch.testing.assert_close(a, want, rtol=1e-6, atol=1e-7)
            assert b is None or (a - b).norm() > 1e-3 * a.norm()


def test_gram_phase_moves_the_refreshes(small_vocab_args, tmp_path, monkeypatch):
    """gram_every 2, gram_phase 1 (the Newton-Muon paper's (step + 1) % every == 0): refresh_gram runs before the
    updates of steps 1 and 3 of 5, not at step 0."""
    steps, seen = [], []
    real_refresh, real_multiplier = t.FeatureGram.refresh_gram, t.lr_multiplier
    monkeypatch.setattr(t.FeatureGram, "refresh_gram",
                        lambda self, n_tokens, stream=None: seen.append(len(steps)) or real_refresh(self, n_tokens,
                                                                                                 stream))
    monkeypatch.setattr(t, "lr_multiplier", lambda it, args: steps.append(it) or real_multiplier(it, args))
    t.train(t.parse_args(small_vocab_args + LOOP + ["--gram_phase", "1", "--records_dir", str(tmp_path)]))
    assert seen == [1, 3] and steps == [0, 1, 2, 3, 4]


def fallback_lines(record_dir) -> list[str]:
    (record,) = record_dir.glob("*.txt")
    return [line for line in record.read_text().splitlines() if line.startswith("gram_fallbacks:")]


def test_cholesky_fallbacks_are_written_to_the_record(small_vocab_args, tmp_path, monkeypatch):
    """C of the first layer made indefinite at every refresh (drivers/train_indefinite_gram.py):
    each refresh step's record has a gram_fallbacks line naming the one matrix redone with 10x the
    damping; without it, no such line."""
    monkeypatch.setattr(train_indefinite_gram, "LAYERS", [0])
    monkeypatch.setattr(t.GPT, "collect_gram", train_indefinite_gram.collect_gram)
    t.train(t.parse_args(small_vocab_args + LOOP + ["--records_dir", str(tmp_path / "bad")]))
    assert fallback_lines(tmp_path / "bad") == [
        f"gram_fallbacks: step:{s}/5 1 of 8 matrices failed the Cholesky of C + damping I and were refactored with "
        "more damping: x10: 1, x100: 0, x1000: 0" for s in (1, 3, 5)]
    monkeypatch.undo()
    t.train(t.parse_args(small_vocab_args + LOOP + ["--records_dir", str(tmp_path / "good")]))
    assert fallback_lines(tmp_path / "good") == []


@pytest.mark.slow
def test_two_processes_count_every_processs_fallbacks(small_vocab_args, tmp_path):
    """Every block layer's C made indefinite: 2 processes under torchrun (each factoring the matrices it owns) write
    the same gram_fallbacks lines as 1 process, the counts summed over both."""
    lines = {}
    for nproc in (1, 2):
        launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                                       if nproc == 2 else [])
        out = tmp_path / str(nproc)
        env = dict(subprocess_env(), INDEFINITE=",".join(map(str, range(8))))
        r = subprocess.run(launcher + [str(DRIVERS / "train_indefinite_gram.py")] + small_vocab_args
                           + LOOP + ["--records_dir", str(out)], capture_output=True, text=True,
                           cwd=REPO, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        lines[nproc] = fallback_lines(out)
    assert len(lines[1]) == 3 and all(" 8 of 8 matrices" in line for line in lines[1]), lines[1]
    assert lines[2] == lines[1]
