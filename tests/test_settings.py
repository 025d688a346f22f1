"""Every bad setting is refused before any model is built (parse_args, then validate_args: the first two things train
does), with a message that names the field and what it allows; one table of cases, plus the command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt2 as t
from conftest import REPO, SMALL_VOCAB, TINY, make_shards, subprocess_env, train_here

GRAM = ["--optimizer", "newton_muon", "--gram", "block"]
# (case, settings, world size, fragments the message must hold: the field, and the allowed range or the fix)
# RESUME stands for the path of a real 2-step checkpoint (the `checkpoint` fixture); LATEST_EMPTY for --resume latest
# where no checkpoint exists
CASES = [
    ("unknown field", ["--lr", "0.1"], 1, ["unknown setting '--lr'", "settings: --input_bin"]),
    ("misspelt field", ["--num_iteration", "5"], 1, ["'--num_iteration'", "did you mean --num_iterations?"]),
    ("unknown preset", ["--preset", "huge"], 1, ["--preset", "'huge'", "choose one of speedrun, smoke"]),
    ("unknown optimizer", ["--optimizer", "sgd"], 1, ["--optimizer", "'sgd'", "choose one of muon, polargrad"]),
    ("unreadable number", ["--num_iterations", "ten"], 1, ["--num_iterations", "cannot read 'ten' as int"]),
    ("missing value", ["--seed"], 1, ["--seed needs a value"]),
    ("negative seed", ["--seed", "-1"], 1, ["--seed", "must be in 0 .. 4294967295", "got -1"]),
    ("seed beyond numpy's range", ["--seed", str(2**32)], 1, ["--seed", "must be in 0 .. 4294967295"]),
    ("unreadable deterministic", ["--deterministic", "maybe"], 1, ["--deterministic", "cannot read 'maybe' as bool"]),
    ("deterministic with efficient attention", ["--deterministic", "1", "--attention", "efficient"], 1,
     ["--attention efficient", "not deterministic", "choose one of auto, flash, math"]),
    ("deterministic with cudnn attention", ["--deterministic", "1", "--attention", "cudnn"], 1,
     ["--attention cudnn", "choose one of auto, flash, math"]),
    ("zero steps", ["--num_iterations", "0"], 1, ["--num_iterations", "must be positive"]),
    ("negative steps", ["--num_iterations", "-3"], 1, ["--num_iterations", "must be positive"]),
    ("zero embed lr", ["--embed_lr", "0"], 1, ["--embed_lr", "must be positive and finite"]),
    ("negative muon lr", ["--muon_lr", "-0.01"], 1, ["--muon_lr", "must be positive and finite"]),
    ("zero adamw lr", ["--optimizer", "adamw", "--adamw_lr", "0"], 1, ["--adamw_lr", "positive and finite"]),
    ("infinite polargrad lr", ["--polargrad_lr", "inf"], 1, ["--polargrad_lr", "positive and finite"]),
    ("nan soap lr", ["--soap_lr", "nan"], 1, ["--soap_lr", "positive and finite"]),
    ("zero locoprop lr", ["--locoprop_lr", "0"], 1, ["--locoprop_lr", "positive and finite"]),
    ("lr beyond float32", ["--muon_lr", "1e39"], 1, ["--muon_lr", "must be below 3.403e+38"]),
    ("zero batch", ["--batch_size", "0"], 1, ["--batch_size", "must be positive"]),
    ("zero device batch", ["--device_batch_size", "0"], 1, ["--device_batch_size", "must be positive"]),
    ("zero sequence length", ["--sequence_length", "0"], 1, ["--sequence_length", "must be positive"]),
    ("device batch not dividing", ["--device_batch_size", "3"], 1,
     ["--device_batch_size 3", "does not divide the step's --batch_size 4", "pick a divisor of 4"]),
    ("device batch x world not dividing", [], 4, ["--device_batch_size 2 x 4 processes = 8", "--batch_size 4"]),
    ("warmup + warmdown too long", ["--warmup_iters", "3", "--warmdown_iters", "3"], 1,
     ["--warmup_iters 3 + --warmdown_iters 3 = 6", "their sum must be <= 5"]),
    ("negative warmup", ["--warmup_iters", "-1"], 1, ["--warmup_iters", "must be >= 0"]),
    ("negative warmdown", ["--warmdown_iters", "-1"], 1, ["--warmdown_iters", "must be >= 0"]),
    ("negative val_loss_every", ["--val_loss_every", "-1"], 1, ["--val_loss_every", "must be >= 0"]),
    ("val tokens not a multiple of the val batch", ["--val_tokens", "100"], 1,
     ["--val_tokens 100", "not a multiple of 1 processes x --device_batch_size 2 x --sequence_length 32 = 64"]),
    ("val tokens not a multiple with 2 processes", ["--val_tokens", "192"], 2, ["--val_tokens 192", "= 128"]),
    ("gram block not dividing the width", GRAM + ["--gram_block", "48"], 1,
     ["--gram_block", "a divisor of every layer's input width (64 and 256)", "got 48"]),
    ("zero gram block", GRAM + ["--gram_block", "0"], 1, ["--gram_block", "a divisor"]),
    ("unknown gram mode", ["--gram", "svd"], 1, ["--gram", "full, block or diag"]),
    ("unknown compile mode", ["--compile_mode", "reduce-overhead"], 1,
     ["--compile_mode", "'reduce-overhead'", "choose one of default, max-autotune-no-cudagraphs"]),
    ("heads not dividing the width", ["--n_head", "3"], 1, ["--n_embd 64", "multiple of --n_head 3"]),
    ("unknown Newton-Schulz set", ["--ns_coeffs", "cubic"], 1, ["--ns_coeffs", "choose one of simple"]),
    ("negative save_every", ["--save_every", "-1"], 1, ["--save_every", "must be >= 0"]),
    ("zero keep_checkpoints", ["--keep_checkpoints", "0"], 1, ["--keep_checkpoints", "must be >= 1"]),
    ("negative stop_at", ["--stop_at", "-1"], 1, ["--stop_at", "must be >= 0"]),
    ("stop_at at the end", ["--stop_at", "5"], 1, ["--stop_at 5", "must be below --num_iterations 5", "0: run to"]),
    ("resume already past stop_at", ["--resume", "RESUME", "--stop_at", "1"], 1,
     ["--stop_at 1", "is at step 2 already", "stop later"]),
    ("resume latest without a checkpoint", ["--resume", "latest", "--records_dir", "LATEST_EMPTY"], 1,
     ["--resume latest: no checkpoint under", "pass the --checkpoint_dir"]),
    ("resume a folder that is not a checkpoint", ["--resume", "NOT_A_CHECKPOINT"], 1,
     ["--resume", "not a checkpoint (a step_<n>/ folder with meta.json)"]),
    ("resume with another depth", ["--resume", "RESUME", "--n_layer", "3"], 1,
     ["--n_layer: the checkpoint", "was saved with 2, got 3", "leave --n_layer out"]),
    ("resume with another width", ["--resume", "RESUME", "--n_embd", "128"], 1, ["--n_embd", "saved with 64, got 128"]),
    ("resume with another optimizer", ["--resume", "RESUME", "--optimizer", "adamw"], 1,
     ["--optimizer", "saved with 'muon', got 'adamw'", "Only --stop_at, --save_every, --keep_checkpoints"]),
    ("resume with another optimizer setting", ["--resume", "RESUME", "--muon_lr", "0.02"], 1,
     ["--muon_lr", "saved with 0.018, got 0.02"]),
    ("resume with another schedule", ["--resume", "RESUME", "--num_iterations", "10"], 1,
     ["--num_iterations", "saved with 4, got 10"]),
    ("resume on a world size that does not divide the batch", ["--resume", "RESUME"], 3,
     ["--device_batch_size 2 x 3 processes = 6", "--batch_size 4"]),
    ("resume whose record is gone", ["--resume", "NO_RECORD"], 1, ["--resume", "the record it continues", "missing"]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, str]:
    """A 4-step run's checkpoint at step 2 (muon, --stop_at 2), a copy whose record is gone, an empty records folder,
    a plain folder."""
    root = tmp_path_factory.mktemp("settings")
    train, val = make_shards(root / "shards", vocab=SMALL_VOCAB)
    args = TINY + ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train, "--input_val_bin", val,
                   "--num_iterations", "4", "--warmup_iters", "1", "--warmdown_iters", "1", "--stop_at", "2"]
    train_here(args + ["--records_dir", str(root / "kept")])
    record, _ = train_here(args + ["--records_dir", str(root / "gone")])
    os.remove(record)
    (root / "plain").mkdir()
    return {"RESUME": t.find_checkpoint("latest", str(root / "kept" / "checkpoints")),
            "NO_RECORD": t.find_checkpoint("latest", str(root / "gone" / "checkpoints")),
            "LATEST_EMPTY": str(root / "empty"), "NOT_A_CHECKPOINT": str(root / "plain")}


@pytest.mark.parametrize("case,argv,world,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_setting_is_refused_with_field_and_range(tmp_path, checkpoint, monkeypatch, case, argv, world,
                                                     fragments):
    """One process: train() itself (which builds the model right after validating); more: validate_args with that
    world size, as each of them would call it."""
    train, val = make_shards(tmp_path / "shards", vocab=SMALL_VOCAB)
    base = [] if "--resume" in argv else TINY + ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train,
                                                 "--input_val_bin", val, "--records_dir", str(tmp_path / "rec")]
    argv = [checkpoint.get(a, a) for a in argv]
    built = []
    monkeypatch.setattr(t.GPT, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(SystemExit) as refused:
        if world == 1:
            t.train(t.parse_args(base + argv))
        else:
            t.validate_args(t.parse_args(base + argv), world)
    message = refused.value.code
    assert isinstance(message, str) and not built  # a message (exit status 1), before any model
    assert not (tmp_path / "rec").exists()  # nor a record
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


def test_valid_resume_settings_pass_and_keep_the_checkpoint(checkpoint):
    args = t.parse_args(["--resume", checkpoint["RESUME"], "--save_every", "5", "--device_batch_size", "1"])
    assert (args.n_layer, args.n_embd, args.optimizer, args.num_iterations, args.vocab_size) == (2, 64, "muon", 4, 256)
    assert (args.save_every, args.device_batch_size, args.resume) == (5, 1, checkpoint["RESUME"])
    assert t.validate_args(args, 2) == 2  # 4 sequences = 2 processes x 1 x accumulation 2
    same = t.parse_args(["--resume", checkpoint["RESUME"], "--n_layer", "2", "--optimizer", "muon"])
    assert same == args.__class__(**{**args.__dict__, "save_every": 0, "device_batch_size": 2})
    how = t.parse_args(["--resume", checkpoint["RESUME"], "--recompute_gelu", "0", "--gram_overlap", "0",
                        "--compile_mode", "max-autotune-no-cudagraphs", "--loss_chunk", "0"])  # how it runs, not what
    assert (how.recompute_gelu, how.gram_overlap, how.compile_mode, how.loss_chunk) == (
        False, False, "max-autotune-no-cudagraphs", 0) and how.muon_lr == same.muon_lr
    # constructed directly, not through parse_args: validate_args still compares with the checkpoint
    with pytest.raises(SystemExit, match="--n_head: the checkpoint .* was saved with 2, got 4"):
        t.validate_args(t.Hyperparameters(**{**same.__dict__, "n_head": 4}), 1)


@pytest.mark.slow
def test_command_line_refuses_before_building_anything(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), "--preset", "smoke", "--warmup_iters", "41",
                        "--records_dir", str(tmp_path / "rec")], capture_output=True, text=True, env=subprocess_env(),
                       timeout=120, cwd=REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == ("--warmup_iters 41 + --warmdown_iters 20 = 61 is longer than the run "
                                "(--num_iterations 60): their sum must be <= 60")
    assert not Path(tmp_path / "rec").exists()


def test_resume_checks_the_shards_not_their_paths(checkpoint, tmp_path, monkeypatch):
    """The same shards elsewhere resume; other shards (here: one 100 tokens shorter) are refused before the model."""
    saved = t.checkpoint_settings(checkpoint["RESUME"])
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in [*Path(saved.input_bin).parent.glob("t_*.bin")]:
        (moved / f.name).write_bytes(f.read_bytes())
    other_train, _ = make_shards(tmp_path / "other", train_sizes=(3000, 2400), vocab=SMALL_VOCAB)
    built = []
    monkeypatch.setattr(t.GPT, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(t.ShardError, match="the train shards .names and token counts. differ from the 2 the"):
        t.train(t.parse_args(["--resume", checkpoint["RESUME"], "--input_bin", other_train]))
    assert not built
    monkeypatch.undo()
    record = t.train(t.parse_args(["--resume", checkpoint["RESUME"], "--input_bin", str(moved / "t_train_*.bin"),
                                   "--input_val_bin", str(moved / "t_val_*.bin")]))[0]
    (resumed,) = [line for line in Path(record).read_text().splitlines() if line.startswith("resumed: ")]
    assert f'changed: {{"stop_at": 0, "input_bin": "{moved}/t_train_*.bin", "input_val_bin": "{moved}/t_val_*.bin"}}' \
        in resumed


@pytest.mark.parametrize("preset", list(t.PRESETS))
@pytest.mark.parametrize("world", [1, 2])
def test_every_preset_is_a_valid_setting(preset, world):
    """Each preset passes the same checks as a hand-written command line, on 1 and 2 processes (the smoke batch of 8
    sequences allows at most 2 processes of 4); `compare` (one micro-batch of 64 a step) on 2 processes is refused with
    the device batch that fits named, and that device batch passes."""
    extra = ["--device_batch_size", "32"] if (preset, world) == ("compare", 2) else []
    if extra:
        with pytest.raises(SystemExit, match="does not divide the step's --batch_size 64; pick a divisor of 32"):
            t.validate_args(t.parse_args(["--preset", preset]), world)
    args = t.parse_args(["--preset", preset] + extra)
    assert args.preset == preset and all(getattr(args, k) == v for k, v in t.PRESETS[preset].items())
    assert t.validate_args(args, world) == args.batch_size // (world * args.device_batch_size)


# the compare preset's tuned learning rates: records/lr-sweep-400/README.md (the best of each grid);
# a changed rate must change this table and that record
TUNED_LR = {"compare": {"muon": ("muon_lr", 0.036), "adamw": ("adamw_lr", 0.00015)}}


def test_preset_tuned_rates_are_the_swept_bests_and_given_ones_win():
    """PRESET_TUNED holds exactly TUNED_LR; each entry sets its optimizer's own declared lr (so Newton-Muon,
    which shares muon_lr, gets its own row), applies only with that optimizer, and a given lr wins."""
    assert {p: {o: tuple(*d.items()) for o, d in per.items()} for p, per in t.PRESET_TUNED.items()} == TUNED_LR
    for preset, per in TUNED_LR.items():
        for name, (setting, lr) in per.items():
            assert t.optimizer_class(name).declared()["lr"].name == setting
            assert getattr(t.parse_args(["--preset", preset, "--optimizer", name]), setting) == lr
            assert getattr(t.parse_args(["--preset", preset, "--optimizer", name, f"--{setting}", "0.5"]),
                           setting) == 0.5
            others = [o for o in t.OPTIMIZERS if o not in per]
            for other in others:  # an optimizer without a row keeps its declared default
                lr_name = t.optimizer_class(other).declared()["lr"].name
                default = t.parse_args(["--optimizer", other])
                assert getattr(t.parse_args(["--preset", preset, "--optimizer", other]), lr_name) == \
                    getattr(default, lr_name)


@pytest.mark.parametrize("mode", t.COMPILE_MODES)
def test_compile_mode_reaches_torch_compile(mode, monkeypatch):
    """--compile_mode is the mode torch.compile gets for the model."""
    calls = []
    monkeypatch.setattr(t.torch, "compile", lambda model, **kw: calls.append(kw) or model)
    model = torch.nn.Linear(2, 2)
    assert t.compile_model(model, t.parse_args(["--compile_mode", mode])) is model
    assert calls == [{"mode": mode}]
