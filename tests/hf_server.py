"""A tiny local stand-in for the Hugging Face hub, for tests (stdlib only, no network).

It answers the requests that huggingface_hub 2.4.0's `hf_hub_download` makes, so the real
library runs unmodified against it once HF_ENDPOINT points at `hub.url`:

    HEAD {url}/{prefix}{repo_id}/resolve/{revision}/{filename}   metadata: X-Repo-Commit, ETag, Content-Length
    GET  {url}/{prefix}{repo_id}/resolve/{revision}/{filename}   content; honours `Range: bytes=a-` / `bytes=a-b`

with prefix "datasets/" for repo_type="dataset" (the default), "spaces/" for spaces and "" for models,
plus GET {url}/api/agent-harnesses (an empty registry: huggingface_hub fetches it once a day per HF_HOME
to fill its User-Agent header).
The ETag is the sha256 of the content (like an LFS file), the commit is a fixed 40-hex sha, and
revision may be "main" or that sha. Errors carry the hub's X-Error-Code header, so huggingface_hub
raises its usual types: unknown repo -> 404 RepoNotFound (RepositoryNotFoundError), unknown file ->
404 EntryNotFound (RemoteEntryNotFoundError), unknown revision -> 404 RevisionNotFound.
With `redirect=True` (or "host"), /resolve answers like the real hub does for LFS files: 302 to a "CDN"
url on the other loopback name (localhost <-> 127.0.0.1, so huggingface_hub treats it as a foreign host)
with X-Linked-Etag / X-Linked-Size; the CDN url serves the bytes. With redirect="port" the CDN url is on
a second server of the same host name, another port.
No Xet headers are ever sent, so hf_xet is never used even when installed; tests may still set
HF_HUB_DISABLE_XET=1 to be explicit (hf_transfer no longer exists in 2.4.0). Nothing else of the hub
API (other /api/ calls, tree listings, so no snapshot_download) is implemented: such paths get 404.
(The real hub answers 401 rather than 404 for an unknown repo when unauthenticated; huggingface_hub
raises RepositoryNotFoundError for both.)

Usage:
    with HubServer(files={"kjj0/fineweb10B-gpt2": {"fineweb_val_000000.bin": b"..."}}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        ...                          # run hf_hub_download / a subprocess
        hub.requests                 # [Request(method, path, range, authorization, port), ...] in arrival order
        hub.gets()                   # the GETs of file content; hub.clear() empties the log

Failure knobs (all optional, changeable between runs through the attributes of the same name):
    not_found=True          every request gets 404 RepoNotFound
    cut_after={name: k}     a content GET of `name` sends all headers, then only k bytes, then closes the
                            connection; only the first `cut_times` (default 1) such GETs are cut, so a
                            retry then succeeds. (hf_hub_download 2.4.0 itself reads the body in 10 MiB
                            chunks, so a cut below 10 MiB re-fetches from 0, and it deletes its partial
                            file when the call fails; data/cached_fineweb10B.py keeps every byte.)
    stall_after={name: k}   the first content GET of `name` sends all headers and k bytes, then hangs until
                            the server stops (a download to kill mid-file)
    truncate={name: k}      the hub "holds" only the first k bytes of `name` (headers agree with that), for
                            the first `truncate_times` content GETs of it (default: all; HEADs follow suit)
    corrupt={name: k}       the first k content GETs of `name` serve it with one byte flipped (byte 1100, past
                            a shard's header), the headers (size, sha256 ETag) those of the true file
    etags={name: text}      the ETag (X-Linked-Etag with redirect) of `name` is `text`, as sent, not its sha256
`files` maps repo_id to either {filename: bytes} or a directory whose files are served.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None  # the Range header, e.g. "bytes=1000-"
    authorization: str | None = None  # the Authorization header, e.g. "Bearer hf_..."
    port: int = 0  # the port the request came to (the hub's, or the CDN's with redirect="port")


class HubServer:
    def __init__(
        self,
        files: dict[str, dict[str, bytes] | str | Path] | None = None,
        *,
        repo_type: str = "dataset",
        redirect: bool | str = False,
        not_found: bool = False,
        cut_after: dict[str, int] | None = None,
        cut_times: int = 1,
        stall_after: dict[str, int] | None = None,
        truncate: dict[str, int] | None = None,
        truncate_times: int | None = None,
        corrupt: dict[str, int] | None = None,
        etags: dict[str, str] | None = None,
    ) -> None:
        self.files = files or {}
        self.prefix = PREFIXES[repo_type]
        self.redirect = redirect
        self.not_found = not_found
        self.cut_after = dict(cut_after or {})
        self.cut_times = cut_times
        self.stall_after = dict(stall_after or {})
        self.truncate = dict(truncate or {})
        self.truncate_times = truncate_times
        self.corrupt = dict(corrupt or {})
        self.etags = dict(etags or {})
        self.requests: list[Request] = []
        self._cuts: dict[str, int] = {}
        self._stalls: set[str] = set()
        self._truncated: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None  # redirect="port": the second server

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2 if self.redirect == "port" else 1)]
        self._httpd, self._cdn = servers[0], (servers[1] if len(servers) > 1 else None)
        for server in servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._stop.set()  # lets stalled responses end
        for server in filter(None, (self._httpd, self._cdn)):
            server.shutdown()
            server.server_close()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "use HubServer as a context manager"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- request log ---------------------------------------------------------------------------
    def gets(self, filename: str | None = None) -> list[Request]:
        """GET requests for file content (resolve or CDN urls), optionally of one file only."""
        return [
            r for r in self.requests
            if r.method == "GET" and ("/resolve/" in r.path or r.path.startswith("/cdn/"))
            and (filename is None or r.path.rsplit("/", 1)[-1] == filename)
        ]

    def clear(self) -> None:
        self.requests.clear()

    # -- content -------------------------------------------------------------------------------
    def content(self, repo_id: str, filename: str, count: bool = False) -> bytes | None:
        """The bytes served for a file (after `truncate`), or None if the file does not exist; count: this is a
        content GET (it uses up one of `truncate_times`)."""
        repo = self.files[repo_id]
        if isinstance(repo, dict):
            data = repo.get(filename)
        else:
            root = Path(repo).resolve()
            path = (root / filename).resolve()
            data = path.read_bytes() if path.is_file() and root in path.parents else None
        if data is not None and filename in self.truncate:
            with self._lock:
                done = self._truncated.get(filename, 0)
                if self.truncate_times is None or done < self.truncate_times:
                    data = data[: self.truncate[filename]]
                    self._truncated[filename] = done + count
        return data

    def _take_cut(self, filename: str) -> int | None:
        """Bytes to send before cutting this GET of `filename`, or None to send it all."""
        with self._lock:
            if filename not in self.cut_after or self._cuts.get(filename, 0) >= self.cut_times:
                return None
            self._cuts[filename] = self._cuts.get(filename, 0) + 1
            return self.cut_after[filename]

    def _take_corrupt(self, filename: str, body: bytes) -> bytes:
        """body, with byte 1100 flipped while `corrupt` says so for this content GET of `filename`."""
        with self._lock:
            left = self.corrupt.get(filename, 0)
            if not left or len(body) <= 1100:
                return body
            self.corrupt[filename] = left - 1
        return body[:1100] + bytes([body[1100] ^ 0xFF]) + body[1101:]

    def _take_stall(self, filename: str) -> int | None:
        """Bytes to send before hanging this GET of `filename`, or None."""
        with self._lock:
            if filename not in self.stall_after or filename in self._stalls:
                return None
            self._stalls.add(filename)
            return self.stall_after[filename]


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, like the hub; every response carries Content-Length
    timeout = 30  # drop idle keep-alive connections

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._handle(send_body=False)

    def do_GET(self) -> None:
        self._handle(send_body=True)

    def _handle(self, send_body: bool) -> None:
        hub = self.server_hub
        path = urlsplit(self.path).path
        hub.requests.append(Request(self.command, path, self.headers.get("Range"), self.headers.get("Authorization"),
                                    self.server.server_address[1]))
        if hub.not_found:
            return self._error(404, "RepoNotFound", "Repository not found")
        if path == "/api/agent-harnesses":  # huggingface_hub's best-effort user-agent registry fetch
            body = b'{"standardEnvVars": [], "harnesses": {}}'
            return self._send(200, body, {"Content-Type": "application/json"}, send_body)
        if path.startswith("/cdn/"):  # /cdn/{repo_id}/{filename}, the target of `redirect=True`
            repo_id, _, filename = unquote(path[len("/cdn/"):]).rpartition("/")
            data = hub.content(repo_id, filename, count=send_body) if repo_id in hub.files else None
            if data is None:
                return self._error(404, None, "Not found")
            return self._send_file(data, filename, send_body, {})
        parsed = self._parse_resolve(unquote(path))
        if parsed is None:
            return self._error(404, None, "Not found")
        repo_id, revision, filename = parsed
        if repo_id not in hub.files:
            return self._error(404, "RepoNotFound", "Repository not found")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + revision)
        data = hub.content(repo_id, filename, count=send_body and not hub.redirect)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": COMMIT})
        etag = hub.etags.get(filename, hashlib.sha256(data).hexdigest())
        if hub.redirect:
            if hub.redirect == "port":
                where = f"127.0.0.1:{hub._cdn.server_address[1]}"
            else:  # the other loopback name
                other = "localhost" if self.headers.get("Host", "").startswith("127.0.0.1") else "127.0.0.1"
                where = f"{other}:{hub.port}"
            return self._send(302, b"", {
                "Location": f"http://{where}/cdn/{repo_id}/{filename}",
                "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data)),
            }, send_body)
        self._send_file(data, filename, send_body, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})

    def _parse_resolve(self, path: str) -> tuple[str, str, str] | None:
        """'/{prefix}{ns}/{name}/resolve/{revision}/{filename}' -> (repo_id, revision, filename)."""
        prefix = "/" + self.server_hub.prefix
        if not path.startswith(prefix):
            return None
        parts = path[len(prefix):].split("/", 4)
        if len(parts) != 5 or parts[2] != "resolve" or not parts[4]:
            return None
        return f"{parts[0]}/{parts[1]}", parts[3], parts[4]

    def _send_file(self, data: bytes, filename: str, send_body: bool, headers: dict[str, str]) -> None:
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start, end, status = 0, len(data), 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else max(len(data) - int(b), 0)  # "bytes=-k" is the last k bytes
            end = min(int(b) + 1, len(data)) if a and b else len(data)
            if start >= len(data) and len(data) > 0:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, send_body)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        body = self.server_hub._take_corrupt(filename, data)[start:end] if send_body else data[start:end]
        stall = self.server_hub._take_stall(filename) if send_body else None
        cut = stall if stall is not None else self.server_hub._take_cut(filename) if send_body else None
        if cut is None or cut >= len(body):
            return self._send(status, body, headers, send_body)
        # promise the whole body, send `cut` bytes, then drop the connection (an interrupted download)
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        if stall is not None:
            self.server_hub._stop.wait(60)
        self.close_connection = True

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        headers = {**(headers or {}), "X-Error-Message": message, "Content-Type": "application/json"}
        if code is not None:
            headers["X-Error-Code"] = code
        self._send(status, ('{"error": "%s"}' % message).encode(), headers, self.command != "HEAD")

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if send_body:
            self.wfile.write(body)
