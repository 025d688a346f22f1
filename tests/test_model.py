"""Model, schedule and settings: shapes, loss at init, the LR multiplier, command-line parsing."""
import math

import pytest
import torch

import train_gpt2 as t


def test_shapes_and_parameter_count():
    args = t.parse_args([])
    model = t.GPT(args)
    assert sum(p.numel() for p in model.parameters()) == 123_532_032  # GPT-2 small without position embedding
    assert model.transformer.wte.weight is model.lm_head.weight
    blk = model.transformer.h[0]
    assert [p.shape for p in blk.parameters()] == [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    assert all(not isinstance(m, torch.nn.Linear) or m.bias is None for m in model.modules())
    x = torch.randint(0, args.vocab_size, (2, 16))
    h = model.transformer.wte(x)
    assert blk(h).shape == (2, 16, 768)


@pytest.mark.slow
def test_loss_at_init():
    """Logits of the tied Linear init have variance |x|^2 / (3 d) = 1/3 after the RMSNorm, so the expected loss at
    init is ln(V) + 1/6 (the log-normal term of logsumexp), not ln(V) itself."""
    args = t.parse_args([])
    losses = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = t.GPT(args)
        x, y = torch.randint(0, args.vocab_size, (2, 2, 256))
        with torch.no_grad():
            losses.append(model(x, y).item())
    for loss in losses:
        assert abs(loss - (math.log(args.vocab_size) + 1 / 6)) < 0.1, losses


def test_rotary_and_norm():
    """Rotary: a rotation by t * inv_freq from tables made once for up to max_len tokens (not in the state dict), a
    clear error beyond; rms_norm."""
    rotary = t.Rotary(8, 16)
    assert rotary.state_dict() == {}
    with pytest.raises(ValueError, match="rotary tables hold 16"):
        rotary(17)
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rotary(5)
    y = t.apply_rotary(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    inv_freq = 1 / 10000 ** (torch.arange(0, 8, 2).double() / 8)
    ang = torch.arange(5).double()[:, None] * inv_freq
    x1, x2 = x[..., :4].double(), x[..., 4:].double()
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    ref = torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], -1)
    assert torch.allclose(y.double(), ref, atol=1e-5)
    z = torch.randn(4, 16) * 3
    assert torch.allclose(t.rms_norm(z), z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6), atol=1e-6)


@pytest.mark.parametrize("it,expected", [(0, 1 / 250), (249, 1.0), (250, 1.0), (5000, 1.0), (6999, 1 / 2000)])
def test_lr_schedule(it, expected):
    assert t.lr_multiplier(it, t.parse_args([])) == pytest.approx(expected)


def test_parse_args_presets_and_errors():
    a = t.parse_args(["--num_iterations", "10", "--compile=0", "--embed_betas", "0.8,0.9"])
    assert (a.num_iterations, a.compile, a.embed_betas, a.muon_lr) == (10, False, (0.8, 0.9), 0.018)
    s = t.parse_args(["--device_batch_size", "1", "--preset", "smoke"])  # explicit settings win over the preset
    assert (s.preset, s.n_layer, s.device_batch_size) == ("smoke", 2, 1)
    with pytest.raises(SystemExit, match="did you mean --num_iterations"):
        t.parse_args(["--num_iteration", "3"])
    with pytest.raises(SystemExit, match="unknown preset"):
        t.parse_args(["--preset", "fast"])
    with pytest.raises(SystemExit, match="cannot read"):
        t.parse_args(["--seed", "x"])
    with pytest.raises(SystemExit, match="needs a value"):
        t.parse_args(["--seed"])


def test_batch_must_divide():
    args = t.parse_args([])
    assert t.validate_args(args, 1) == 8 and t.validate_args(args, 8) == 1
    with pytest.raises(SystemExit, match="does not divide"):
        t.validate_args(t.parse_args(["--device_batch_size", "48"]), 1)
    with pytest.raises(SystemExit, match="--val_tokens"):
        t.validate_args(t.parse_args(["--val_tokens", "1000"]), 1)


def test_model_flops_and_the_mfu_line():
    """GPT-124M at T = 1024: 6 (N_matmul) + 6 L T d FLOPs a token with N_matmul = 12 L d^2 + V d (README: the floor);
    the record's MFU line for the README's bench (1144.01 ms a 524,288-token step, 788.9 TFLOP/s): 46.3%, floor
    530.2 ms; on W GPUs the floor is W times smaller."""
    args = t.parse_args([])
    assert t.flops_per_token(args) == 6 * (12 * 12 * 768**2 + 50257 * 768) + 6 * 12 * 1024 * 768 == 797_815_296
    assert t.mfu_line(args, 1144.01, 788.9, 1, "x") == ("matmul: x 788.9 TFLOP/s per device, mfu: 46.3% "
                                                        "(floor 530.2 ms a step, step_avg 1144.01 ms)")
    assert "floor 132.6 ms" in t.mfu_line(args, 276.41, 788.9, 4, "x")


def test_matmul_rate_is_two_n_cubed_over_the_time(monkeypatch):
    """matmul_tflops: 2 n^3 flops a product over the mean time of the timed products (here a fake clock: 1 ms each);
    it leaves the global RNG as it was (the trainer times it before training too, and a resumed run must match)."""
    clock = iter([10.0, 10.0 + 5 * 1e-3])
    monkeypatch.setattr(t.time, "perf_counter", lambda: next(clock))
    state = torch.get_rng_state()
    assert t.matmul_tflops(torch.device("cpu"), n=64, reps=5) == pytest.approx(2 * 64**3 / 1e-3 / 1e12)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: timing before training moves no draw
