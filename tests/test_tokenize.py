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
    n_shards = -(-len(expected) // shard_size)
    assert [p.name for p in shards] == ["t_val_000000.bin"] + [f"t_train_{i:06d}.bin" for i in range(1, n_shards)]

    all_tokens = []
    for i, path in enumerate(shards):
        header, tokens = read_shard(path)
        assert header[0] == 20240520 and header[1] == 1 and (header[3:] == 0).all()
        assert header[2] == len(tokens) and path.stat().st_size == 256 * 4 + 2 * header[2]
        if i < len(shards) - 1:
            assert len(tokens) == shard_size
        else:
            assert 0 < len(tokens) <= shard_size
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
