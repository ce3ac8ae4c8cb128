"""minihbt.download against a real HTTP server on 127.0.0.1 (Range support, truncation switch).

No test reaches the internet: an autouse fixture makes any connection or name lookup for a
host other than 127.0.0.1/localhost fail the test.
"""
import csv
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from minihbt import download as dl
from minihbt.files import sha256_file
from minihbt.download import DownloadError, download_dataset, download_model, fetch, main

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(TESTS_DIR, "..", "..", "shared")
TINY_BERT = os.path.join(TESTS_DIR, "fixtures", "tiny-bert")
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def sha(data):
    return hashlib.sha256(data).hexdigest()


def payload(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ---------------------------------------------------------------- the local server

class Handler(BaseHTTPRequestHandler):
    """Serves server.root; honours `Range: bytes=N-` unless server.ignore_range;
    server.truncate[path] = N sends the full Content-Length but only N bytes, then closes (once)."""

    def do_GET(self):
        srv = self.server
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        srv.requests.append({"path": path, "range": self.headers.get("Range"), "host": self.headers.get("Host")})
        fpath = os.path.join(srv.root, *path.split("/"))
        if not path or ".." in path.split("/") or not os.path.isfile(fpath):
            self.send_error(404, "Entry not found")
            return
        with open(fpath, "rb") as f:
            data = f.read()
        start, rng = 0, self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = srv.truncate.pop(path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.root, srv.requests, srv.truncate, srv.ignore_range = str(root), [], {}, False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"

    def put(rel, data):
        p = root.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return f"{srv.url}/{rel}"

    srv.put = put
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


@pytest.fixture(autouse=True)
def no_internet(monkeypatch):
    """Fail on any connection or lookup for a non-local host; clear the endpoint env vars."""
    for var in ("MINIHBT_HF_ENDPOINT", "MINIHBT_GITHUB_RAW", "HF_ENDPOINT", "http_proxy", "HTTP_PROXY",
                "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    seen = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOCAL_HOSTS:
            seen.append(address)
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL_HOSTS:
            seen.append(host)
            raise AssertionError(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not seen, f"non-local network access: {seen}"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def leftovers(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


# ---------------------------------------------------------------- 1-5: fetch

def test_success_verified_no_part(server, tmp_path):
    data = payload(300_000)
    url = server.put("a/b.bin", data)
    dest = tmp_path / "out" / "b.bin"
    assert fetch(url, dest, sha256=sha(data), progress=False) == str(dest)
    assert dest.read_bytes() == data
    assert leftovers(tmp_path / "out") == ["b.bin"]
    assert server.requests == [{"path": "a/b.bin", "range": None, "host": server.url[7:]}]

    fetch(url, dest, sha256=sha(data), progress=False)           # present and correct: no request
    assert len(server.requests) == 1
    fetch(url, dest, sha256=sha(data), progress=False, force=True)
    assert len(server.requests) == 2 and dest.read_bytes() == data


def test_present_but_corrupt_is_fetched_again(server, tmp_path):
    data = payload(1000)
    url = server.put("f.bin", data)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"stale")
    fetch(url, dest, sha256=sha(data), progress=False)
    assert dest.read_bytes() == data and len(server.requests) == 1


def test_wrong_checksum_leaves_nothing(server, tmp_path):
    data = payload(50_000)
    url = server.put("x.json", data)
    out = tmp_path / "out"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as e:
        fetch(url, out / "x.json", sha256=wrong, progress=False)
    msg = str(e.value)
    assert "checksum mismatch" in msg and "x.json" in msg and url in msg
    assert wrong in msg and sha(data) in msg
    assert leftovers(out) == []


def test_interrupted_then_resumed_with_range(server, tmp_path):
    data = payload(200_000, seed=1)
    url = server.put("big.bin", data)
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    server.truncate["big.bin"] = 70_000
    with pytest.raises(DownloadError) as e:
        fetch(url, dest, sha256=sha(data), progress=False)
    assert "interrupted after 70000 of 200000 bytes" in str(e.value) and "resume" in str(e.value)
    assert not dest.exists() and part.read_bytes() == data[:70_000]

    fetch(url, dest, sha256=sha(data), progress=False)
    assert server.requests[-1]["range"] == "bytes=70000-"
    assert dest.read_bytes() == data and not part.exists()


def test_interrupted_twice_then_resumed(server, tmp_path):
    data = payload(100_000, seed=2)
    url = server.put("f.bin", data)
    dest = tmp_path / "f.bin"
    server.truncate["f.bin"] = 10_000
    with pytest.raises(DownloadError):
        fetch(url, dest, sha256=sha(data), progress=False)
    server.truncate["f.bin"] = 20_000                                # the resumed transfer breaks too
    with pytest.raises(DownloadError):
        fetch(url, dest, sha256=sha(data), progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 30_000
    fetch(url, dest, sha256=sha(data), progress=False)
    assert [r["range"] for r in server.requests] == [None, "bytes=10000-", "bytes=30000-"]
    assert dest.read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = payload(100_000, seed=3)
    url = server.put("f.bin", data)
    dest = tmp_path / "f.bin"
    server.truncate["f.bin"] = 40_000
    with pytest.raises(DownloadError):
        fetch(url, dest, sha256=sha(data), progress=False)
    server.ignore_range = True                                       # answers 200 with the whole file
    fetch(url, dest, sha256=sha(data), progress=False)
    assert server.requests[-1]["range"] == "bytes=40000-"
    assert dest.read_bytes() == data and not (tmp_path / "f.bin.part").exists()


def test_corrupt_part_fails_checksum_and_is_removed(server, tmp_path):
    data = payload(10_000, seed=4)
    url = server.put("f.bin", data)
    dest, part = tmp_path / "f.bin", tmp_path / "f.bin.part"
    part.write_bytes(b"garbage" * 100)                               # resumed onto bad bytes
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(url, dest, sha256=sha(data), progress=False)
    assert server.requests[-1]["range"] == "bytes=700-"
    assert not dest.exists() and not part.exists()
    fetch(url, dest, sha256=sha(data), progress=False)               # the next run starts clean
    assert dest.read_bytes() == data


def test_part_as_long_as_file_416_restarts(server, tmp_path):
    data = payload(5_000, seed=5)
    url = server.put("f.bin", data)
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.part").write_bytes(b"x" * 5_000)
    fetch(url, dest, sha256=sha(data), progress=False)
    assert [r["range"] for r in server.requests] == ["bytes=5000-", None]
    assert dest.read_bytes() == data


def test_404_names_url_and_status(server, tmp_path):
    url = f"{server.url}/nothing/here.json"
    with pytest.raises(DownloadError) as e:
        fetch(url, tmp_path / "here.json", progress=False)
    assert e.value.status == 404 and "HTTP 404" in str(e.value) and url in str(e.value)
    assert leftovers(tmp_path) == []


def test_connection_refused_suggests_from(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/config.json"
    with pytest.raises(DownloadError) as e:
        fetch(url, tmp_path / "config.json", progress=False, timeout=5)
    assert url in str(e.value) and "--from" in str(e.value) and e.value.status is None
    with pytest.raises(DownloadError, match="--from"):
        download_model("labse", tmp_path / "m", endpoint=f"http://127.0.0.1:{free_port()}", progress=False)
    assert sorted(os.listdir(tmp_path)) == []                        # not even an empty directory


# ---------------------------------------------------------------- 6: models

def serve_model(server, repo, files):
    for name, data in files.items():
        server.put(f"{repo}/resolve/main/{name}", data)


def tiny_bert_files():
    names = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]
    return {n: open(os.path.join(TINY_BERT, n), "rb").read() for n in names}


def test_model_end_to_end(server, tmp_path):
    files = tiny_bert_files()
    files["1_Pooling/config.json"] = json.dumps({"pooling_mode_mean_tokens": True}).encode()
    serve_model(server, "someone/tiny-bert", files)
    out = download_model("someone/tiny-bert", tmp_path / "m", endpoint=server.url, progress=False)
    assert out == str(tmp_path / "m")
    assert leftovers(tmp_path / "m") == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "m" / name).read_bytes() == data
    asked = [r["path"].split("/resolve/main/")[1] for r in server.requests]
    assert {"special_tokens_map.json", "modules.json", "model.safetensors.index.json"} <= set(asked)

    import minihbt                                                   # the download is a loadable model
    ref, got = minihbt.load_model(TINY_BERT), minihbt.load_model(out)
    for k, v in ref.params.items():
        np.testing.assert_array_equal(np.asarray(got.params[k]), np.asarray(v))

    n = len(server.requests)                                         # second run: nothing fetched again
    download_model("someone/tiny-bert", tmp_path / "m", endpoint=server.url, progress=False)
    assert all("resolve/main/" in r["path"] and r["path"].rsplit("/resolve/main/")[1] not in files
               for r in server.requests[n:])


def test_model_sharded(server, tmp_path, monkeypatch):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(TINY_BERT, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    files = {k: v for k, v in tiny_bert_files().items() if k != "model.safetensors"}
    weight_map = {}
    for shard, ks in shards.items():
        p = tmp_path / shard
        save_file({k: tensors[k] for k in ks}, str(p), metadata={"format": "pt"})
        files[shard] = p.read_bytes()
        weight_map.update({k: shard for k in ks})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    serve_model(server, "intfloat/multilingual-e5-small", files)

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)                                           # default dir: weights/<alias>
    out = download_model("multilingual-e5-small", endpoint=server.url, progress=False)
    assert out == os.path.join("weights", "multilingual-e5-small")
    out = cwd / out
    assert leftovers(out) == sorted(files)
    assert not any(r["path"].endswith("/model.safetensors") for r in server.requests)
    import minihbt
    got = minihbt.load_model(str(out))
    ref = minihbt.load_model(TINY_BERT)
    for k, v in ref.params.items():
        np.testing.assert_array_equal(np.asarray(got.params[k]), np.asarray(v))


def test_model_required_404_is_error_optional_404_skipped(server, tmp_path):
    files = tiny_bert_files()
    del files["tokenizer.json"]
    serve_model(server, "o/m", files)
    with pytest.raises(DownloadError) as e:
        download_model("o/m", tmp_path / "m", endpoint=server.url, progress=False)
    assert "tokenizer.json" in str(e.value) and "404" in str(e.value)
    assert f"{server.url}/o/m/resolve/main/tokenizer.json" in str(e.value)

    files = tiny_bert_files()
    del files["model.safetensors"]
    serve_model(server, "o/noweights", files)
    with pytest.raises(DownloadError, match="model.safetensors.*404"):
        download_model("o/noweights", tmp_path / "n", endpoint=server.url, progress=False)


def test_model_endpoint_from_env(server, tmp_path, monkeypatch):
    serve_model(server, "sentence-transformers/LaBSE", tiny_bert_files())
    monkeypatch.setenv("MINIHBT_HF_ENDPOINT", server.url)
    out = download_model("labse", tmp_path / "labse", progress=False)
    assert (tmp_path / "labse" / "model.safetensors").exists() and out == str(tmp_path / "labse")


def test_model_from_local_dir(tmp_path):
    out = download_model("o/tiny", tmp_path / "m", mirror=TINY_BERT, progress=False)
    assert leftovers(tmp_path / "m") == sorted(tiny_bert_files())
    for n, data in tiny_bert_files().items():
        assert (tmp_path / "m" / n).read_bytes() == data
    assert out == str(tmp_path / "m")
    with pytest.raises(DownloadError, match="config.json is missing"):
        download_model("o/tiny", tmp_path / "n", mirror=tmp_path / "empty", progress=False)


def test_unknown_name():
    with pytest.raises(DownloadError, match="xquad-r"):
        dl.resolve_model("not-a-model")


# ---------------------------------------------------------------- 7: datasets

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_dataset(monkeypatch):
    contents = {"ar.json": b'{"data": "ar"}', "sub/de.json": b'{"data": "de"}' * 1000}
    spec = {"repo": "someorg/somerepo", "commit": FAKE_COMMIT, "prefix": "fake/",
            "files": {k: sha(v) for k, v in contents.items()}}
    monkeypatch.setitem(dl.DATASETS, "fake-ds", spec)
    return contents


def test_dataset_end_to_end(server, tmp_path, fake_dataset):
    for rel, data in fake_dataset.items():
        server.put(f"someorg/somerepo/{FAKE_COMMIT}/fake/{rel}", data)
    out = download_dataset("fake-ds", tmp_path / "d", base_url=server.url, progress=False)
    assert out == str(tmp_path / "d")
    assert leftovers(tmp_path / "d") == sorted(fake_dataset)
    for rel, data in fake_dataset.items():
        assert (tmp_path / "d" / rel).read_bytes() == data
    assert all(r["path"].startswith(f"someorg/somerepo/{FAKE_COMMIT}/fake/") for r in server.requests)


def test_dataset_wrong_content_rejected(server, tmp_path, fake_dataset, monkeypatch):
    for rel, data in fake_dataset.items():
        server.put(f"someorg/somerepo/{FAKE_COMMIT}/fake/{rel}", data + b" tampered")
    monkeypatch.setenv("MINIHBT_GITHUB_RAW", server.url)
    with pytest.raises(DownloadError) as e:
        download_dataset("fake-ds", tmp_path / "d", progress=False)
    assert "ar.json" in str(e.value) and fake_dataset and sha(fake_dataset["ar.json"]) in str(e.value)
    assert leftovers(tmp_path / "d") == []


def test_real_dataset_tables_match_provenance():
    hexsha = re.compile(r"[0-9a-f]{64}")
    assert len(dl.DATASETS["xquad-r"]["files"]) == 11
    assert sorted(dl.DATASETS["xquad-r"]["files"]) == [f"{l}.json" for l in
                                                       "ar de el en es hi ru th tr vi zh".split()]
    assert len(dl.DATASETS["mlqa-r"]["files"]) == 7
    assert len(dl.DATASETS["mlqa"]["files"]) == 49
    for spec in dl.DATASETS.values():
        assert re.fullmatch(r"[0-9a-f]{40}", spec["commit"])
        assert all(hexsha.fullmatch(s) for s in spec["files"].values())
    assert dl.DATASETS["xquad-r"]["commit"] == "9bc8c7fb6dd8d01d72a05a93c2cb96882b0d299c"
    tsv = os.path.join(SHARED, "data", "PROVENANCE.tsv")
    if not os.path.exists(tsv):
        pytest.skip(f"../shared is absent ({tsv} not found): table not compared with PROVENANCE.tsv")
    with open(tsv, encoding="utf-8") as f:
        rows = {r["local_path"]: r for r in csv.DictReader(f, delimiter="\t")}
    for name, spec in dl.DATASETS.items():
        for rel, sha256 in spec["files"].items():
            row = rows[f"{name}/{rel}"]
            assert (row["sha256"], row["commit"], row["source_repo"], row["source_path"]) == \
                   (sha256, spec["commit"], spec["repo"], spec["prefix"] + rel)


# ---------------------------------------------------------------- 8: --from a local mirror

def test_dataset_from_fake_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    tables = {}
    for name in ("xquad-r", "mlqa"):
        files = {}
        for i, rel in enumerate(dl.DATASETS[name]["files"]):
            data = f"fake {name} {rel} {i}".encode()
            p = mirror / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            files[rel] = sha(data)
        tables[name] = files
        monkeypatch.setitem(dl.DATASETS, name, {**dl.DATASETS[name], "files": files})
    out = download_dataset("mlqa", tmp_path / "mlqa", mirror=mirror, progress=False)
    assert len(leftovers(tmp_path / "mlqa")) == 49
    assert (tmp_path / "mlqa" / "MLQA_V1" / "dev" / "dev-context-ar-question-de.json").exists()
    assert out == str(tmp_path / "mlqa")
    rel = "MLQA_V1/dev/dev-context-en-question-en.json"
    assert os.stat(tmp_path / "mlqa" / rel).st_nlink == 1            # copied, not linked to the mirror
    assert not os.path.samefile(tmp_path / "mlqa" / rel, mirror / "mlqa" / rel)
    (tmp_path / "mlqa" / rel).write_bytes(b"edited")                 # an edit of the copy leaves the mirror as it was
    assert (mirror / "mlqa" / rel).read_bytes() == f"fake mlqa {rel} {list(tables['mlqa']).index(rel)}".encode()

    (mirror / "xquad-r" / "th.json").write_bytes(b"damaged")          # wrong checksum in the mirror
    with pytest.raises(DownloadError) as e:
        download_dataset("xquad-r", tmp_path / "x", mirror=mirror, progress=False)
    assert "th.json" in str(e.value) and tables["xquad-r"]["th.json"] in str(e.value)
    assert "th.json" not in leftovers(tmp_path / "x") and not any(p.endswith(".part")
                                                                 for p in leftovers(tmp_path / "x"))
    (mirror / "xquad-r" / "th.json").unlink()                          # missing in the mirror
    with pytest.raises(DownloadError, match="th.json not found in the local mirror"):
        download_dataset("xquad-r", tmp_path / "x", mirror=mirror, progress=False)


def test_real_xquad_r_from_shared(tmp_path):
    src = os.path.join(SHARED, "data", "xquad-r")
    if not os.path.isdir(src):
        pytest.skip(f"../shared is absent ({os.path.abspath(src)} not found): real xquad-r not checked")
    out = tmp_path / "xquad-r"
    assert main(["xquad-r", "--from", os.path.join(SHARED, "data"), "--dir", str(out), "--quiet"]) == 0
    assert leftovers(out) == sorted(dl.DATASETS["xquad-r"]["files"])
    for rel, sha256 in dl.DATASETS["xquad-r"]["files"].items():
        assert sha256_file(out / rel) == sha256


# ---------------------------------------------------------------- 9: the command line

def test_cli_error_exit_1_no_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINIHBT_HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert main(["labse", "--dir", str(tmp_path / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--from" in err and "Traceback" not in err
    # bad arguments are refused before any transfer, with argparse's exit status 2
    for args, words in ((["xquad-r", "--from", str(tmp_path / "nowhere")], "no such directory"),
                        (["nonsense"], "unknown name"), (["xquad-r", "mlqa-r", "--dir", str(tmp_path)], "--dir")):
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2
        assert words in capsys.readouterr().err


def test_cli_success(server, tmp_path, fake_dataset, monkeypatch, capsys):
    for rel, data in fake_dataset.items():
        server.put(f"someorg/somerepo/{FAKE_COMMIT}/fake/{rel}", data)
    serve_model(server, "o/tiny", tiny_bert_files())
    monkeypatch.setenv("MINIHBT_GITHUB_RAW", server.url)
    monkeypatch.setenv("MINIHBT_HF_ENDPOINT", server.url)
    monkeypatch.chdir(tmp_path)
    assert main(["fake-ds", "o/tiny"]) == 0
    assert (tmp_path / "data" / "fake-ds" / "sub" / "de.json").read_bytes() == fake_dataset["sub/de.json"]
    assert (tmp_path / "weights" / "tiny" / "model.safetensors").exists()
    assert "fake-ds: data" in capsys.readouterr().out


def test_cli_subprocess_help_and_error(tmp_path):
    env = {**os.environ, "MINIHBT_HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "MINIHBT_GITHUB_RAW": f"http://127.0.0.1:{free_port()}", "PYTHONPATH": os.path.dirname(TESTS_DIR)}
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "minihbt.download"]
    h = subprocess.run(cmd + ["--help"], capture_output=True, text=True, env=env, timeout=60)
    assert h.returncode == 0
    for word in list(dl.MODELS) + list(dl.MODELS.values()) + list(dl.DATASETS) + \
            ["MINIHBT_HF_ENDPOINT", "MINIHBT_GITHUB_RAW", "--from", "DIR/mlqa/MLQA_V1/dev"]:
        assert word in h.stdout, word
    r = subprocess.run(cmd + ["xquad-r", "--dir", str(tmp_path / "x")], capture_output=True, text=True,
                       env=env, timeout=60, cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "127.0.0.1" in r.stderr and "--from" in r.stderr
