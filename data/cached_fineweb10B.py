"""Download the GPT-2-tokenized FineWeb-10B shards from the Hugging Face hub.

    python data/cached_fineweb10B.py                       # val + the train shards a default run reads (37)
    python data/cached_fineweb10B.py 8                     # val + the first 8 train shards
    python data/cached_fineweb10B.py --num_iterations 2000 # val + the train shards that run reads
    python data/cached_fineweb10B.py 8 --local_dir /scratch/fineweb10B --repo_id me/my-mirror

Files come from the dataset repo kjj0/fineweb10B-gpt2: fineweb_val_000000.bin and
fineweb_train_000001.bin ... fineweb_train_000103.bin, each a 1024-byte header plus up to 100M uint16
tokens (~200 MB), and land in data/fineweb10B/ (or --local_dir). A file whose header agrees with its
size is skipped; one whose size disagrees is reported, deleted and downloaded again (and so is a
download that comes out so, or whose sha256 is not the one the hub gives, X-Linked-Etag: twice, then
it is an error). Bytes arrive in <name>.<16 hex digits of the etag>.part, which an interrupted download
(a cut connection, a killed job) leaves behind: the next attempt or run asks for the rest only (HTTP
Range). The Hugging Face token goes to the hub's own host only, never to the host it redirects a
download to. A failure (no network, 404, wrong repo id, offline mode) ends with one `error:` line and
exit status 1. Set HF_ENDPOINT to use a hub mirror.

If the first argument is an integer it is N, the number of train shards (0..103). Otherwise N is
what the trainer reads: ceil(num_iterations * batch_size * sequence_length / 1e8), computed from the
trainer's own arguments (all remaining arguments go to train_gpt2.parse_args). If those arguments
train and validate on other data (e.g. --preset smoke), nothing is downloaded.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # to import train_gpt2 from the repo root

import train_gpt2  # noqa: E402

try:  # needed only to download: a run whose shards are all present works without them
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (HfHubHTTPError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError)
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
    HUB_IMPORT_ERROR: ImportError | None = None
except ImportError as e:
    HUB_IMPORT_ERROR = e

REPO_ID = "kjj0/fineweb10B-gpt2"
LOCAL_DIR = Path(__file__).resolve().parent / "fineweb10B"
MAX_TRAIN_SHARDS = 103
TOKENS_PER_SHARD = 100_000_000
RETRIES = 3  # attempts in a row that bring no new byte before a download fails (waits of 1 s, 2 s between them)


def pop_option(args: list[str], name: str, default: str) -> str:
    """Remove `--name VALUE` or `--name=VALUE` from args and return VALUE (or default); an empty VALUE, or one that is
    another option, is refused."""
    for i, arg in enumerate(args):
        if arg == name or arg.startswith(name + "="):
            if arg == name and i + 1 == len(args):
                sys.exit(f"error: {name} needs a value")
            value = args[i + 1] if arg == name else arg[len(name) + 1 :]
            if not value.strip() or (arg == name and value.startswith("--")):
                sys.exit(f"error: {name} needs a value, got {value!r}")
            del args[i : i + (2 if arg == name else 1)]
            return value
    return default


def num_train_shards(hp: train_gpt2.Hyperparameters) -> int:
    """Train shards of 100M tokens that a run with these hyperparameters reads."""
    tokens = hp.num_iterations * hp.batch_size * hp.sequence_length
    return min(math.ceil(tokens / TOKENS_PER_SHARD), MAX_TRAIN_SHARDS)


def reads_from(pattern: str, local_dir: Path) -> bool:
    """Whether a trainer glob pattern points into data/fineweb10B (or into local_dir)."""
    folder = Path(pattern).parent
    return folder.name == "fineweb10B" or folder.resolve() == local_dir.resolve()


def redact(text: str) -> str:
    """text with the user:password of every URL in it replaced by *** (an HF_ENDPOINT may carry them)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "***@", text)


def failure_reason(error: BaseException) -> str:
    """One line on why hf_hub_download failed (its errors wrap each other in __cause__)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return "repository not found (wrong repo id, or a private/gated repo)"
    if any(isinstance(e, RemoteEntryNotFoundError) for e in chain):
        return "no such file in the repository"
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return "offline mode is on (unset HF_HUB_OFFLINE)"
    if any(isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout)) for e in chain):
        return f"cannot reach the hub (no network, or a wrong HF_ENDPOINT): {type(chain[-1]).__name__}: " + (
            str(chain[-1]).strip().splitlines() or [""])[0]
    root = chain[-1]
    lines = str(root).strip().splitlines()
    return f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def check_shard(path: Path) -> tuple[int, str | None]:
    """(token count, None) for a complete shard, else (0, the first line of what train_gpt2 finds wrong)."""
    try:
        return train_gpt2.shard_token_count(str(path)), None
    except ValueError as e:
        return 0, str(e).splitlines()[0].removeprefix(f"{path}: ")


def transient(error: Exception) -> bool:
    """Worth another attempt: the connection failed or dropped, or the server had a 5xx moment."""
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code >= 500
    return isinstance(error, httpx2.TransportError)


class ChecksumError(ValueError):
    """A complete download whose sha256 is not the one the hub gave for the file."""


def part_path(local_dir: Path, filename: str, etag: str | None) -> Path:
    """local_dir/<filename>.<tag>.part: tag the first 16 of the etag's hex digits (an LFS etag is the file's sha256),
    or of the sha256 of any other etag, so a server's header never shapes a path."""
    tag = etag or "no-etag"
    tag = tag.lower() if re.fullmatch(r"[0-9a-fA-F]{16,128}", tag) else hashlib.sha256(tag.encode()).hexdigest()
    return local_dir / f"{filename}.{tag[:16]}.part"


def same_origin(a: str, b: str) -> bool:
    """Whether two urls have one scheme, host and port (the default port of the scheme when none is written)."""
    ua, ub = urlsplit(a), urlsplit(b)
    default = {"http": 80, "https": 443}
    return (ua.scheme, (ua.hostname or "").lower(), ua.port or default.get(ua.scheme)) == (
        ub.scheme, (ub.hostname or "").lower(), ub.port or default.get(ub.scheme))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(filename: str, local_dir: Path, repo_id: str) -> None:
    """local_dir/filename from the dataset repo, through local_dir/<filename>.<etag>.part: each attempt asks the hub
    for the file's size, etag and location (HEAD; signed CDN urls expire), then GETs the bytes past the part file's
    length (Range: bytes=<length>-), appending them as they arrive; a complete part is renamed into place. A cut
    connection or 5xx is retried at once after progress, else up to RETRIES attempts in a row; a part of another
    version of the file (other etag) or longer than the file is deleted. The user's token (Authorization) goes only
    to the hub's own scheme, host and port, never to a host it redirects to (as huggingface_hub's own download; httpx
    drops it on any further cross-origin redirect). An etag of 64 hex digits is the file's sha256 (the hub's
    X-Linked-Etag of an LFS file): the complete part must have it, else it is deleted (ChecksumError)."""
    url, stalled = hf_hub_url(repo_id, filename, repo_type="dataset"), 0
    while True:
        part, have = None, 0
        try:
            meta = get_hf_file_metadata(url)
            part = part_path(local_dir, filename, meta.etag)
            for other in glob.glob(glob.escape(str(local_dir / filename)) + ".*.part"):
                if Path(other) != part:
                    os.remove(other)
            have = part.stat().st_size if part.exists() else 0
            if meta.size is not None and have > meta.size:
                part.unlink()
                have = 0
            if meta.size is None or have < meta.size:
                if have:
                    print(f"resuming  {filename} at byte {have:,} of {meta.size:,}")
                headers = {**build_hf_headers(), "Accept-Encoding": "identity"}
                if not same_origin(meta.location, url):  # a CDN: no token
                    headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                if have:
                    headers["Range"] = f"bytes={have}-"
                with get_session().stream("GET", meta.location, headers=headers, follow_redirects=True,
                                          timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                    hf_raise_for_status(response)
                    # unbuffered: every byte received is in the file even if this process is killed
                    with open(part, "ab" if response.status_code == 206 else "wb", buffering=0) as f:
                        for chunk in response.iter_bytes():
                            f.write(chunk)
            if meta.size is None or part.stat().st_size == meta.size:
                if meta.etag and re.fullmatch(r"[0-9a-f]{64}", meta.etag.lower()):
                    got = sha256_of(part)
                    if got != meta.etag.lower():
                        part.unlink()
                        raise ChecksumError(f"its sha256 {got[:16]}... is not the hub's {meta.etag.lower()[:16]}...")
                os.replace(part, local_dir / filename)
                return
            raise httpx2.RemoteProtocolError(f"the response ended at byte {part.stat().st_size:,} of {meta.size:,}")
        except Exception as e:
            if not transient(e):
                raise
            got = part.stat().st_size if part is not None and part.exists() else 0
            stalled = 0 if got > have else stalled + 1
            if stalled == RETRIES:
                raise
            print(f"interrupted {filename} at byte {got:,} ({type(e).__name__}); trying again")
            time.sleep(stalled)


def fetch(filename: str, local_dir: Path, repo_id: str) -> None:
    """Download one shard into local_dir unless a complete copy is already there; a copy whose size disagrees with
    its header (before or after downloading) is reported, deleted and fetched again."""
    path = local_dir / filename
    if path.exists():
        tokens, fault = check_shard(path)
        if fault is None:
            print(f"skipped    {filename} (complete, {tokens:,} tokens)")
            return
        print(f"incomplete {filename} ({fault}); deleted, downloading it again")
        path.unlink()
    if HUB_IMPORT_ERROR is not None:
        sys.exit(f"error: {filename} is not in {local_dir} and downloading it needs huggingface_hub and httpx2, which "
                 f"do not import ({HUB_IMPORT_ERROR}): pip install -r requirements.txt")
    for attempt in (1, 2):
        try:
            download(filename, local_dir, repo_id)
        except ChecksumError as e:  # deleted already
            fault = str(e)
        except Exception as e:  # HTTP errors, OSError, httpx errors: all mean "this file failed"
            sys.exit(redact(f"error: could not download {filename} from dataset repo {repo_id} at "
                            f"{constants.ENDPOINT}: {failure_reason(e)}"))
        else:
            tokens, fault = check_shard(path)
            if fault is None:
                print(f"downloaded {filename} ({tokens:,} tokens)")
                return
            path.unlink()
        if attempt == 1:
            print(f"bad        {filename} as downloaded ({fault}); deleted, downloading it again")
    sys.exit(f"error: downloaded {filename} from dataset repo {repo_id} twice but it is not a valid shard: {fault} "
             f"(deleted)")


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "Trainer arguments: --field value for any field of train_gpt2.Hyperparameters.")
        return
    args = list(argv)
    local_dir = Path(pop_option(args, "--local_dir", str(LOCAL_DIR)))
    repo_id = pop_option(args, "--repo_id", REPO_ID)
    n: int | None = None
    if args and re.fullmatch(r"[+-]?\d+", args[0]):
        n = int(args.pop(0))
        if not 0 <= n <= MAX_TRAIN_SHARDS:
            sys.exit(f"error: N={n}: the number of train shards to fetch, 0 .. {MAX_TRAIN_SHARDS} ({repo_id} has "
                     f"{MAX_TRAIN_SHARDS})")
    try:
        hp = train_gpt2.parse_args(args)
    except (ValueError, SystemExit) as e:  # the trainer's refusal, without its list of every setting
        why = str(e.code if isinstance(e, SystemExit) else e).splitlines()[0]
        sys.exit(f"error: {why} (arguments: N, --local_dir, --repo_id, then any setting of train_gpt2.py: "
                 "python train_gpt2.py --help lists them)")

    need_train, need_val = reads_from(hp.input_bin, local_dir), reads_from(hp.input_val_bin, local_dir)
    if n is not None:  # an explicit N asks for val + N train shards, whatever the data arguments say
        need_val = True
    elif need_train or need_val:
        n = num_train_shards(hp) if need_train else 0
    else:
        print(f"nothing to download: this run reads {hp.input_bin} and {hp.input_val_bin}, not fineweb10B")
        return
    files = (["fineweb_val_000000.bin"] if need_val else []) + [
        f"fineweb_train_{i:06d}.bin" for i in range(1, n + 1)
    ]
    print(f"fineweb10B: {'val + ' if need_val else ''}{n} train shard(s) from {repo_id} into {local_dir}")
    try:
        local_dir.mkdir(parents=True, exist_ok=True)
        for filename in files:
            fetch(filename, local_dir, repo_id)
    except OSError as e:  # a read-only or full --local_dir (a download's own errors are reported by fetch)
        sys.exit(f"error: --local_dir {local_dir}: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
