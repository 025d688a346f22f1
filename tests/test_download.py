"""Tests for data/cached_fineweb10B.py against a local fake hub (tests/hf_server.py): no network, a few seconds.

The downloader runs as a subprocess with HF_ENDPOINT pointing at the fake hub, so huggingface_hub's real
hf_hub_download (HEAD + GET on /datasets/{repo}/resolve/main/{file}) does the transfers.
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from data.fineweb import write_datafile  # noqa: E402
from hf_server import COMMIT, HubServer  # noqa: E402

SCRIPT = REPO / "data" / "cached_fineweb10B.py"
REPO_ID = "kjj0/fineweb10B-gpt2"
VAL = "fineweb_val_000000.bin"


def train(i: int) -> str:
    return f"fineweb_train_{i:06d}.bin"


def make_shard(tmp_path: Path, name: str, ntok: int, seed: int) -> bytes:
    path = tmp_path / "shards" / name
    path.parent.mkdir(exist_ok=True)
    write_datafile(str(path), np.random.default_rng(seed).integers(0, 50257, ntok))
    return path.read_bytes()


@pytest.fixture
def shards(tmp_path: Path) -> dict[str, bytes]:
    """The fake repo: a val shard and 4 train shards of a few hundred tokens, all different."""
    files = {VAL: make_shard(tmp_path, VAL, 300, 0)}
    for i in range(1, 5):
        files[train(i)] = make_shard(tmp_path, train(i), 200 + 50 * i, i)
    return files


def run(hub: HubServer, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}  # no HF_HUB_OFFLINE, tokens, ...
    base.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
                NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    cmd = [sys.executable, str(SCRIPT), *args, "--local_dir", str(tmp_path / "fw")]
    return subprocess.run(cmd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120, cwd=REPO)


def lines(out: str, word: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(word)]


def assert_one_error(result: subprocess.CompletedProcess, *names: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = lines(result.stderr, "error:")
    assert len(errors) == 1, result.stderr
    for name in names:
        assert name in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow
def test_downloads_val_and_first_n_train_shards_then_skips(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}) as hub:
        first = run(hub, tmp_path, "2")
        assert first.returncode == 0, first.stderr
        fetched = sorted(p.name for p in (tmp_path / "fw").glob("*.bin"))
        assert fetched == [train(1), train(2), VAL]
        for name in fetched:
            assert (tmp_path / "fw" / name).read_bytes() == shards[name]
        assert len(lines(first.stdout, "downloaded")) == 3
        assert sorted(r.path.rsplit("/", 1)[-1] for r in hub.gets()) == fetched

        hub.clear()
        second = run(hub, tmp_path, "2")
        assert second.returncode == 0, second.stderr
        assert len(lines(second.stdout, "skipped")) == 3 and not lines(second.stdout, "downloaded")
        assert hub.requests == []  # complete files are not even checked against the hub


@pytest.mark.slow
def test_incomplete_local_files_are_downloaded_again(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}) as hub:
        assert run(hub, tmp_path, "2").returncode == 0
        fw = tmp_path / "fw"  # damaged right after the download, while huggingface_hub's metadata still vouches for them
        (fw / VAL).write_bytes(shards[VAL] + b"\0\0")  # longer than its header says
        (fw / train(1)).write_bytes(shards[train(1)][:-100])  # an interrupted copy: shorter than its header says
        hub.clear()
        result = run(hub, tmp_path, "2")
        assert result.returncode == 0, result.stderr
        assert [line.split()[1] for line in lines(result.stdout, "incomplete")] == [VAL, train(1)]
        assert all("deleted, downloading it again" in line for line in lines(result.stdout, "incomplete"))
        assert [line.split()[1] for line in lines(result.stdout, "downloaded")] == [VAL, train(1)]
        assert [line.split()[1] for line in lines(result.stdout, "skipped")] == [train(2)]
        assert [r.path.rsplit("/", 1)[-1] for r in hub.gets()] == [VAL, train(1)]
    for name in (VAL, train(1), train(2)):
        assert (fw / name).read_bytes() == shards[name]


@pytest.mark.slow
def test_wrong_repo_id_fails_with_one_message(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}) as hub:
        result = run(hub, tmp_path, "1", "--repo_id", "nobody/no-such-repo")
    error = assert_one_error(result, VAL, "nobody/no-such-repo")
    assert "repository not found" in error


@pytest.mark.slow
def test_missing_file_fails_with_one_message(tmp_path, shards):
    del shards[train(2)]
    with HubServer(files={REPO_ID: shards}) as hub:
        result = run(hub, tmp_path, "3")
    error = assert_one_error(result, train(2), REPO_ID)
    assert "no such file" in error
    assert [line.split()[1] for line in lines(result.stdout, "downloaded")] == [VAL, train(1)]
    assert not (tmp_path / "fw" / train(3)).exists()  # stops at the first failure


@pytest.mark.slow
def test_offline_fails_with_one_message(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}) as hub:
        result = run(hub, tmp_path, "1", env={"HF_HUB_OFFLINE": "1"})
        assert hub.requests == []
    assert_one_error(result, VAL, REPO_ID)


@pytest.mark.slow
def test_number_of_shards_defaults_from_trainer_args(tmp_path, shards):
    # 400 steps * 512 sequences * 1024 tokens = 209.7M tokens -> ceil(2.097) = 3 train shards of 100M
    with HubServer(files={REPO_ID: shards}) as hub:
        result = run(hub, tmp_path, "--num_iterations", "400", "--batch_size", "512", "--sequence_length", "1024")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "fw").glob("*.bin")) == [train(1), train(2), train(3), VAL]


def test_default_shard_count_matches_trainer_defaults():
    spec = importlib.util.spec_from_file_location("cached_fineweb10B", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parse_args = module.train_gpt2.parse_args
    assert module.num_train_shards(parse_args([])) == 37  # 7000 * 512 * 1024 tokens
    assert module.num_train_shards(parse_args(["--num_iterations", "100000"])) == 103  # all there is
    assert module.num_train_shards(parse_args(["--num_iterations", "40", "--batch_size", "8"])) == 1


@pytest.mark.slow
def test_run_on_other_data_downloads_nothing(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}) as hub:
        result = run(hub, tmp_path, "--preset", "smoke")
        assert hub.requests == []
    assert result.returncode == 0, result.stderr
    assert "nothing to download" in result.stdout
    assert not (tmp_path / "fw").exists()


@pytest.mark.slow
def test_without_the_hub_packages_present_shards_still_work_and_a_missing_one_says_what_to_install(tmp_path, shards):
    """run.sh calls the downloader before every run: on a machine without huggingface_hub/httpx2 (e.g. a bare
    torch image with the shards copied in) it must pass when nothing is missing, and name the fix when one is."""
    blocked = tmp_path / "blocked"
    (blocked / "httpx2").mkdir(parents=True)
    (blocked / "httpx2" / "__init__.py").write_text("raise ImportError('httpx2 blocked by the test')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])}
    with HubServer(files={REPO_ID: shards}) as hub:
        other = run(hub, tmp_path, "--preset", "smoke", env=env)
        (tmp_path / "fw").mkdir()
        (tmp_path / "fw" / VAL).write_bytes(shards[VAL])
        (tmp_path / "fw" / train(1)).write_bytes(shards[train(1)])
        present = run(hub, tmp_path, "1", env=env)
        missing = run(hub, tmp_path, "2", env=env)
        assert hub.requests == []
    assert other.returncode == 0 and "nothing to download" in other.stdout, other.stderr
    assert present.returncode == 0, present.stderr
    assert len(lines(present.stdout, "skipped")) == 2
    error = assert_one_error(missing, train(2), "httpx2 blocked by the test", "pip install -r requirements.txt")
    assert not (tmp_path / "fw" / train(2)).exists(), error


@pytest.mark.slow
def test_bad_file_on_the_hub_fails_after_download(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}, truncate={train(1): 1500}) as hub:
        result = run(hub, tmp_path, "1")
        assert len(hub.gets(train(1))) == 2  # fetched again once
    assert_one_error(result, train(1), REPO_ID, "twice but it is not a valid shard", "truncated or corrupt")
    assert not (tmp_path / "fw" / train(1)).exists()  # deleted: never left for the trainer


@pytest.mark.slow
def test_truncated_download_is_reported_deleted_and_fetched_again(tmp_path, shards):
    # the first transfer of the shard stops at 1500 bytes with every header agreeing: only its own header tells
    with HubServer(files={REPO_ID: shards}, truncate={train(1): 1500}, truncate_times=1) as hub:
        result = run(hub, tmp_path, "1")
        assert result.returncode == 0, result.stderr
        assert [r.range for r in hub.gets(train(1))] == [None, None]
    (bad,) = lines(result.stdout, "bad")
    assert train(1) in bad and "header says" in bad and "deleted, downloading it again" in bad
    assert lines(result.stdout, "downloaded")[-1].split()[1] == train(1)
    assert (tmp_path / "fw" / train(1)).read_bytes() == shards[train(1)]


@pytest.mark.slow
@pytest.mark.parametrize("redirect", [False, True])
def test_cut_connection_resumes_where_it_stopped(tmp_path, shards, redirect):
    # every GET of the val shard (1624 bytes) is cut after 500 bytes, three times; with redirect, the hub's LFS path:
    # /resolve answers 302 to a CDN url on another host
    with HubServer(files={REPO_ID: shards}, redirect=redirect, cut_after={VAL: 500}, cut_times=3) as hub:
        result = run(hub, tmp_path, "0")
        assert result.returncode == 0, result.stderr
        gets = hub.gets(VAL)
    assert [r.range for r in gets] == [None, "bytes=500-", "bytes=1000-", "bytes=1500-"]
    assert all(r.path.startswith("/cdn/") == redirect for r in gets)
    assert [line.split()[1] for line in lines(result.stdout, "interrupted")] == [VAL] * 3
    assert (tmp_path / "fw" / VAL).read_bytes() == shards[VAL]
    assert sorted(p.name for p in (tmp_path / "fw").iterdir()) == [VAL]  # no .part left


@pytest.mark.slow
def test_killed_download_resumes_in_the_next_run(tmp_path, shards):
    """A job killed mid-file leaves <name>.<etag>.part; the next run asks only for the rest."""
    with HubServer(files={REPO_ID: shards}, stall_after={train(1): 700}) as hub:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env = dict(base, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "1", "--local_dir", str(tmp_path / "fw")], env=env,
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not [p for p in (tmp_path / "fw").glob(f"{train(1)}.*.part") if p.stat().st_size == 700]:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (part,) = (tmp_path / "fw").glob(f"{train(1)}.*.part")
        assert part.read_bytes() == shards[train(1)][:700]
        result = run(hub, tmp_path, "1")
        assert result.returncode == 0, result.stderr
        assert [r.range for r in hub.gets(train(1))] == [None, "bytes=700-"]
    assert f"resuming  {train(1)} at byte 700 of {len(shards[train(1)]):,}" in result.stdout
    assert (tmp_path / "fw" / train(1)).read_bytes() == shards[train(1)] and not part.exists()


@pytest.mark.slow
def test_404_everywhere_fails_with_one_message(tmp_path, shards):
    with HubServer(files={REPO_ID: shards}, not_found=True) as hub:
        result = run(hub, tmp_path, "1")
        assert [r.method for r in hub.requests if "/resolve/" in r.path] == ["HEAD"]  # no retries on a 404
    assert "repository not found" in assert_one_error(result, VAL, REPO_ID)


@pytest.mark.slow
def test_no_network_fails_with_one_message(tmp_path, shards):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nowhere = types.SimpleNamespace(url=f"http://127.0.0.1:{port}")  # all that run() reads of a hub
    result = run(nowhere, tmp_path, "1")
    assert "cannot reach the hub (no network, or a wrong HF_ENDPOINT): ConnectError" in assert_one_error(
        result, VAL, REPO_ID, f"http://127.0.0.1:{port}")
    assert len(lines(result.stdout, "interrupted")) == 2  # RETRIES attempts


def test_fake_hub_speaks_the_resolve_protocol(tmp_path):
    urlopen = urllib.request.build_opener(urllib.request.ProxyHandler({})).open  # never via a proxy
    data = bytes(range(256)) * 4
    with HubServer(files={REPO_ID: {"a.bin": data}}) as hub:
        url = f"{hub.url}/datasets/{REPO_ID}/resolve/main/a.bin"
        with urlopen(urllib.request.Request(url, method="HEAD")) as r:
            assert r.headers["X-Repo-Commit"] == COMMIT and r.headers["ETag"].startswith('"')
            assert int(r.headers["Content-Length"]) == len(data) and r.read() == b""
        with urlopen(urllib.request.Request(url, headers={"Range": "bytes=1000-"})) as r:
            assert r.status == 206 and r.headers["Content-Range"] == f"bytes 1000-1023/{len(data)}"
            assert r.read() == data[1000:]
        for path, code in [(f"/datasets/{REPO_ID}/resolve/main/b.bin", "EntryNotFound"),
                           ("/datasets/x/y/resolve/main/a.bin", "RepoNotFound"),
                           (f"/datasets/{REPO_ID}/resolve/v9/a.bin", "RevisionNotFound")]:
            with pytest.raises(urllib.error.HTTPError) as e:
                urlopen(hub.url + path)
            assert e.value.code == 404 and e.value.headers["X-Error-Code"] == code
        hub.not_found = True
        with pytest.raises(urllib.error.HTTPError):
            urlopen(url)
        assert [(r.method, r.range) for r in hub.requests][:2] == [("HEAD", None), ("GET", "bytes=1000-")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.bin").write_bytes(data)
    with HubServer(files={REPO_ID: tmp_path}) as hub:  # a directory works as well as a dict
        with urlopen(f"{hub.url}/datasets/{REPO_ID}/resolve/{COMMIT}/sub/c.bin") as r:
            assert r.read() == data
        with pytest.raises(urllib.error.HTTPError):
            urlopen(f"{hub.url}/datasets/{REPO_ID}/resolve/main/sub/../../x")


@pytest.mark.slow
def test_local_dir_that_cannot_be_made_is_one_error(tmp_path, shards):
    """--local_dir through a regular file (ENOTDIR, unwritable for root too): one error line, nothing fetched."""
    (tmp_path / "file").write_text("x")
    bad = tmp_path / "file" / "fw"
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    with HubServer(files={REPO_ID: shards}) as hub:
        result = subprocess.run([sys.executable, str(SCRIPT), "1", "--local_dir", str(bad)], capture_output=True,
                                text=True, timeout=120, cwd=REPO, env=dict(base, HF_ENDPOINT=hub.url,
                                                                           HF_HOME=str(tmp_path / "hf_home")))
        assert hub.requests == []
    assert assert_one_error(result, f"--local_dir {bad}", "Not a directory")


TOKEN = "hf_secret_token_of_the_test"


@pytest.mark.slow
@pytest.mark.parametrize("redirect", [False, "host", "port"])
def test_token_goes_to_the_hub_only(tmp_path, shards, redirect):
    """With a token set, the hub's own host and port get it (HEAD, and the GET when the hub serves the bytes); a
    download the hub redirects to another host name (localhost vs 127.0.0.1) or to another port never does."""
    with HubServer(files={REPO_ID: shards}, redirect=redirect) as hub:
        result = run(hub, tmp_path, "1", env={"HF_TOKEN": TOKEN})
        assert result.returncode == 0, result.stderr
        hub_requests = [r for r in hub.requests if "/resolve/" in r.path]
        cdn_requests = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert hub_requests and all(r.authorization == f"Bearer {TOKEN}" and r.port == hub.port for r in hub_requests)
    assert len(cdn_requests) == (2 if redirect else 0)  # the val shard and one train shard
    assert all(r.authorization is None for r in cdn_requests)
    assert [r.port != hub.port for r in cdn_requests] == [redirect == "port"] * len(cdn_requests)
    for name in (VAL, train(1)):
        assert (tmp_path / "fw" / name).read_bytes() == shards[name]


@pytest.mark.slow
def test_etag_never_shapes_a_path(tmp_path, shards):
    """An ETag that is a path ('../../escape') names no file: the .part file is named by 16 hex digits of its sha256,
    inside --local_dir; the download completes and nothing appears elsewhere."""
    with HubServer(files={REPO_ID: shards}, etags={VAL: "../../escape"}, stall_after={VAL: 700}) as hub:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env = dict(base, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_XET="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "0", "--local_dir", str(tmp_path / "a" / "b" / "fw")],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while not list((tmp_path / "a" / "b" / "fw").glob("*.part")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    import hashlib
    (part,) = (tmp_path / "a" / "b" / "fw").iterdir()  # the interrupted download's part, and nothing else
    assert part.name == f"{VAL}.{hashlib.sha256(b'../../escape').hexdigest()[:16]}.part"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "hf_home", "shards"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


@pytest.mark.slow
@pytest.mark.parametrize("redirect", [False, True])
def test_download_with_another_sha256_is_fetched_again(tmp_path, shards, redirect):
    """One byte of the first transfer flipped (size and header intact: only the hub's sha256 tells): reported, deleted,
    fetched again; flipped every time: one error line, nothing left."""
    with HubServer(files={REPO_ID: shards}, redirect=redirect, corrupt={train(1): 1}) as hub:
        once = run(hub, tmp_path, "1")
        assert once.returncode == 0, once.stderr
        assert len(hub.gets(train(1))) == 2
    (bad,) = lines(once.stdout, "bad")
    assert train(1) in bad and "its sha256" in bad and "is not the hub's" in bad
    assert (tmp_path / "fw" / train(1)).read_bytes() == shards[train(1)]
    (tmp_path / "fw" / train(1)).unlink()
    with HubServer(files={REPO_ID: shards}, redirect=redirect, corrupt={train(1): 9}) as hub:
        always = run(hub, tmp_path, "1")
    assert_one_error(always, train(1), "twice but it is not a valid shard", "is not the hub's")
    assert sorted(p.name for p in (tmp_path / "fw").iterdir()) == [VAL]  # no shard, no .part


@pytest.mark.parametrize("args,fragment", [(["--local_dir="], "--local_dir needs a value, got ''"),
                                           (["--local_dir", "--repo_id", "x"], "needs a value, got '--repo_id'"),
                                           (["--repo_id="], "--repo_id needs a value, got ''"),
                                           (["--local_dir"], "--local_dir needs a value")])
@pytest.mark.slow
def test_empty_or_flag_like_option_values_are_refused(tmp_path, args, fragment):
    result = subprocess.run([sys.executable, str(SCRIPT), "1", *args], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={k: v for k, v in os.environ.items() if not k.startswith("HF_")})
    assert_one_error(result, fragment)
    assert list(tmp_path.iterdir()) == []  # nothing downloaded into the working folder
