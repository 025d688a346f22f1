"""Faults a user's input or machine can cause, each ending in one clear line (exit status != 0 for a mistake) with
nothing lost: a full or read-only disk at a checkpoint, bad data found before the first step, broken checkpoints,
unwritable folders, bad command lines, allocations too large. records/robustness/README.md lists every class with its
tests."""
import errno
import json
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2 as t
from conftest import (REPO, SMALL_VOCAB, TINY, make_shards, subprocess_env, train_here,
                      write_datafile)

sys.path.insert(0, str(REPO / "records"))
import compare  # noqa: E402


def run_train(args: list[str], limit_file_bytes: int = 0, nproc: int = 1, timeout: int = 180,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """train_gpt2.py as a command (under torchrun for nproc > 1); limit_file_bytes > 0: no file it writes may grow
    past that size (RLIMIT_FSIZE: a write beyond fails with EFBIG, as on a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.run(launcher + [str(REPO / "train_gpt2.py")] + args, capture_output=True, text=True,
                          env={**subprocess_env(), **(env or {})}, timeout=timeout, cwd=REPO,
                          preexec_fn=limit if limit_file_bytes else None)


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]


def lines_of(record: str, prefix: str) -> list[str]:
    return [line for line in Path(record).read_text().splitlines() if line.startswith(prefix)]


# ----------------------------------------------------------------------------- runs lost


def test_failed_end_checkpoint_keeps_the_result_and_the_previous_checkpoint(small_vocab_args, tmp_path, monkeypatch):
    """The end-of-run save fails (EROFS on its first file): the final val line and the record's other lines come
    first, the failure is one record line naming the reason and the checkpoint kept, step_<n>.tmp/ is gone, the run
    ends normally; the earlier checkpoints stay and resume."""
    real = t._save_synced

    def read_only_at_the_end(obj, path):
        if "step_000005" in path:
            raise OSError(errno.EROFS, "Read-only file system", path)
        real(obj, path)

    monkeypatch.setattr(t, "_save_synced", read_only_at_the_end)
    records = tmp_path / "records"
    record, _ = train_here(small_vocab_args + ["--save_every", "2", "--records_dir", str(records)])
    text = Path(record).read_text().split(t.RECORD_MARK)[-1]  # the lines after the source
    val, failed, peak = (text.index(s) for s in ("step:5/5 val_loss:", "checkpoint: step:5/5 not saved",
                                                  "peak memory consumption"))
    assert val < failed < peak
    (line,) = lines_of(record, "checkpoint: step:5/5")
    (run,) = (records / "checkpoints").iterdir()
    assert "(Read-only file system: " in line and line.endswith(f"the previous one stays: {run / 'step_000004'}")
    assert sorted(p.name for p in run.iterdir()) == ["step_000002", "step_000004"]  # no step_000005.tmp
    assert compare.parse_record(record).complete
    assert t.find_checkpoint("latest", str(records / "checkpoints")) == str(run / "step_000004")


def test_full_disk_at_every_save_loses_no_result(tiny_args, tmp_path):
    """No file may grow past 4 MB (the checkpoint's optimizer file would be ~26 MB): every save fails with a real
    OSError (EFBIG) through torch.save, the run still validates, records and exits 0, and no partial save is left."""
    records = tmp_path / "records"
    r = run_train(tiny_args + ["--save_every", "2", "--records_dir", str(records)], limit_file_bytes=4 << 20)
    no_traceback(r)
    assert r.returncode == 0, r.stderr[-3000:]
    (record,) = map(str, records.glob("*.txt"))
    failed = lines_of(record, "checkpoint: ")
    assert [f.split()[1] for f in failed] == ["step:2/5", "step:4/5", "step:5/5"]
    assert all("not saved (File too large: " in f for f in failed)
    assert failed[0].endswith("no earlier checkpoint")
    assert re.search(r"^step:5/5 val_loss:", Path(record).read_text(), re.M) and compare.parse_record(record).complete
    assert [p.name for p in (records / "checkpoints").rglob("*")] == [Path(record).stem]  # an empty run folder


@pytest.mark.slow
def test_two_processes_agree_on_a_failed_save(tiny_args, tmp_path):
    """Process 0's file (the embedding's AdamW state) exceeds the limit, process 1's does not: both see the save
    failed, neither waits for the other forever, the run ends with its record, nothing partial is left."""
    records = tmp_path / "records"
    r = run_train(tiny_args + ["--records_dir", str(records)], limit_file_bytes=4 << 20, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    (record,) = map(str, records.glob("*.txt"))
    (failed,) = lines_of(record, "checkpoint: ")
    assert "step:5/5 not saved (File too large: " in failed and "rank0.pt" in failed
    assert compare.parse_record(record).complete
    assert not list((records / "checkpoints").rglob("*.tmp"))


def test_bad_token_id_in_a_later_shard_stops_before_the_first_step(tmp_path):
    """The second train shard holds an id >= the vocabulary: refused with its path before any record or step."""
    train, val = make_shards(tmp_path / "s", train_sizes=(3000, 3000))
    ids = np.random.default_rng(1).integers(0, 50257, 3000)
    ids[2500] = 50300
    write_datafile(str(tmp_path / "s" / "t_train_000002.bin"), ids)
    r = run_train(TINY + ["--input_bin", train, "--input_val_bin", val, "--records_dir", str(tmp_path / "rec")])
    no_traceback(r)
    assert r.returncode == 1 and not (tmp_path / "rec").exists()
    assert r.stderr.startswith(f"data error: {tmp_path / 's' / 't_train_000002.bin'}: token id 50300 >= vocab size")
    assert "step:" not in r.stdout


def test_pattern_matching_a_folder_is_a_data_error(tmp_path):
    train, val = make_shards(tmp_path / "s")
    (tmp_path / "s" / "t_train_dir").mkdir()
    with pytest.raises(t.ShardError, match=r"t_train_dir: not a file \(a folder\?\): the pattern must match shard"):
        train_here(TINY + ["--input_bin", str(tmp_path / "s" / "t_train_*"), "--input_val_bin", val,
                           "--records_dir", str(tmp_path / "rec")])
    assert not (tmp_path / "rec").exists()


# ----------------------------------------------------------------------------- broken checkpoints


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict:
    """A run of 4 steps stopped at step 2 (its checkpoint resumes), on SMALL_VOCAB shards."""
    root = tmp_path_factory.mktemp("stopped")
    train, val = make_shards(root / "shards", vocab=SMALL_VOCAB)
    args = TINY + ["--vocab_size", str(SMALL_VOCAB), "--input_bin", train, "--input_val_bin", val,
                   "--num_iterations", "4", "--warmup_iters", "1", "--warmdown_iters", "1", "--stop_at", "2",
                   "--records_dir", str(root / "records")]
    record, _ = train_here(args)
    return {"record": record, "checkpoint": t.find_checkpoint("latest", str(root / "records" / "checkpoints"))}


def copy_checkpoint(stopped: dict, tmp_path: Path) -> Path:
    """The stopped run's checkpoint copied into tmp_path/<its run folder's name>/step_000002 (meta.json unchanged: its
    record is the stopped run's)."""
    src = Path(stopped["checkpoint"])
    dst = tmp_path / src.parent.name / src.name
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_meta(ck: Path, change) -> None:
    meta = json.loads((ck / "meta.json").read_text())
    (ck / "meta.json").write_text(json.dumps(change(meta)))


def edit_pt(ck: Path, name: str, change) -> None:
    obj = torch.load(ck / name, weights_only=True)
    change(obj)
    torch.save(obj, ck / name)


def _state_of(part: dict) -> dict:
    """The first block-matrix state of a rank file: Muon's momentum buffer of some parameter."""
    return next(iter(part["optimizers"][1].values()))


# (case, how the copy is damaged, what the one line must say); each is refused before the run writes anything
BROKEN = [
    ("main.pt truncated", lambda ck: (ck / "main.pt").write_bytes((ck / "main.pt").read_bytes()[:5000]),
     ["cannot read main.pt", "truncated or damaged", "resume another checkpoint of the run"]),
    ("main.pt random bytes", lambda ck: (ck / "main.pt").write_bytes(np.random.default_rng(0).bytes(4096)),
     ["cannot read main.pt"]),
    ("main.pt empty", lambda ck: (ck / "main.pt").write_bytes(b""), ["cannot read main.pt"]),
    ("rank0.pt truncated", lambda ck: (ck / "rank0.pt").write_bytes((ck / "rank0.pt").read_bytes()[:3000]),
     ["cannot read rank0.pt"]),
    ("rank0.pt missing", lambda ck: (ck / "rank0.pt").unlink(), ["incomplete checkpoint, missing rank0.pt"]),
    ("meta.json not JSON", lambda ck: (ck / "meta.json").write_text("{not json"), ["cannot read its meta.json"]),
    ("meta.json not UTF-8", lambda ck: (ck / "meta.json").write_bytes(b"\xff\xfe{}"), ["cannot read its meta.json"]),
    ("meta.json a list", lambda ck: (ck / "meta.json").write_text("[1, 2]"), ["holds a JSON list, not an object"]),
    ("meta.json without args", lambda ck: edit_meta(ck, lambda m: {k: v for k, v in m.items() if k != "args"}),
     ["its meta.json has no 'args' (dict)", "damaged, or not written by train_gpt2.py"]),
    ("meta.json without world_size",
     lambda ck: edit_meta(ck, lambda m: {k: v for k, v in m.items() if k != "world_size"}), ["no 'world_size'"]),
    ("meta.json world_size a string", lambda ck: edit_meta(ck, lambda m: {**m, "world_size": "1"}),
     ["has 'world_size' = '1', not a int"]),
    ("meta.json step beyond the run", lambda ck: edit_meta(ck, lambda m: {**m, "step": 9}), ["says step 9 of 4"]),
    ("meta.json shard list damaged", lambda ck: edit_meta(ck, lambda m: {**m, "train_files": [["a"]]}),
     ["'train_files' that is not a list of [shard name, token count, fingerprint]"]),
    ("meta.json setting of the wrong type", lambda ck: edit_meta(ck, lambda m: {**m, "args": {**m["args"],
                                                                                                "n_layer": "two"}}),
     ["args.n_layer = 'two', not a int"]),
    ("meta.json shape disagrees with the weights",
     lambda ck: edit_meta(ck, lambda m: {**m, "args": {**m["args"], "n_embd": 128}}),
     ["main.pt holds transformer.wte.weight of shape (256, 64), they make (256, 128)",
      "meta.json and the weights disagree"]),
    ("meta.json depth disagrees with the weights",
     lambda ck: edit_meta(ck, lambda m: {**m, "args": {**m["args"], "n_layer": 3}}),
     ["main.pt has no transformer.h.2.", "by the settings in its meta.json"]),
    ("main.pt of another step", lambda ck: edit_pt(ck, "main.pt", lambda o: o["progress"].update(step=1)),
     ["main.pt is not at step 2, where its meta.json says"]),
    ("main.pt without the model", lambda ck: edit_pt(ck, "main.pt", lambda o: o.pop("model")),
     ["main.pt does not hold model, loader, progress, param_groups"]),
    ("optimizer state of the wrong shape",
     lambda ck: edit_pt(ck, "rank0.pt", lambda o: _state_of(o).update(momentum_buffer=torch.zeros(3, 3))),
     ["rank0.pt holds Muon's momentum_buffer of parameter", "shape (3, 3)"]),
    ("optimizer state of a parameter it lacks",
     lambda ck: edit_pt(ck, "rank0.pt", lambda o: o["optimizers"][1].update({99: {}})),
     ["rank0.pt holds a Muon state for parameter 99, which it does not have"]),
    ("data position beyond the shards", lambda ck: edit_pt(ck, "main.pt", lambda o: o["loader"].update(shard=7)),
     ["its files do not fit the model, optimizers and data its meta.json describes", "ValueError"]),
    ("param groups of another optimizer", lambda ck: edit_pt(ck, "main.pt", lambda o: o["param_groups"].pop()),
     ["its files do not fit", "ValueError"]),
]


@pytest.mark.parametrize("case,damage,fragments", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_checkpoint_is_refused_before_anything_is_written(stopped, tmp_path, case, damage, fragments):
    ck = copy_checkpoint(stopped, tmp_path)
    damage(ck)
    before = Path(stopped["record"]).read_bytes()
    with pytest.raises(SystemExit) as refused:
        train_here(["--resume", str(ck)])
    message = refused.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith(f"--resume {ck}"), message
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"
    assert Path(stopped["record"]).read_bytes() == before  # no `resumed:` line, nothing else either
    assert sorted(p.name for p in ck.parent.iterdir()) == ["step_000002"]  # no checkpoint written


def test_intact_copy_resumes(stopped, tmp_path):
    """The control of the cases above: the same copy, undamaged (its record copied too), resumes to the end."""
    ck = copy_checkpoint(stopped, tmp_path)
    record = tmp_path / Path(stopped["record"]).name
    record.write_bytes(Path(stopped["record"]).read_bytes())
    edit_meta(ck, lambda m: {**m, "record": str(record)})
    assert train_here(["--resume", str(ck), "--records_dir", str(tmp_path)])[0] == str(record)
    assert compare.parse_record(record).complete and compare.parse_record(record).resumed_at == [2]


def test_truncated_checkpoint_on_the_command_line(stopped, tmp_path):
    ck = copy_checkpoint(stopped, tmp_path)
    (ck / "main.pt").write_bytes((ck / "main.pt").read_bytes()[:5000])
    r = run_train(["--resume", str(ck)])
    no_traceback(r)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "cannot read main.pt" in r.stderr


# ----------------------------------------------------------------------------- folders that cannot be written


@pytest.mark.parametrize("setting", ["--records_dir", "--checkpoint_dir"])
def test_unwritable_folder_is_refused_before_the_model_and_the_record(tiny_args, tmp_path, monkeypatch, setting):
    """A folder whose path runs through a regular file (ENOTDIR: unwritable for root too): one line naming the setting,
    no model built, no record anywhere."""
    (tmp_path / "file").write_text("x")
    bad = str(tmp_path / "file" / "sub")
    built = []
    monkeypatch.setattr(t.GPT, "__init__", lambda self, *a, **k: built.append(1))
    with pytest.raises(SystemExit) as refused:
        train_here(tiny_args + [setting, bad])
    assert refused.value.code == f"{setting} {bad}: cannot write there (Not a directory: {bad}); pass a writable folder"
    assert not built and not list(tmp_path.rglob("*.txt"))


def test_read_only_folder_is_refused(tiny_args, tmp_path, monkeypatch):
    """EROFS (what a read-only mount gives root as well) on the first file made in the records folder."""
    real = t.tempfile.mkstemp

    def read_only(*a, dir=None, **k):
        if dir is not None and "records" in dir:
            raise OSError(errno.EROFS, "Read-only file system", dir)
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(t.tempfile, "mkstemp", read_only)
    with pytest.raises(SystemExit, match=r"--records_dir \S+records: cannot write there \(Read-only file system: "):
        train_here(tiny_args)
    assert not list(tmp_path.rglob("*.txt"))


def test_record_cut_by_a_full_disk_leaves_no_stub(tiny_args, tmp_path):
    """Files may not grow past 64 KB: the record's header (it holds the source, ~150 KB) cannot be written: one line,
    exit 1, the partial record removed."""
    records = tmp_path / "records"
    r = run_train(tiny_args + ["--records_dir", str(records)], limit_file_bytes=64 << 10)
    no_traceback(r)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"--records_dir {records}: cannot write the record {records}/")
    assert "(File too large)" in r.stderr and not list(records.glob("*.txt"))


# ----------------------------------------------------------------------------- the command line


# (case, command line after TINY, the value parsed or the refusal's fragment)
COMMAND_LINES = [
    ("value that is a setting", ["--label", "--seed", "3"], "--label needs a value, got the setting --seed; to pass "
                                                            "'--seed' as the value write --label=--seed"),
    ("value that is an unknown flag", ["--records_dir", "--oops"], "--records_dir needs a value, got the setting"),
    ("flag-like value with =", ["--label=--seed"], {"label": "--seed"}),
    ("empty value with =", ["--label="], {"label": ""}),
    ("empty value for a folder", ["--records_dir="], "--records_dir: must not be empty"),
    ("empty shard pattern", ["--input_bin", ""], "--input_bin: must not be empty"),
    ("blank val pattern", ["--input_val_bin", "  "], "--input_val_bin: must not be empty"),
    ("empty int", ["--num_iterations="], "--num_iterations: cannot read '' as int"),
    ("empty float", ["--muon_lr="], "--muon_lr: cannot read '' as float"),
    ("empty bool", ["--compile="], "--compile: cannot read '' as bool"),
    ("empty pair", ["--adamw_betas="], "--adamw_betas: cannot read '' as tuple[float, float]"),
    ("value of = with =", ["--label=a=b"], {"label": "a=b"}),
    ("negative batch", ["--batch_size", "-4"], "--batch_size: must be positive, got -4"),
    ("negative val tokens", ["--val_tokens=-256"], "--val_tokens: must be positive, got -256"),
    ("negative keep_checkpoints", ["--keep_checkpoints", "-1"], "--keep_checkpoints: must be >= 1"),
    ("negative loss chunk", ["--loss_chunk", "-1"], "--loss_chunk: must be >= 0"),
    ("negative gram_every", ["--gram_every", "-8"], "--gram_every: must be >= 1"),
    ("zero soap frequency", ["--soap_precondition_frequency", "0"], "--soap_precondition_frequency: must be >= 1"),
    ("single dash", ["-seed", "3"], "unknown setting '-seed'"),
    ("bare word", ["smoke"], "unknown setting 'smoke'"),
    ("last of a repeated setting wins", ["--label", "a", "--label", "b"], {"label": "b"}),
]


@pytest.mark.parametrize("case,argv,expect", COMMAND_LINES, ids=[c[0] for c in COMMAND_LINES])
def test_command_line_edge_cases(tmp_path, case, argv, expect):
    base = TINY + ["--records_dir", str(tmp_path / "rec")]
    if isinstance(expect, dict):
        args = t.parse_args(base + argv)
        t.validate_args(args, 1)
        assert {k: getattr(args, k) for k in expect} == expect
        return
    with pytest.raises(SystemExit) as refused:
        t.validate_args(t.parse_args(base + argv), 1)
    assert isinstance(refused.value.code, str) and expect in refused.value.code, refused.value.code
    assert not (tmp_path / "rec").exists()


def test_help_lists_the_settings_and_exits_0():
    r = run_train(["--help"])
    assert r.returncode == 0 and "--num_iterations" in r.stdout and "--name=value" in r.stdout, r.stderr


# ----------------------------------------------------------------------------- allocations too large


def test_model_too_large_for_memory_is_one_line(tiny_args, tmp_path):
    """A 2^32-wide embedding (~860 TB, beyond any address space, so refused whatever the overcommit policy)."""
    r = run_train(tiny_args + ["--n_embd", str(2**32)])
    no_traceback(r)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("out of memory (") and "a smaller --device_batch_size keeps the step" in r.stderr
    assert not list(tmp_path.rglob("*.txt"))


# ----------------------------------------------------------------------------- records/compare.py --plot


@pytest.mark.parametrize("where", ["folder through a file", "missing folder", "unknown format", "read-only"])
def test_plot_that_cannot_be_written_is_one_error(stopped, tmp_path, capsys, monkeypatch, where):
    (tmp_path / "file").write_text("x")
    path = {"folder through a file": tmp_path / "file" / "a.png", "missing folder": tmp_path / "no" / "a.png",
            "unknown format": tmp_path / "a.xyz", "read-only": tmp_path / "a.png"}[where]
    if where == "read-only":  # as a read-only mount answers, root included
        import matplotlib.figure

        def read_only(self, fname, *a, **k):
            raise OSError(errno.EROFS, "Read-only file system", str(fname))
        monkeypatch.setattr(matplotlib.figure.Figure, "savefig", read_only)
    assert compare.main([stopped["record"], "--plot", str(path)]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: --plot {path}: cannot write it (") and not path.exists()
    assert {"read-only": "Read-only file system", "unknown format": "Format 'xyz' is not supported"}.get(
        where, "directory") in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuDNN attention exists on CUDA")
def test_attention_backend_the_cpu_lacks_is_refused_before_the_record(tiny_args, tmp_path):
    with pytest.raises(SystemExit) as refused:
        train_here(tiny_args + ["--attention", "cudnn"])
    assert refused.value.code == ("--attention cudnn: not available on cpu for head size 32 (No viable backend for "
                                  "scaled_dot_product_attention was found); use --attention auto")
    assert not list(tmp_path.rglob("*.txt"))


# ----------------------------------------------------------------------------- a crafted checkpoint


@pytest.mark.parametrize("victim", ["another name", "the run's name, not a record", "another run's record",
                                    "the run's name, a record in another folder"])
def test_checkpoint_cannot_append_to_a_file_outside_its_run(stopped, tmp_path, victim):
    """meta.json names the file a resumed run appends to: only its own run's record (<run folder>.txt, a record, in
    --records_dir) is accepted; the file named is left as it was."""
    ck = copy_checkpoint(stopped, tmp_path)
    target = {"another name": tmp_path / "victim" / ".bashrc",
              "the run's name, not a record": tmp_path / "victim" / (ck.parent.name + ".txt"),
              "another run's record": tmp_path / "victim" / "20200101-000000-smoke-muon-00000000.txt",
              "the run's name, a record in another folder": tmp_path / "victim" / (ck.parent.name + ".txt")}[victim]
    target.parent.mkdir()
    target.write_text(t.RECORD_MARK + "\nsome record\n" if "record" in victim.split(", ")[-1] and "not" not in victim
                      else "precious\n")
    edit_meta(ck, lambda m: {**m, "record": str(target)})
    before = target.read_bytes()
    with pytest.raises(SystemExit) as refused:
        train_here(["--resume", str(ck)])
    assert "refused" in refused.value.code and str(target) in refused.value.code, refused.value.code
    assert target.read_bytes() == before


# ----------------------------------------------------------------------------- no checkpoint unless asked


def test_final_checkpoint_off_saves_only_what_is_asked(small_vocab_args, tmp_path):
    """--final_checkpoint 0 (the smoke preset's): no checkpoint at the end; --save_every still saves, the last step
    included when it is a multiple."""
    assert t.PRESETS["smoke"]["final_checkpoint"] is False
    off = tmp_path / "off"
    record, _ = train_here(small_vocab_args + ["--final_checkpoint", "0", "--records_dir",
                                               str(off)])
    assert compare.parse_record(record).complete and not lines_of(record, "checkpoint:")
    assert not list((off / "checkpoints").rglob("step_*"))
    every = tmp_path / "every"
    record, _ = train_here(small_vocab_args + ["--final_checkpoint", "0", "--save_every", "5",
                                               "--records_dir", str(every)])
    assert [line.split()[1] for line in lines_of(record, "checkpoint:")] == ["step:5/5"]
    assert [p.name for p in (every / "checkpoints").rglob("step_*")] == ["step_000005"]
