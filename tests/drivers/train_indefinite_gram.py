"""train_gpt2.train with command-line settings (alone or under torchrun), where every completed Gram sum of the layers
listed in $INDEFINITE (indices into GPT.gram_layers, comma-separated) is shifted to S - 0.4 (tr(S)/d) I: C loses
0.4 tr(C)/d from every eigenvalue, so Newton-Muon's C + gamma I (gamma = 0.2 tr(C)/d, now 0.12 of the old tr(C)/d) is
indefinite wherever lambda_min(C) < 0.28 tr(C)/d, and C + 10 gamma I is positive definite."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import train_gpt2  # noqa: E402

LAYERS = [int(i) for i in os.environ.get("INDEFINITE", "0").split(",")]


def shift_indefinite(model) -> None:
    for i in LAYERS:
        S = model.gram_layers()[i].gram
        S -= 0.4 * S.diagonal().mean() * torch.eye(S.size(-1), dtype=S.dtype, device=S.device)


def collect_gram(self, on: bool, real=train_gpt2.GPT.collect_gram) -> None:
    completes = not on and any(m.collect for m in self.gram_layers())
    real(self, on)
    if completes:
        shift_indefinite(self)


if __name__ == "__main__":
    train_gpt2.GPT.collect_gram = collect_gram
    try:
        train_gpt2.train(train_gpt2.parse_args(sys.argv[1:]))
    except SystemExit as e:
        train_gpt2.exit_now(e.code)
    train_gpt2.exit_now(0)
