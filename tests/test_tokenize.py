"""Tests for data/fineweb.py: local files -> GPT-2 token shards in the FineWeb format."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiktoken

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from data.fineweb import tokenize, write_datafile  # noqa: E402

# offline GPT-2 BPE files: CI exports TIKTOKEN_CACHE_DIR (possibly relative); make it absolute for subprocesses
if os.environ.get("TIKTOKEN_CACHE_DIR"):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(os.environ["TIKTOKEN_CACHE_DIR"])
elif (REPO.parent / "shared" / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(REPO.parent / "shared" / "tiktoken_cache")

EOT = 50256

# file name -> content; names chosen so that sorted order differs from this order
DOCS = {
    "c_english.txt": "The quick brown fox jumps over the lazy dog.\n" * 20,
    "a_unicode.txt": "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, emoji 🦊🚀 — “quotes” … ½\n" * 8,
    "b_crlf.txt": "Windows line endings\r\nare kept\r\nbyte for byte.\r\n\tTabs and  double  spaces.",
    "d_empty.txt": "",
    "e_code.txt": "def f(x):\n    return x ** 2  # <|endoftext|> is plain text here\n" * 5,
}


def read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    header = np.fromfile(path, dtype=np.int32, count=256)
    tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
    return header, tokens


def run_fineweb(files_glob: str, out_dir: Path, shard_size: int) -> list[Path]:
    cmd = [sys.executable, str(REPO / "data" / "fineweb.py"), "--files", files_glob, "--out_dir", str(out_dir),
           "--name", "t", "--shard_size", str(shard_size), "--workers", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted(out_dir.glob("t_*.bin"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))  # by shard index


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tiktoken.get_encoding("gpt2")


@pytest.fixture()
def doc_dir(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_bytes(text.encode("utf-8"))
    return d


@pytest.mark.parametrize("shard_size", [37, 256, 100_000])
def test_files_to_shards(tmp_path: Path, doc_dir: Path, enc: tiktoken.Encoding, shard_size: int) -> None:
    out_dir = tmp_path / "out"
    shards = run_fineweb(str(doc_dir / "*.txt"), out_dir, shard_size)

    expected = []
    for name in sorted(DOCS):
        expected += [EOT] + enc.encode_ordinary(DOCS[name])
    n = len(expected)  # a corpus within one shard is split: val the first tenth, train the rest
    sizes = [shard_size] * (n // shard_size) + [n % shard_size] * (n % shard_size > 0) if n > shard_size else \
        [n // 10, n - n // 10]
    assert [p.name for p in shards] == ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, len(sizes))]

    all_tokens = []
    for i, path in enumerate(shards):
        header, tokens = read_shard(path)
        assert header[0] == 20240520 and header[1] == 1 and (header[3:] == 0).all()
        assert header[2] == len(tokens) and path.stat().st_size == 256 * 4 + 2 * header[2]
        assert len(tokens) == sizes[i]
        all_tokens.append(tokens)
    all_tokens = np.concatenate(all_tokens)
    assert all_tokens.tolist() == expected

    # documents start at each EOT and decode back to the original text
    starts = np.flatnonzero(all_tokens == EOT).tolist()
    assert len(starts) == len(DOCS)
    ends = starts[1:] + [len(all_tokens)]
    texts = [enc.decode(all_tokens[s + 1:e].tolist()) for s, e in zip(starts, ends)]
    assert texts == [DOCS[name] for name in sorted(DOCS)]


def test_tokenize(enc: tiktoken.Encoding) -> None:
    toks = tokenize("héllo wörld")
    assert toks.dtype == np.uint16
    assert toks[0] == EOT and toks[1:].tolist() == enc.encode_ordinary("héllo wörld")
    assert tokenize("").tolist() == [EOT]


def test_write_datafile_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    write_datafile(str(path), [EOT, 0, 1, 65535])
    header, tokens = read_shard(path)
    assert header[:3].tolist() == [20240520, 1, 4]
    assert tokens.tolist() == [EOT, 0, 1, 65535]


@pytest.mark.parametrize("bad", [[1, 2, 65536], np.array([70000], dtype=np.int64), [-1]])
def test_write_datafile_rejects_out_of_range(tmp_path: Path, bad) -> None:
    path = tmp_path / "bad.bin"
    with pytest.raises(ValueError):
        write_datafile(str(path), bad)
    assert not path.exists()


def run_fineweb_raw(args: list[str], env: dict | None = None, limit_file_bytes: int = 0) -> subprocess.CompletedProcess:
    """data/fineweb.py with these arguments (not asserting success); limit_file_bytes > 0: RLIMIT_FSIZE."""
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    return subprocess.run([sys.executable, str(REPO / "data" / "fineweb.py"), "--workers", "2", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit if limit_file_bytes else None)


def one_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    for fragment in fragments:
        assert fragment in line, line
    return line


def test_no_network_and_no_tokenizer_cache_is_one_error(tmp_path: Path, doc_dir: Path) -> None:
    """An empty TIKTOKEN_CACHE_DIR and every HTTPS request sent to a closed proxy port: tiktoken cannot fetch the
    GPT-2 files; one line says where they go, nothing is written."""
    closed = "http://127.0.0.1:9"
    proc = run_fineweb_raw(["--files", str(doc_dir / "*.txt"), "--out_dir", str(tmp_path / "out")],
                           env={"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": closed,
                                "https_proxy": closed, "NO_PROXY": "", "no_proxy": ""})
    one_error(proc, "error: cannot load the GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    assert not list((tmp_path / "out").glob("*.bin"))


def test_file_that_is_not_utf8_is_one_error_and_no_shards_stay(tmp_path: Path, doc_dir: Path) -> None:
    for i in range(40):  # whole chunks of the pool's work (16 files each) before the bad file: shards get written
        (doc_dir / f"y_{i:02d}.txt").write_text(f"document number {i}, a line of English text.\n" * 3)
    (doc_dir / "z_latin1.txt").write_bytes("café crème".encode("latin-1"))
    proc = run_fineweb_raw(["--files", str(doc_dir / "*.txt"), "--out_dir", str(tmp_path / "out"),
                            "--shard_size", "40"])
    one_error(proc, f"error: {doc_dir / 'z_latin1.txt'}: not UTF-8 text (byte 0xe9 at offset 3)", "removed")
    assert not list((tmp_path / "out").glob("*.bin"))  # the shards written before it are gone


def test_out_dir_that_cannot_be_made_is_one_error(tmp_path: Path, doc_dir: Path) -> None:
    (tmp_path / "file").write_text("x")
    proc = run_fineweb_raw(["--files", str(doc_dir / "*.txt"), "--out_dir", str(tmp_path / "file" / "out")])
    one_error(proc, f"error: --out_dir {tmp_path / 'file' / 'out'}: cannot create it (Not a directory)")


def test_full_disk_while_writing_shards_removes_them(tmp_path: Path, doc_dir: Path) -> None:
    """No file may grow past 1200 bytes (a shard of 100 tokens is 1224): the first shard's write fails."""
    proc = run_fineweb_raw(["--files", str(doc_dir / "*.txt"), "--out_dir", str(tmp_path / "out"),
                            "--shard_size", "100"], limit_file_bytes=1200)
    one_error(proc, "error: cannot write", "File too large", "removed")
    assert not list((tmp_path / "out").glob("*.bin"))


@pytest.mark.parametrize("args,fragment", [(["--shard_size", "0"], "--shard_size must be in [1, 2147483647]"),
                                           (["--shard_size", str(2**31)], "--shard_size must be in"),
                                           (["--workers", "0"], "--workers must be positive"),
                                           (["--name", ""], "--name must be a plain file name prefix"),
                                           (["--name", "a/b"], "--name must be a plain file name prefix")])
def test_bad_arguments_are_refused(tmp_path: Path, doc_dir: Path, args: list[str], fragment: str) -> None:
    proc = run_fineweb_raw(["--files", str(doc_dir / "*.txt"), "--out_dir", str(tmp_path / "out"), *args])
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shard_size", [10**8, 839, 838])
def test_any_corpus_size_gives_val_and_train(tmp_path: Path, doc_dir: Path, shard_size: int) -> None:
    """The default shard size on a small corpus (and a shard size equal to the corpus, one token short of it): val and
    train shards that the trainer accepts, the split said in one line."""
    (doc_dir / "d_empty.txt").unlink()
    n = sum(1 + len(tiktoken.get_encoding("gpt2").encode_ordinary(text)) for name, text in DOCS.items()
            if name != "d_empty.txt")
    assert n == 839
    cmd = [sys.executable, str(REPO / "data" / "fineweb.py"), "--files", str(doc_dir / "*.txt"), "--out_dir",
           str(tmp_path / "out"), "--name", "t", "--shard_size", str(shard_size)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shards = sorted((tmp_path / "out").glob("t_*.bin"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert [len(read_shard(p)[1]) for p in shards] == ([83, 756] if shard_size >= n else [838, 1])
    notes = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert notes == ([f"note: the corpus has 839 tokens, at most one shard of --shard_size {shard_size:,}: the val "
                      f"shard takes the first 83 (a tenth), the train shard the other 756"] if shard_size >= n else [])
    import train_gpt2 as t
    assert len(t.check_shards(str(tmp_path / "out" / "t_train_*.bin"), 1, "train")) == 1
    assert len(t.check_shards(str(tmp_path / "out" / "t_val_*.bin"), 1, "val")) == 1


def test_corpus_of_one_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("")
    proc = run_fineweb_raw(["--files", str(tmp_path / "docs" / "*.txt"), "--out_dir", str(tmp_path / "out")])
    line = one_error(proc, "error: the corpus has 1 token(s) (1 document(s)): a val and a train shard need 2 or more")
    assert "removed" not in line and not list((tmp_path / "out").glob("*.bin"))


def test_empty_input_files_are_warned_about(tmp_path: Path, doc_dir: Path) -> None:
    (doc_dir / "f_empty.txt").write_bytes(b"")
    proc = run_fineweb_raw(["--files", str(doc_dir / "*.txt"), "--out_dir", str(tmp_path / "out")])
    assert proc.returncode == 0, proc.stderr
    (warning,) = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warning == (f"warning: 2 empty file(s), each a document of one <|endoftext|> token: "
                       f"{doc_dir / 'd_empty.txt'}, {doc_dir / 'f_empty.txt'}")


def test_out_dir_with_shards_of_another_run_is_refused_or_cleaned(tmp_path: Path, doc_dir: Path) -> None:
    """Nine shards t_* already there (the new run makes three) would join the trainer's glob: refused, untouched;
    --clean deletes them (only them) and writes the new set."""
    out = tmp_path / "out"
    run_fineweb(str(doc_dir / "*.txt"), out, 100)
    old = {p.name: p.read_bytes() for p in out.glob("t_*.bin")}
    assert len(old) == 9
    (out / "other_train_000001.bin").write_bytes(b"not ours")
    (out / "t_notes.bin").write_bytes(b"not a shard name")
    args = ["--files", str(doc_dir / "*.txt"), "--out_dir", str(out), "--name", "t", "--shard_size", "300"]
    one_error(run_fineweb_raw(args), f"error: {out} already holds 9 shard(s) t_val_/_train_*.bin of another run",
              "pass --clean")
    assert {p.name: p.read_bytes() for p in out.glob("t_*_0*.bin")} == old
    proc = run_fineweb_raw(args + ["--clean"])
    assert proc.returncode == 0 and f"removed 9 old shard(s) t_*.bin from {out} (--clean)" in proc.stdout, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["other_train_000001.bin", "t_notes.bin", "t_train_000001.bin",
                                                     "t_train_000002.bin", "t_val_000000.bin"]
