"""What a new user's probe found, each ending in no lost work, no silent wrong result, no crafted file obeyed and
one clear line: a full checkpoint folder, a second Ctrl-C, a record deleted mid-run; train data that runs out, train
and val shards that overlap, shards changed under a checkpoint; a crafted meta.json; unclear refusals; two resumes
of one checkpoint at once; --help."""
import collections
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import train_gpt2 as t
from conftest import REPO, TINY, make_shards


def train_here(args: list[str]) -> str:
    """One process, in this one, on one thread: the record's path."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return t.train(t.parse_args(args))[0]
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- no lost work

Usage = collections.namedtuple("Usage", "total used free")


def test_a_full_checkpoint_folder_keeps_the_last_good_checkpoint(small_vocab_args, tmp_path, monkeypatch):
    """The disk fills once step 2 is saved: later saves first remove older checkpoints (never the newest), then,
    still short of room, write nothing and say how much is free; the run ends with step 2 to resume from."""
    records = tmp_path / "records"
    real = t.shutil.disk_usage

    def full_after_step_2(path):
        u = real(path)
        full = any(records.glob("checkpoints/*/step_000002"))
        return Usage(u.total, u.used, 0 if full else u.free)

    monkeypatch.setattr(t.shutil, "disk_usage", full_after_step_2)
    record = train_here(small_vocab_args + ["--save_every", "1", "--keep_checkpoints", "3",
                                            "--records_dir", str(records)])
    (run,) = (records / "checkpoints").iterdir()
    assert sorted(p.name for p in run.iterdir()) == ["step_000002"]  # step 1 made room, step 2 kept, no .tmp
    lines = [x for x in Path(record).read_text().splitlines() if x.startswith("checkpoint: ")]
    assert lines[1] == f"checkpoint: step:2/5 {run / 'step_000002'}"
    for line in lines[2:]:
        assert "not saved (0.0 MiB free in " in line and "a checkpoint needs about" in line, line
        assert line.endswith(f"the previous one stays: {run / 'step_000002'}")
    assert t.find_checkpoint("latest", str(records / "checkpoints")) == str(run / "step_000002")


def test_a_checkpoint_folder_too_full_for_one_checkpoint_is_refused_at_the_start(small_vocab_args, tmp_path,
                                                                                  monkeypatch):
    """Less free space in the checkpoint folder than the weights and the embedding's AdamW moments need: refused
    before the model and the record (a run that can never save would lose every step to a stop signal)."""
    need = t.checkpoint_floor(t.parse_args(small_vocab_args))
    assert need == 4 * (12 * 2 * 64 * 64 + 3 * 256 * 64)
    real = t.shutil.disk_usage
    monkeypatch.setattr(t.shutil, "disk_usage", lambda p: Usage(real(p).total, real(p).used, need - 1))
    with pytest.raises(SystemExit, match=rf"^--checkpoint_dir {tmp_path / 'r' / 'checkpoints'}: 0.6 MiB free, "
                                         r"a checkpoint of this run needs 0.6 MiB or more; free space there or "
                                         r"pass another --checkpoint_dir$"):
        train_here(small_vocab_args + ["--records_dir", str(tmp_path / "r")])
    assert not list((tmp_path / "r").glob("*.txt"))


def test_a_second_ctrl_c_stops_at_once_naming_the_checkpoint(capfd):
    """The first SIGINT asks for a checkpoint at the end of the step; a second one ends the run at once with exit
    status 130 and one line naming the checkpoint to continue from, not a KeyboardInterrupt traceback."""
    signals = t.StopSignals()
    signals.last = lambda: "/runs/x/step_000004"
    signals._handle(signal.SIGINT, None)
    assert signals.signum == signal.SIGINT
    with pytest.raises(SystemExit) as e:
        signals._handle(signal.SIGINT, None)
    assert e.value.code == 130
    err = capfd.readouterr().err.splitlines()
    assert err[-1] == ("SIGINT again: stopped at once, without a checkpoint of this step; continue with --resume "
                       "/runs/x/step_000004")


def test_a_record_deleted_mid_run_is_written_again_whole(tmp_path, capfd):
    """The record file is deleted while the run writes it: the next line writes it again at its path with every
    line so far, and says so once on stderr."""
    args = t.parse_args(TINY + ["--records_dir", str(tmp_path)])
    path = str(tmp_path / "r.txt")
    record = t.Record(args, 1, torch.device("cpu"), path)
    record.log("step:1/5 train_loss:1.0")
    head = Path(path).read_text()
    os.remove(path)
    record.log("step:2/5 train_loss:0.9")
    record.log("step:3/5 train_loss:0.8")
    record.finish(1)
    assert Path(path).read_text() == head + "step:2/5 train_loss:0.9\nstep:3/5 train_loss:0.8\n" + \
        "peak memory consumption: 1 MiB\n"
    assert capfd.readouterr().err.count(f"record: {path} was deleted during the run; written again") == 1


# ----------------------------------------------------------------------------- no silent wrong results


def test_train_data_that_runs_out_says_how_many_passes(tmp_path):
    """One 300-token train shard holds 2 steps of 128 tokens (its tail skipped); 5 steps read it 2.5 times: the
    record says so in one line before the first step. The usual case says 0.xx passes and nothing more."""
    train, val = make_shards(tmp_path / "s", train_sizes=(300,))
    record = train_here(TINY + ["--input_bin", train, "--input_val_bin", val, "--records_dir", str(tmp_path / "r"),
                                "--final_checkpoint", "0"])
    text = Path(record).read_text().split(t.RECORD_MARK)[-1]
    line = "train data: 300 tokens in 1 shard for 640 tokens of steps: 2.50 passes (steps after 2 read the same " \
           "tokens again)"
    assert line in text.splitlines() and text.index(line) < text.index("step:1/5")
    train, _ = make_shards(tmp_path / "t")
    args = t.parse_args(TINY + ["--input_bin", train])
    assert t.passes_line(t.check_shards(train, 129, "train"), args) == \
        "train data: 5500 tokens in 2 shards for 640 tokens of steps: 0.12 passes"


@pytest.mark.parametrize("how", ["the same pattern", "a pattern matching both", "a hard link"])
def test_train_shards_that_include_the_val_shard_are_refused(tmp_path, how):
    """--input_bin matching the val shard (by its path, or by another path of the same file) is refused before
    anything is built: the run would train on the tokens it validates on."""
    train, val = make_shards(tmp_path / "s", val_sizes=(3000,))
    if how == "the same pattern":
        train = val
    elif how == "a pattern matching both":
        train = str(tmp_path / "s" / "t_*.bin")
    else:
        os.link(tmp_path / "s" / "t_val_000000.bin", tmp_path / "s" / "t_train_000009.bin")
    with pytest.raises(t.ShardError, match=r"the train shards include the val shard .*: the run would train on the "
                                           r"tokens it validates on\n  fix: pass an --input_bin that matches train"):
        train_here(TINY + ["--input_bin", train, "--input_val_bin", val, "--records_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_resume_refuses_a_shard_changed_in_place(small_vocab_args, tmp_path):
    """A shard rewritten with other tokens of the same count under the same name is refused on resume (the
    checkpoint keeps each shard's size and the sha256 of its first and last MiB)."""
    records = tmp_path / "records"
    train_here(small_vocab_args + ["--stop_at", "2", "--records_dir", str(records)])
    (run,) = (records / "checkpoints").iterdir()
    meta = t.read_checkpoint_meta(str(run / "step_000002"))
    assert [len(e) for e in meta["train_files"]] == [3, 3]
    shard = tmp_path / "shards" / "t_train_000002.bin"
    data = bytearray(shard.read_bytes())
    data[-2:] = bytes([(data[-2] + 1) % 256, 0])  # the last token, another id < 256
    shard.write_bytes(bytes(data))
    with pytest.raises(t.ShardError, match="train shard t_train_000002.bin has the name and token count the "
                                           "checkpoint .* was saved with but other contents"):
        train_here(["--resume", "latest", "--records_dir", str(records)])


# ----------------------------------------------------------------------------- records/compare.py

from test_compare import SOURCE, c, write_ours, write_upstream  # noqa: E402


def test_compare_lists_stopped_runs_apart(tmp_path, capsys):
    """A `--stop_at 3` run of a 6-step schedule is complete at step 3 but is not pooled with 6-step runs in one
    mean: the table has the two 6-step runs, the stopped run is listed under it with its step and val loss."""
    for tag, final in (("a", 3.3), ("b", 3.4)):
        write_ours(tmp_path, n=6, val_every=1, final=final, tag=tag)
    stopped = write_ours(tmp_path, n=6, val_every=1, stop_at=3, tag="c")
    stopped.write_text(stopped.read_text() + "stopped: step:3/6 by --stop_at; continue with --resume x\n"
                       "peak memory consumption: 1 MiB\n")
    assert c.parse_record(stopped).complete and c.parse_record(stopped).stopped_at == 3
    assert c.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("muon "))
    assert row.split()[1] == "2" and "3.3500 ± 0.0707" in row  # the two 6-step runs only
    assert f"  {stopped} [muon]: step 3/6, val_loss " in out.split("stopped by --stop_at")[1]
    assert c.main([str(tmp_path), "--at", "3"]) == 0  # cut at one step, every run counts
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("muon "))
    assert row.split()[1] == "3"


def test_compare_plot_prints_the_path_it_wrote(tmp_path, capsys):
    """--plot NAME without an extension writes NAME.png, --plot FOLDER writes FOLDER/compare.png: the line says
    which, and that file is there."""
    write_ours(tmp_path / "r", n=20)
    for given, written in ((tmp_path / "curves", tmp_path / "curves.png"),
                           (tmp_path / "r", tmp_path / "r" / "compare.png"),
                           (tmp_path / "x.png", tmp_path / "x.png")):
        assert c.main([str(tmp_path / "r" / "20250301-120000-smoke-muon-0000000a.txt"), "--plot", str(given)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == f"plot: {written}" and written.is_file()


def test_compare_by_config_separates_runs_of_other_code(tmp_path, capsys):
    """A run's code is part of its config: our records with the same settings and other source between the record
    marks are two configs (`configs differ in` names the code); upstream logs without printed code (a SOAP one and
    a Muon one) are each a group of their own, never one group "upstream"."""
    a = write_ours(tmp_path, tag="a")
    b = write_ours(tmp_path, tag="b")
    b.write_text(b.read_text().replace(SOURCE, SOURCE.replace("def train(", "def train( ")))
    ra, rb = c.parse_record(a), c.parse_record(b)
    assert ra.code == c.code_hash(SOURCE) and rb.code != ra.code and ra.config != rb.config
    assert c.config_differences(c.group_runs([ra, rb], "config")) == {ra.config: {"code": ra.code},
                                                                       rb.config: {"code": rb.code}}
    ups = []
    for name in ("soap", "muon"):
        p = write_upstream(tmp_path / "up" / name / "log.txt")
        p.write_text(p.read_text().split("=" * 100 + "\n", 1)[1])  # the log starts at its first `====`
        ups.append(c.parse_record(p))
    assert ups[0].config != ups[1].config and "upstream" not in c.group_runs(ups, "config")
    with_code = [c.parse_record(write_upstream(tmp_path / "up" / f"{i}.txt")) for i in range(2)]
    assert with_code[0].config == with_code[1].config  # the same code: one group


# ----------------------------------------------------------------------------- the downloader

sys.path.insert(0, str(REPO / "data"))
import cached_fineweb10B as dl  # noqa: E402


def test_download_error_does_not_echo_the_endpoints_password(tmp_path, monkeypatch):
    """HF_ENDPOINT=http://user:secret@host: a failed download's `error:` line names the host, never the
    credentials, also where the underlying error quotes the URL."""
    monkeypatch.setattr(dl.constants, "ENDPOINT", "http://user:secret@127.0.0.1:9")

    def refused(filename, local_dir, repo_id):
        raise dl.httpx2.ConnectError("cannot connect to http://user:secret@127.0.0.1:9/datasets/x")

    monkeypatch.setattr(dl, "download", refused)
    with pytest.raises(SystemExit) as e:
        dl.fetch("fineweb_val_000000.bin", tmp_path, "kjj0/fineweb10B-gpt2")
    assert "secret" not in e.value.code and "user:" not in e.value.code
    assert e.value.code.startswith("error: could not download fineweb_val_000000.bin from dataset repo "
                                   "kjj0/fineweb10B-gpt2 at http://***@127.0.0.1:9: cannot reach the hub")


@pytest.mark.parametrize("argv,line", [
    (["-1"], "error: N=-1: the number of train shards to fetch, 0 .. 103 (kjj0/fineweb10B-gpt2 has 103)"),
    (["--num_iteration", "5"], "error: unknown setting '--num_iteration'; did you mean --num_iterations? (arguments: "
                               "N, --local_dir, --repo_id, then any setting of train_gpt2.py: python train_gpt2.py "
                               "--help lists them)")])
def test_download_bad_arguments_answer_in_one_line(argv, line, tmp_path):
    """A negative N or an unknown setting: one `error:` line, not the trainer's list of every setting."""
    with pytest.raises(SystemExit) as e:
        dl.main(argv + ["--local_dir", str(tmp_path)])
    assert e.value.code == line


# ----------------------------------------------------------------------------- clear messages


@pytest.mark.parametrize("val_size,fix", [
    (1000, "pass --val_tokens 960 (the most whole val batches of 1 processes x --device_batch_size 2 x "
           "--sequence_length 32 = 64 tokens they hold)"),
    (0, "one val batch (1 processes x --device_batch_size 2 x --sequence_length 32 = 64 tokens) needs val shards of "
        "65 tokens or more: use larger val shards, or a smaller --device_batch_size or --sequence_length")])
def test_too_small_val_shards_name_a_value_that_works(tmp_path, val_size, fix):
    """Val shards too small for --val_tokens: the fix names the largest --val_tokens that fits and is a multiple of
    the val batch, or, when not even one batch fits (an empty shard), what to change instead (never `<= -1`)."""
    train, val = make_shards(tmp_path / "s", val_sizes=(val_size,))
    with pytest.raises(t.ShardError) as e:
        train_here(TINY + ["--input_bin", train, "--input_val_bin", val, "--val_tokens", "1024",
                           "--records_dir", str(tmp_path / "r")])
    assert str(e.value).endswith(f"val shards hold {val_size} tokens, fewer than --val_tokens 1024 + 1\n  fix: {fix}")
    assert int(fix.split()[2]) % 64 == 0 if fix.startswith("pass") else True


def test_val_tokens_not_a_multiple_names_the_nearest_multiples():
    with pytest.raises(SystemExit) as e:
        t.validate_args(t.parse_args(TINY + ["--val_tokens", "100"]), 1)
    assert e.value.code.endswith("--sequence_length 32 = 64: pass 64 or 128")
    with pytest.raises(SystemExit) as e:
        t.validate_args(t.parse_args(TINY + ["--val_tokens", "30"]), 1)
    assert e.value.code.endswith("= 64: pass 64")


def test_a_second_resume_of_one_run_at_once_is_refused(small_vocab_args, tmp_path):
    """While one process continues a run (it holds <run folder>/.lock), a second --resume of it is refused before
    it writes anything; the lock file goes with the run that held it, and the run then resumes."""
    import fcntl
    records = tmp_path / "records"
    record = train_here(small_vocab_args + ["--stop_at", "2", "--records_dir", str(records)])
    (run,) = (records / "checkpoints").iterdir()
    before = Path(record).read_bytes()
    with open(run / ".lock", "a") as held:  # as the first resumed run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match=r"^--resume: another process is continuing this run already \(it "
                                             rf"holds {run / '.lock'}\); wait for it to end, or stop it$"):
            train_here(["--resume", "latest", "--records_dir", str(records)])
        assert Path(record).read_bytes() == before
    os.remove(run / ".lock")
    assert train_here(["--resume", "latest", "--records_dir", str(records)]) == record
    assert not (run / ".lock").exists() and "resumed: step:2/5" in Path(record).read_text()


def test_help_lists_every_setting_with_its_default_and_help(capsys):
    """--help: one line per setting, `--name (default): help`, the run's settings and every optimizer's."""
    with pytest.raises(SystemExit) as e:
        t.parse_args(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for f in t.fields(t.Hyperparameters):
        (line,) = [x for x in lines if x.startswith(f"  --{f.name} (")]
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        head = f"  --{f.name} ({default}): "
        assert line.startswith(head) and len(line) > len(head) + 3, line
    assert "  --num_iterations (7000): optimizer steps of the run" in lines
    assert "  --muon_lr (0.018): " in "\n".join(lines) and "  --adamw_betas (0.9,0.95): b1, b2" in lines


# ----------------------------------------------------------------------------- README


def test_readme_describes_the_smoke_preset_as_the_code_sets_it():
    """README's smoke row: the preset's depth, width, tokens a step and micro-batch, steps, val interval and tokens,
    and that it saves no checkpoint; the test command's offline requirement is stated."""
    text = (REPO / "README.md").read_text()
    smoke = t.parse_args(["--preset", "smoke"])
    (row,) = [line for line in text.splitlines() if line.startswith("| `smoke` |")]
    for part in (f"{smoke.n_layer} layers × {smoke.n_embd} wide",
                 f"{smoke.batch_size} × {smoke.sequence_length} = {smoke.batch_size * smoke.sequence_length} tokens "
                 f"a step ({smoke.device_batch_size} × {smoke.sequence_length} a micro-batch)",
                 f"{smoke.num_iterations} steps", f"val every {smoke.val_loss_every} on {smoke.val_tokens:,} tokens"):
        assert part in row, part
    assert not smoke.final_checkpoint and "no checkpoint" in row
    assert "`TIKTOKEN_CACHE_DIR`" in text.split("## The two commands")[1].split("##")[0]


@pytest.mark.slow
def test_two_ctrl_c_in_a_row_end_without_a_traceback(tiny_args, tmp_path):
    """The trainer as a command, a second SIGINT once the first is acknowledged: exit status 130 and no traceback;
    the second SIGINT's line when it came before the step's save ended the run (a signal sent twice before it is
    handled arrives once, so the second waits for the first's line)."""
    import subprocess
    from conftest import subprocess_env
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py")] + tiny_args + ["--num_iterations", "40"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
                            cwd=REPO)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("step:2/"):
                proc.send_signal(signal.SIGINT)
            if line.startswith("SIGINT: stopping"):
                proc.send_signal(signal.SIGINT)
                break
        out.append(proc.communicate(timeout=120)[0])
    finally:
        proc.kill()
    text = "".join(out)
    assert proc.returncode == 130 and "Traceback" not in text, text[-3000:]
    assert ("SIGINT again: stopped at once, without a checkpoint of this step; no checkpoint to continue from" in text
            or "stopped: " in text), text[-3000:]
