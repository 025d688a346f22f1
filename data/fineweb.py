"""
Tokenize FineWeb (or local text files) into GPT-2 token shards.

Shard format (same as upstream modded-nanogpt / llm.c):
    256 x int32 header: [20240520 (magic), 1 (version), token count, 0, ...]
    then the tokens, each a uint16.

Every document is prefixed with <|endoftext|> (50256). Shards hold exactly
--shard_size tokens (the last one holds the remainder); a document that does
not fit fills the current shard and its remainder starts the next one.
Shard 0 is the validation shard: {name}_val_000000.bin, then
{name}_train_000001.bin, {name}_train_000002.bin, ... A corpus of at most
--shard_size tokens is split: val the first tenth, train the rest (a corpus of
any size >= 2 tokens gives val + train). --out_dir already holding
{name}_val_/{name}_train_ shards is refused (the trainer's glob would mix them
in) unless --clean deletes them first. Empty input files are warned about.

Usage:
    # FineWeb from the Hugging Face hub (needs `pip install datasets`)
    python data/fineweb.py --version 10B
    # local UTF-8 text files, one document per file, in sorted path order
    python data/fineweb.py --files "corpus/*.txt" --out_dir data/mydata --name mydata
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import multiprocessing as mp
import os
import re
import time
from typing import Any, Iterable, Iterator

import numpy as np
import tiktoken

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256

_enc: tiktoken.Encoding | None = None  # created lazily, once per process


def get_encoder() -> tiktoken.Encoding:
    """The GPT-2 tokenizer, loaded on first use."""
    global _enc
    if _enc is None:
        _enc = tiktoken.get_encoding("gpt2")
    return _enc


def load_encoder() -> None:
    """get_encoder() in this process, before any worker starts: without the network and without tiktoken's cached
    GPT-2 files, one error line saying where they go."""
    try:
        get_encoder()
    except Exception as e:  # requests' ConnectionError (an OSError), a bad cache file (ValueError), ...
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "a temp folder"
        raise SystemExit(f"error: cannot load the GPT-2 tokenizer ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]}): tiktoken downloads its files once (this "
                         f"needs the network) into TIKTOKEN_CACHE_DIR ({cache}); run once with the network, or set "
                         f"TIKTOKEN_CACHE_DIR to a folder holding a copy of them") from None


def write_datafile(filename: str, toks: Any) -> None:
    """Write tokens to `filename`: a 256 x int32 header, then the tokens as uint16."""
    toks = np.asarray(toks)
    if toks.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {toks.shape}")
    if len(toks) >= 2**31:
        raise ValueError(f"token count too large: {len(toks):,}")
    if toks.dtype != np.uint16:
        if len(toks) and not np.issubdtype(toks.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got dtype {toks.dtype}")
        if len(toks) and (toks.min() < 0 or toks.max() >= 2**16):
            raise ValueError("token values must be in [0, 65536) to fit in uint16")
        toks = toks.astype(np.uint16)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0] = MAGIC
    header[1] = VERSION
    header[2] = len(toks)
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.tobytes())


def tokenize(doc: str) -> np.ndarray:
    """Tokenize one document: <|endoftext|> first, then its GPT-2 tokens, as uint16."""
    enc = get_encoder()
    tokens = np.array([enc.eot_token] + enc.encode_ordinary(doc), dtype=np.int64)
    if not ((0 <= tokens).all() and (tokens < 2**16).all()):
        raise ValueError("token dictionary too large for uint16")
    return tokens.astype(np.uint16)


class InputError(Exception):
    """A local input file that cannot be used (unreadable, not UTF-8): its one-line reason."""


def _tokenize_file(path: str) -> np.ndarray:
    """Pool worker: one local file is one document, read as UTF-8 bytes (no newline translation)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return tokenize(data.decode("utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); convert it "
                         f"(e.g. iconv -t utf-8) or leave it out") from None


def _tokenize_row(row: dict) -> np.ndarray:
    """Pool worker: one FineWeb row is one document."""
    return tokenize(row["text"])


def shard_path(out_dir: str, name: str, index: int) -> str:
    """Shard 0 is val, the rest are train."""
    split = "val" if index == 0 else "train"
    return os.path.join(out_dir, f"{name}_{split}_{index:06d}.bin")


def write_shards(docs: Iterable[np.ndarray], out_dir: str, name: str, shard_size: int,
                 paths: list[str] | None = None) -> list[str]:
    """Pack tokenized documents into shards of `shard_size` tokens, shard 0 the val shard; returns the written paths
    (also appended to `paths` as each is started, so a caller can remove them after a failure). A full shard is
    written once more tokens follow it, so any corpus of n >= 2 tokens yields val + train: n <= shard_size is split,
    val the first max(1, n // 10) tokens, train the rest. n < 2: InputError."""
    if shard_size <= 0:
        raise ValueError("shard_size must be positive")
    buf = np.empty((shard_size,), dtype=np.uint16)  # the shard being filled
    fill, n_docs, n_tokens, paths = 0, 0, 0, ([] if paths is None else paths)
    t0 = time.time()

    def flush(tokens: np.ndarray) -> None:
        path = shard_path(out_dir, name, len(paths))
        paths.append(path)
        write_datafile(path, tokens)
        dt = time.time() - t0
        print(f"wrote {len(tokens):,} tokens to {path} | {n_docs:,} docs, "
              f"{n_tokens:,} tokens so far | {n_tokens / max(dt, 1e-9):,.0f} tok/s", flush=True)

    for tokens in docs:
        n_docs += 1
        n_tokens += len(tokens)
        pos = 0
        # fill the current shard; whatever does not fit spills into the next one(s)
        while pos < len(tokens):
            if fill == shard_size:  # full, and more tokens follow
                flush(buf)
                fill = 0
            take = min(shard_size - fill, len(tokens) - pos)
            buf[fill:fill + take] = tokens[pos:pos + take]
            fill += take
            pos += take
    if paths:  # the last shard (train), full or partial
        flush(buf[:fill])
    elif fill >= 2:  # the whole corpus fits in one shard: split it into val and train
        v = max(1, fill // 10)
        print(f"note: the corpus has {fill:,} tokens, at most one shard of --shard_size {shard_size:,}: the val shard "
              f"takes the first {v:,} (a tenth), the train shard the other {fill - v:,}", flush=True)
        flush(buf[:v])
        flush(buf[v:fill])
    else:
        raise InputError(f"the corpus has {fill} token(s) ({n_docs} document(s)): a val and a train shard need 2 or "
                         f"more")
    return paths


def expand_files(patterns: list[str]) -> list[str]:
    """Expand glob patterns (or plain paths) into a sorted, de-duplicated list of files."""
    paths = set()
    for pattern in patterns:
        matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise SystemExit(f"no files match {pattern!r}")
        paths.update(matches)
    return sorted(paths)


def load_fineweb(version: str) -> Any:
    """The FineWeb sample-10BT / sample-100BT train split, via the `datasets` library."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise SystemExit("FineWeb mode needs the `datasets` library: pip install datasets")
    remote_name = {"10B": "sample-10BT", "100B": "sample-100BT"}[version]
    try:
        return load_dataset("HuggingFaceFW/fineweb", name=remote_name, split="train")
    except Exception as e:  # no network, offline mode, a full cache disk, ...
        raise SystemExit(f"error: cannot load FineWeb {remote_name} from the Hugging Face hub ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:200]}); or tokenize local files with --files")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize FineWeb or local text files into GPT-2 token shards")
    parser.add_argument("-v", "--version", type=str, default="10B", choices=["10B", "100B"],
                        help="which FineWeb sample to use (ignored with --files)")
    parser.add_argument("--files", type=str, nargs="+", default=None,
                        help="glob(s) of local UTF-8 text files, one document per file, used instead of FineWeb")
    parser.add_argument("--out_dir", type=str, default=None,
                        help="output directory (default for FineWeb: data/fineweb{version} next to this script)")
    parser.add_argument("--name", type=str, default="fineweb", help="shard file name prefix")
    parser.add_argument("-s", "--shard_size", type=int, default=10**8, help="tokens per shard")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 2),
                        help="tokenizer processes")
    parser.add_argument("--clean", action="store_true",
                        help="delete the <name>_val_/<name>_train_ shards already in --out_dir first (without it, such "
                             "shards are refused: the trainer's glob would mix them with the new ones)")
    args = parser.parse_args(argv)
    if not 0 < args.shard_size < 2**31:
        parser.error(f"--shard_size must be in [1, {2**31 - 1}] (the header's int32 token count)")
    if args.workers <= 0:
        parser.error("--workers must be positive")
    if not args.name or os.sep in args.name or args.name.startswith("."):
        parser.error(f"--name must be a plain file name prefix, got {args.name!r}")

    worker: Any
    docs: Iterable[Any]
    if args.files:
        if args.out_dir is None:
            parser.error("--out_dir is required with --files")
        docs = expand_files(args.files)
        worker = _tokenize_file
        out_dir = args.out_dir
        print(f"tokenizing {len(docs):,} files", flush=True)
        empty = [p for p in docs if os.path.getsize(p) == 0]
        if empty:
            print(f"warning: {len(empty)} empty file(s), each a document of one <|endoftext|> token: "
                  f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}", flush=True)
    else:
        out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"fineweb{args.version}")
        docs = load_fineweb(args.version)
        worker = _tokenize_row
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out_dir {out_dir}: cannot create it ({e.strerror or e})") from None
    stale = [p for p in sorted(glob.glob(os.path.join(glob.escape(out_dir), glob.escape(args.name) + "_*.bin")))
             if re.fullmatch(re.escape(args.name) + r"_(val|train)_\d{6}\.bin", os.path.basename(p))]
    if stale and not args.clean:
        raise SystemExit(f"error: {out_dir} already holds {len(stale)} shard(s) {args.name}_val_/_train_*.bin of "
                         f"another run, which the trainer's glob would mix with the new ones: pass --clean to "
                         f"delete them first, or another --out_dir or --name")
    for path in stale:
        try:
            os.remove(path)
        except OSError as e:
            raise SystemExit(f"error: --clean: cannot delete {path} ({e.strerror or e})") from None
    if stale:
        print(f"removed {len(stale)} old shard(s) {args.name}_*.bin from {out_dir} (--clean)", flush=True)
    load_encoder()  # here, not in each worker: one clear error without the network

    t0 = time.time()
    written: list[str] = []
    try:
        with mp.Pool(args.workers) as pool:
            tokenized: Iterator[np.ndarray] = pool.imap(worker, docs, chunksize=16)
            paths = write_shards(tokenized, out_dir, args.name, args.shard_size, written)
    except (InputError, OSError) as e:  # a bad input file, a full or read-only disk: no partial set of shards stays
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        why = str(e) if isinstance(e, InputError) else f"cannot write {e.filename or out_dir} ({e.strerror or e})"
        raise SystemExit(f"error: {why}" + (f"; the {len(written)} shard(s) written are removed" if written else "")
                         ) from None
    print(f"done: {len(paths)} shard(s) in {out_dir} in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
