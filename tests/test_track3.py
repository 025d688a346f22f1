"""--model track3 / --preset track3: modded-nanogpt's optimization track
(records/track_3_optimization/train_gpt_simple.py at f411b3d) against figures its own code produced
(tests/golden/track3_*.json, made by tests/golden/make_golden.py), and against that code itself when
a copy is in .originals/ (see make_golden.py): the model's summed loss and gradients for the same
weights and tokens in fp32, the lr factor and the val steps at every step; the preset's numbers; the
gradient the optimizers get (of the summed loss, as the original's); a small run."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as t
from conftest import SMALL_VOCAB, make_shards
from data.fineweb import write_datafile

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden as mg  # noqa: E402

ORIGINALS = Path(__file__).resolve().parents[1] / ".originals"
HAVE_ORIGINAL = (ORIGINALS / mg.TRACK3_FILE).is_file()
needs_original = pytest.mark.skipif(
    not HAVE_ORIGINAL,
    reason=f"no copy of train_gpt_simple.py at "
    f"{ORIGINALS / mg.TRACK3_FILE} (KellerJordan/modded-nanogpt at f411b3d, "
    f"records/track_3_optimization/); the golden figures stand in for it",
)
LOSS_RTOL = 1e-6  # the summed loss, fp32
GRAD_RTOL = 1e-5  # each parameter's gradient norm, fp32


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def original_module():
    """train_gpt_simple.py's classes (above its Setup banner), its sha256 checked."""
    mg.check_copies(ORIGINALS, "track3_model")
    return mg.track3_module(ORIGINALS, "track3_model")


def project_name(name: str) -> str:
    """The project's name of one of train_gpt_simple.py's GPT parameters."""
    if name.startswith("blocks."):
        return "transformer.h." + name[len("blocks.") :]
    return {
        "embed.weight": "transformer.wte.weight",
        "proj.weight": "lm_head.weight",
        "proj.bias": "lm_head.bias",
        "norm1.gains": "norm_in.gains",
        "norm2.gains": "norm_out.gains",
    }[name]


def project_model(s: dict, *extra: str) -> t.Track3GPT:
    return t.Track3GPT(
        t.parse_args(
            [
                *extra,
                "--preset",
                "track3",
                "--vocab_size",
                str(s["vocab_size"]),
                "--n_layer",
                str(s["num_layers"]),
                "--n_embd",
                str(s["model_dim"]),
                "--n_head",
                str(s["model_dim"] // 128),
                "--sequence_length",
                str(s["sequence"]),
            ]
        )
    )


def project_loss_and_grads(data: dict, *extra: str) -> tuple[float, dict[str, torch.Tensor]]:
    """The project's Track3GPT (with the settings `extra`) with track3_weights (by the original's
    names) on track3_tokens: the summed loss the trainer's backward takes (mean x tokens, as
    train_step with one micro-batch) and each gradient, by the original's names."""
    s = data["settings"]
    model = project_model(s, *extra)
    weights = mg.track3_weights([(name, shape) for name, shape in data["shapes"]])
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(
        project_name(n) for n, _ in data["shapes"]
    )  # the same parameters, no more
    with torch.no_grad():
        for name, w in weights.items():
            params[project_name(name)].copy_(w)
    n = s["batch"] * s["sequence"]
    tokens = mg.track3_tokens(n, s["vocab_size"])
    x, y = tokens[:-1].view(s["batch"], s["sequence"]), tokens[1:].view(s["batch"], s["sequence"])
    loss = model(x, y) * n
    loss.backward()
    return loss.item(), {name: params[project_name(name)].grad for name, _ in data["shapes"]}


@pytest.mark.parametrize("loss_chunk", ["0", "7"])
def test_model_summed_loss_and_gradients_equal_the_golden_figures(loss_chunk):
    """Same weights, same tokens, fp32 on CPU: the summed loss within 1e-6 and every parameter's
    gradient norm within 1e-5 (relative) of what train_gpt_simple.py's GPT gave (golden:
    track3_model.json); with whole fp32 logits and with the fused loss (its soft cap and head bias)
    7 rows at a time."""
    data = golden("track3_model")
    loss, grads = project_loss_and_grads(data, "--loss_chunk", loss_chunk)
    assert abs(loss - data["loss_sum"]) <= LOSS_RTOL * abs(data["loss_sum"])
    for name, g in grads.items():
        want = data["grad_norms"][name]
        assert abs(g.double().norm().item() - want) <= GRAD_RTOL * want, name
    assert data["loss_sum"] / (
        data["settings"]["batch"] * data["settings"]["sequence"]
    ) > 1.1 * math.log(
        data["settings"]["vocab_size"]
    )  # the weights are far from a zero head (soft cap reached)


@needs_original
def test_model_summed_loss_and_gradients_equal_the_originals():
    """The same against train_gpt_simple.py's own GPT (its embedding cast to fp32): loss within
    1e-6, each gradient within 1e-5 of its norm, element by element; and the golden figures are what
    that code gives now."""
    data = golden("track3_model")
    mod, s = original_module(), data["settings"]
    model = mod.GPT(
        vocab_size=s["vocab_size"], num_layers=s["num_layers"], model_dim=s["model_dim"]
    ).float()
    weights = mg.track3_weights([(name, list(p.shape)) for name, p in model.named_parameters()])
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    n = s["batch"] * s["sequence"]
    tokens = mg.track3_tokens(n, s["vocab_size"])
    loss = model(tokens[:-1].view(s["batch"], -1), tokens[1:].view(s["batch"], -1))
    loss.backward()
    assert loss.item() == data["loss_sum"]
    mine, grads = project_loss_and_grads(data)
    assert abs(mine - loss.item()) <= LOSS_RTOL * abs(loss.item())
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).norm() <= GRAD_RTOL * p.grad.norm(), name


def test_model_init_is_the_tracks():
    """Every proj weight (attention's, the MLP's) and the head zero, the embedding N(0, 1), other
    weights N(0, 0.33 / fan_in), biases 0, gains 1 (train_gpt_simple.py's init loop); the head zero
    makes the first loss ln(vocab)."""
    torch.manual_seed(0)
    model = t.Track3GPT(t.parse_args(["--preset", "track3", "--n_layer", "2"]))
    for name, p in model.named_parameters():
        if name.endswith("gains"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias") or name.endswith("proj.weight") or name == "lm_head.weight":
            assert not p.any(), name
        else:
            std = 1.0 if name == "transformer.wte.weight" else (0.33 / p.size(1)) ** 0.5
            assert abs(p.std().item() / std - 1) < 0.01 and abs(p.mean().item()) < 0.01 * std, name
    x = torch.randint(0, 50304, (1, 16))
    assert model(x, x).item() == pytest.approx(math.log(50304), rel=1e-6)


def test_parameter_groups_are_the_tracks():
    """AdamW: the embedding at 0.7, the head at 0.004, every 1-D parameter at 0.015, betas (0.8,
    0.95), eps 1e-10, weight decay 0.001; Muon (lr 0.025, weight decay 0.05) on the blocks'
    matrices; every parameter in one group."""
    torch.manual_seed(0)
    args = t.parse_args(["--preset", "track3", "--n_layer", "2"])
    model = t.Track3GPT(args)
    adam, muon = t.build_optimizers(model, args)
    assert [g["lr"] for g in adam.param_groups] == [0.7, 0.004, 0.015]
    assert adam.param_groups[0]["params"] == [model.transformer.wte.weight]
    assert adam.param_groups[1]["params"] == [model.lm_head.weight]
    assert all(p.ndim == 1 for p in adam.param_groups[2]["params"])
    g = adam.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.95), 1e-10, 0.001)
    assert isinstance(muon, t.Muon) and len(muon.param_groups) == 1
    m = muon.param_groups[0]
    assert (
        m["lr"],
        m["weight_decay"],
        m["momentum"],
        m["nesterov"],
        m["lerp"],
        m["coeffs"],
        m["shape_scale"],
    ) == (0.025, 0.05, 0.95, True, True, "convergent", True)
    assert all(p.ndim == 2 for p in m["params"]) and len(m["params"]) == 2 * 6
    owned = [p for opt in (adam, muon) for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len(set(owned)) and set(owned) == set(model.parameters())


# the track's numbers, each with the text of train_gpt_simple.py that sets it
PRESET = [
    (
        dict(vocab_size=50304, n_layer=12, n_embd=768),
        "GPT(vocab_size=50304, num_layers=12, model_dim=768)",
    ),
    (dict(n_head=6), "def __init__(self, dim: int, head_dim=128):"),
    (dict(num_iterations=3250), "train_steps = 3250"),
    (
        dict(batch_size=512, sequence_length=1024, device_batch_size=64),
        "batch_size = 8 * 64 * 1024",
    ),
    (dict(warmup_iters=0, warmdown_iters=2275), "def set_hparams(step, cooldown_frac=0.7):"),
    (
        dict(val_loss_every=125, val_tail_every=25),
        "val_step_freq = 125 if step / train_steps < 0.9 else 25",
    ),
    (dict(val_tokens=10485760), "val_tokens = 20 * 524288"),
    (
        dict(embed_lr=0.7, head_lr=0.004, scalar_lr=0.015),
        "dict(params=[model.embed.weight], lr=0.7)",
    ),
    (
        dict(embed_betas=(0.8, 0.95), embed_eps=1e-10, embed_weight_decay=0.001),
        "betas=(0.8, 0.95), eps=1e-10, weight_decay=0.001",
    ),
    (dict(optimizer="muon", muon_lr=0.025, muon_weight_decay=0.05), "lr=0.025, weight_decay=0.05)"),
    (
        dict(muon_momentum=0.95, muon_nesterov=True, muon_lerp=True),
        "def muon_update(grad, momentum, mu=0.95, nesterov=True):",
    ),
    (dict(ns_coeffs="convergent", muon_shape_scale=True), "a, b, c = 2, -1.5, 0.5"),
]


def test_preset_holds_the_tracks_numbers():
    args = t.parse_args(["--preset", "track3"])
    for values, _ in PRESET:
        assert {k: getattr(args, k) for k in values} == values
    assert args.model == "track3" and t.NS_COEFFS["convergent"] == ([(2.0, -1.5, 0.5)] * 12, 1.0)
    assert args.batch_size * args.sequence_length == 8 * 64 * 1024
    assert args.warmdown_iters == round(0.7 * args.num_iterations)
    assert (
        t.validate_args(args, 8) == 1 and t.validate_args(args, 1) == 8
    )  # accumulation keeps the step


@needs_original
def test_preset_numbers_are_in_the_originals_code():
    text = (ORIGINALS / mg.TRACK3_FILE).read_text()
    for _, snippet in PRESET:
        assert snippet in text, snippet
    for snippet in (
        "for _ in range(12):",
        "update *= max(1, grad.size(-2) / grad.size(-1))**0.5",
        'p.mul_(1 - group["lr"] * group["weight_decay"])',
        "momentum.lerp_(grad, 1 - mu)",
        "grad.lerp_(momentum, mu)",
        "dict(params=[model.proj.weight], lr=0.004)",
        "dict(params=[p for p in model.parameters() if p.ndim < 2], lr=0.015)",
    ):
        assert snippet in text, snippet


@pytest.mark.parametrize("i", [0, 1])
def test_schedule_and_val_steps_equal_the_originals(i):
    """lr_multiplier at every step of 3250 (the track) and of 400 (the compare shape, warmdown 280)
    is set_hparams's factor, and val_due's steps are those the original's loop validates at (golden:
    track3_schedule.json)."""
    run = golden("track3_schedule")["runs"][i]
    n = run["num_iterations"]
    args = t.parse_args(
        ["--preset", "track3", "--num_iterations", str(n), "--warmdown_iters", str(round(0.7 * n))]
    )
    lr = [t.lr_multiplier(step, args) for step in range(n)]
    assert max(abs(a - b) for a, b in zip(lr, run["lr"])) <= 1e-15 and len(lr) == len(run["lr"])
    assert [step for step in range(n + 1) if t.val_due(step, args)] == run["val_steps"]


@needs_original
@pytest.mark.parametrize("name", ["track3_model", "track3_schedule"])
def test_golden_figures_are_what_the_original_gives(name):
    mg.check_copies(ORIGINALS, name)
    data = golden(name)
    if name == "track3_model":
        now = mg.original_track3_model(ORIGINALS)
        assert now["loss_sum"] == data["loss_sum"] and now["grad_norms"] == data["grad_norms"]
    else:
        assert mg.original_track3_schedule(ORIGINALS)["runs"] == data["runs"]


def test_val_due():
    """The last step; every val_loss_every steps before 0.9 of the run, every val_tail_every from
    there; without val_tail_every, every val_loss_every throughout; 0 and 0: the last step only."""
    a = t.parse_args(["--num_iterations", "100", "--val_loss_every", "30", "--val_tail_every", "4"])
    assert [s for s in range(101) if t.val_due(s, a)] == [0, 30, 60, 92, 96, 100]
    a = t.parse_args(["--num_iterations", "100", "--val_loss_every", "30"])
    assert [s for s in range(101) if t.val_due(s, a)] == [0, 30, 60, 90, 100]
    a = t.parse_args(["--num_iterations", "100", "--val_loss_every", "0"])
    assert [s for s in range(101) if t.val_due(s, a)] == [100]


def tiny_track3(tmp_path: Path, *extra: str) -> list[str]:
    """A small --preset track3 on shards where each token is the last + 7 (mod 256) but for 1 in 8,
    drawn at random: learnable from the first steps."""
    train, val = make_shards(tmp_path / "shards", train_sizes=(20000,), vocab=SMALL_VOCAB)
    rng = np.random.default_rng(0)
    for path in sorted((tmp_path / "shards").glob("*.bin")):
        n = t.shard_token_count(str(path))
        tokens = (
            np.arange(n) * 7 + np.cumsum(rng.integers(0, SMALL_VOCAB, n) * (rng.random(n) < 0.125))
        ) % 256
        write_datafile(str(path), tokens)
    return [
        "--preset",
        "track3",
        "--vocab_size",
        str(SMALL_VOCAB),
        "--n_layer",
        "2",
        "--n_head",
        "2",
        "--n_embd",
        "64",
        "--sequence_length",
        "32",
        "--batch_size",
        "4",
        "--device_batch_size",
        "2",
        "--val_tokens",
        "256",
        "--compile",
        "0",
        "--matmul_check",
        "0",
        "--final_checkpoint",
        "0",
        "--input_bin",
        train,
        "--input_val_bin",
        val,
        "--records_dir",
        str(tmp_path / "records"),
        *extra,
    ]


class _Stop(Exception):
    pass


def test_optimizers_get_the_gradient_of_the_summed_loss(tmp_path, monkeypatch):
    """Over 2 micro-batches, the gradient the AdamW groups get at step 0 is that of the loss summed
    over the step's 128 tokens (the original's), not of their mean: the head's (the only nonzero at
    the track's init) against autograd of the sum over the first batch on a model made from the same
    seed."""
    seen = []

    def capture(self, *a, **k):
        seen.append(
            {
                id(p): p.grad.clone()
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )
        raise _Stop

    monkeypatch.setattr(torch.optim.AdamW, "step", capture)
    argv = tiny_track3(tmp_path, "--num_iterations", "2", "--warmdown_iters", "1")
    args = t.parse_args(argv)
    with pytest.raises(_Stop):
        t.train(args)
    torch.manual_seed(args.seed)
    model = t.Track3GPT(args)
    tokens = torch.from_numpy(
        t.load_shard(sorted(Path(tmp_path / "shards").glob("t_train_*.bin"))[0], SMALL_VOCAB)[
            : 4 * 32 + 1
        ].astype(np.int64)
    )
    (model(tokens[:-1].view(4, 32), tokens[1:].view(4, 32)) * 4 * 32).backward()
    got = list(seen[0].values())
    assert len(got) == len(list(model.parameters())) - len(model.block_matrices())
    head_w, head_b = model.lm_head.weight.grad, model.lm_head.bias.grad
    assert head_w.norm() > 1  # a sum over 128 tokens
    assert any(
        g.shape == head_w.shape and torch.allclose(g, head_w, rtol=1e-5, atol=1e-6) for g in got
    )
    assert any(
        g.shape == head_b.shape and torch.allclose(g, head_b, rtol=1e-5, atol=1e-6) for g in got
    )


def test_rules_linear_in_the_gradient_take_lr_per_token():
    """With the summed loss, PolarGrad's and LocoProp-S's lr is divided by the step's tokens and
    their weight decay multiplied by it (lr x wd unchanged); Muon's and the others' stay as set."""
    args = t.parse_args(
        [
            "--preset",
            "track3",
            "--n_layer",
            "1",
            "--optimizer",
            "polargrad",
            "--polargrad_weight_decay",
            "0.1",
        ]
    )
    _, blocks = t.build_optimizers(t.Track3GPT(args), args)
    n = 512 * 1024
    assert (
        blocks.param_groups[0]["lr"] == args.polargrad_lr / n
        and blocks.param_groups[0]["base_lr"] == args.polargrad_lr / n
    )
    assert blocks.param_groups[0]["weight_decay"] == 0.1 * n
    args = t.parse_args(
        ["--n_layer", "1", "--optimizer", "polargrad"]
    )  # the 2024 model: its mean loss
    assert t.build_optimizers(t.GPT(args), args)[1].param_groups[0]["lr"] == args.polargrad_lr


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_preset_trains_on_cpu(tmp_path, optimizer):
    """A small --preset track3 (2 layers x 64, 256-token vocabulary, 4 x 32 tokens a step,
    accumulation 2) trains: the val loss falls from ln(256) (the zero head) at step 0, and validates
    where val_due says."""
    argv = tiny_track3(
        tmp_path,
        "--num_iterations",
        "20",
        "--warmdown_iters",
        "14",
        "--val_loss_every",
        "10",
        "--val_tail_every",
        "1",
        "--optimizer",
        optimizer,
    )
    path, _ = t.train(t.parse_args(argv))
    text = Path(path).read_text()
    vals = {
        int(m.split("/")[0]): float(v)
        for m, v in (
            line[5:].split(" val_loss:")
            for line in text.splitlines()
            if " val_loss:" in line and line.startswith("step:")
        )
        for v in [v.split()[0]]
    }
    assert sorted(vals) == [0, 10, 18, 19, 20]
    assert vals[0] == pytest.approx(math.log(SMALL_VOCAB), abs=1e-4)
    assert vals[20] < vals[0] - 0.5


def test_track3_refuses_a_head_dim_not_divisible_by_4():
    with pytest.raises(SystemExit, match="head dim divisible by 4"):
        t.validate_args(t.parse_args(["--preset", "track3", "--n_head", "128"]), 1)
    with pytest.raises(SystemExit, match="--model: unknown model 'gpt3'"):
        t.validate_args(t.parse_args(["--model", "gpt3"]), 1)


@pytest.mark.slow
def test_two_processes_equal_one_with_accumulation(tmp_path):
    """The summed loss over processes: 2 processes (gloo) train what 1 process with accumulation 2
    trains (DDP averages the processes' gradients, so each backward takes world x its share of the
    sum)."""
    from test_distributed import torchrun

    argv = tiny_track3(
        tmp_path, "--num_iterations", "6", "--warmdown_iters", "4", "--val_loss_every", "0"
    )
    params = {}
    for n in (1, 2):
        torchrun(
            n, argv + ["--records_dir", str(tmp_path / f"w{n}")], tmp_path / f"w{n}.pt"
        )  # the last one wins
        params[n] = torch.load(tmp_path / f"w{n}.pt")
    for k in params[1]:
        torch.testing.assert_close(params[2][k], params[1][k], rtol=1e-4, atol=1e-5)
    assert (
        params[1]["transformer.h.0.attn.proj.weight"].abs().max() > 1e-3
    )  # zero at init: Muon moved it


@pytest.mark.parametrize("optimizer", ["polargrad", "soap", "newton_muon", "locoprop"])
def test_every_optimizer_swaps_in_for_the_blocks_matrices(tmp_path, optimizer):
    """--preset track3 --optimizer X: X updates the blocks' matrices (q, k, v, proj, fc, proj), the
    track's AdamW groups the rest, with X's weight decay; 4 steps run and move every matrix (the
    projs start at zero)."""
    argv = tiny_track3(
        tmp_path,
        "--num_iterations",
        "4",
        "--warmdown_iters",
        "2",
        "--val_loss_every",
        "0",
        "--optimizer",
        optimizer,
        f"--{optimizer.replace('newton_', '')}_weight_decay",
        "0.01",
        "--gram_every",
        "2",
    )
    path, model = t.train(t.parse_args(argv))
    assert "\ndiverged: " not in Path(path).read_text()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        if name.endswith("proj.weight") and name.startswith("transformer.h"):
            assert p.abs().max() > 0, name


def test_weight_decay_of_locoprop_and_newton_muon_scales_the_parameters_first():
    """locoprop_weight_decay: p <- p (1 - lr wd) - lr G R (R = I before the first refresh);
    muon_weight_decay reaches Newton-Muon (Muon's rule, its settings shared): with and without it
    the parameters differ by lr wd p0, whatever the step."""
    torch.manual_seed(0)
    layers = [t.Linear(16, 8), t.Linear(8, 16)]
    p0 = [m.weight.detach().clone() for m in layers]
    grads = [torch.randn_like(p) for p in p0]
    for rule, lr in ((t.LocoPropS, 0.3), (t.NewtonMuon, 0.02)):
        after = {}
        for wd in (0.0, 0.5):
            with torch.no_grad():
                for m, p in zip(layers, p0):
                    m.weight.copy_(p)
            for m, g in zip(layers, grads):
                m.weight.grad = g.clone()
            rule([m.weight for m in layers], layers, lr=lr, weight_decay=wd).step()
            after[wd] = [m.weight.detach().clone() for m in layers]
        for p, g, a, b in zip(p0, grads, after[0.0], after[0.5]):
            torch.testing.assert_close(a - b, lr * 0.5 * p, rtol=1e-5, atol=1e-6)
            if rule is t.LocoPropS:
                torch.testing.assert_close(b, p * (1 - lr * 0.5) - lr * g)
