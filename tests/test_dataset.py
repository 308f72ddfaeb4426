"""Pretraining shards: the format, the splits, the offline pydocs corpus, and the FineWeb-Edu downloader
(against real HTTP servers on loopback)."""

import io
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vibechat.common import VibechatError
from vibechat.dataset import (
    build_pydocs,
    download_shards,
    list_shards,
    main,
    open_shard,
    parquets_iter_batched,
    pydocs_documents,
    split_shards,
    write_shard,
)
from vibechat.layout import shard_key
from vibechat.storage import open_store


def texts_of(index: int, n: int = 20) -> list[str]:
    return [f"shard {index} document {i}: {'é' * i}" for i in range(n)]


def all_texts(store, key) -> list[str]:
    shard = open_shard(store, key)
    return [t for rg in range(shard.num_row_groups) for t in shard.texts(rg)]


def test_a_written_shard_reads_back_by_row_group(store_url):
    store = open_store(store_url)
    key = write_shard(store, "demo", 3, texts_of(3), row_group_size=8)
    assert key == "data/demo/shard_00003.parquet"
    shard = open_shard(store, key)
    assert shard.num_row_groups == 3
    assert shard.texts(2) == texts_of(3)[16:]
    assert all_texts(store, key) == texts_of(3)


def test_shards_live_in_s3_too(s3_url):
    store = open_store(s3_url)
    for i in range(3):
        write_shard(store, "demo", i, texts_of(i))
    assert list_shards(store, "demo") == [shard_key("demo", i) for i in range(3)]
    assert all_texts(store, shard_key("demo", 2)) == texts_of(2)


def test_val_is_the_last_shard_and_train_the_others(store_url):
    store = open_store(store_url)
    for i in range(4):
        write_shard(store, "demo", i, texts_of(i))
    store.put_text("data/demo/README.txt", "not a shard")
    assert split_shards(store, "demo", "val") == [shard_key("demo", 3)]
    assert split_shards(store, "demo", "train") == [shard_key("demo", i) for i in range(3)]


def test_parquets_iter_batched_strides_over_row_groups(store_url):
    store = open_store(store_url)
    for i in range(3):
        write_shard(store, "demo", i, texts_of(i, n=30), row_group_size=10)
    batches = list(parquets_iter_batched("train", start=1, step=2, dataset="demo", store=store))
    assert batches == [texts_of(0, 30)[10:20], texts_of(1, 30)[10:20]]


def test_a_dataset_with_fewer_than_two_shards_is_an_error_saying_what_to_run(store_url):
    store = open_store(store_url)
    write_shard(store, "pydocs", 0, texts_of(0))
    with pytest.raises(VibechatError, match="needs at least 2.*python -m jobs.data --dataset pydocs"):
        split_shards(store, "pydocs", "train")


def test_an_unknown_split_is_an_error(store_url):
    with pytest.raises(VibechatError, match="unknown split 'test'"):
        split_shards(open_store(store_url), "demo", "test")


def test_a_truncated_shard_is_an_error_naming_it(store_url):
    store = open_store(store_url)
    key = write_shard(store, "demo", 0, texts_of(0))
    data = store.get_bytes(key)
    store.put_bytes(key, data[: len(data) // 2])
    with pytest.raises(VibechatError, match=r"shard .*shard_00000\.parquet is corrupt"):
        open_shard(store, key)


def test_a_shard_with_damaged_pages_is_an_error_naming_it(store_url):
    store = open_store(store_url)
    key = write_shard(store, "demo", 0, texts_of(0, n=200), row_group_size=50)
    data = bytearray(store.get_bytes(key))
    data[8:400] = bytes(392)  # the footer survives, the first pages do not
    store.put_bytes(key, bytes(data))
    shard = open_shard(store, key)
    with pytest.raises(VibechatError, match=r"shard .*shard_00000\.parquet is corrupt"):
        shard.texts(0)


def test_a_shard_of_raw_bytes_instead_of_utf8_text_is_an_error_naming_it(store_url):
    store = open_store(store_url)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array([b"\xff\xfe bad"], type=pa.binary())}), buffer)
    store.put_bytes(shard_key("demo", 0), buffer.getvalue())
    with pytest.raises(VibechatError, match=r"shard_00000\.parquet: column 'text' holds binary, not UTF-8"):
        open_shard(store, shard_key("demo", 0))


def test_a_shard_without_a_text_column_is_an_error_naming_it(store_url):
    store = open_store(store_url)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"content": ["hello"]}), buffer)
    store.put_bytes(shard_key("demo", 0), buffer.getvalue())
    with pytest.raises(VibechatError, match=r"shard_00000\.parquet has no 'text' column"):
        open_shard(store, shard_key("demo", 0))


# ----------------------------------------------------------------------------------------------------------
# pydocs


@pytest.fixture
def python_tree(tmp_path):
    """A small library in the shapes the standard library has: docstrings at every level, a latin-1 file,
    a deliberately broken file, pydoc's topics and a site-packages folder to leave out."""
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (root / "pkg" / "shapes.py").write_text(
        '"""Shapes and their areas."""\n'
        "import sys\n"
        "class Circle:\n"
        '    """A round shape."""\n'
        "    def area(self, scale=1):\n"
        '        """Return pi r squared."""\n'
        "if sys.platform:\n"
        "    def helper(x, *, y):\n"
        '        """Help with x."""\n'
    )
    (root / "legacy.py").write_bytes(b'# -*- coding: latin-1 -*-\n"""Caf\xe9 cr\xe8me."""\n')
    (root / "broken.py").write_text('"""Never read."""\ndef (:\n')
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text("topics = {'if': 'The if statement ...', 'for': 'The for ...'}\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "thirdparty.py").write_text('"""Not the standard library."""\n')
    return str(root)


def test_pydocs_documents_gather_every_docstring_of_a_module_in_source_order(python_tree):
    documents = pydocs_documents(python_tree)
    assert "pkg\n\nThe package." in documents  # a package's docstring is in its __init__.py
    assert "Café crème." in " ".join(documents)
    assert "The if statement ..." in documents and "The for ..." in documents
    shapes = next(d for d in documents if d.startswith("pkg.shapes"))
    assert shapes == (
        "pkg.shapes\n\nShapes and their areas.\n\n"
        "class Circle\nA round shape.\n\n"
        "def area(self, scale=1)\nReturn pi r squared.\n\n"
        "def helper(x, *, y)\nHelp with x."
    )
    assert not any("Never read" in d or "Not the standard library" in d for d in documents)


def test_pydocs_of_the_standard_library_are_real_text():
    documents = pydocs_documents(os.path.join(sysconfig.get_paths()["stdlib"], "json"))
    assert any("JSON" in d and "decode" in d for d in documents)


def test_build_pydocs_writes_balanced_shards_and_keeps_existing_ones(store_url):
    store = open_store(store_url)
    email = os.path.join(sysconfig.get_paths()["stdlib"], "email")
    write_shard(store, "pydocs", 1, ["already here"])
    keys = build_pydocs(store, root=email, shard_chars=20_000)
    assert keys == list_shards(store, "pydocs") and len(keys) >= 4
    assert all_texts(store, keys[1]) == ["already here"]  # not rewritten
    sizes = [sum(map(len, all_texts(store, k))) for k in keys if k != keys[1]]
    assert all(size > 5_000 for size in sizes)  # the val shard, last, is not a leftover scrap
    written = [t for k in keys if k != keys[1] for t in all_texts(store, k)]
    assert len(set(written)) == len(written) and set(written) <= set(pydocs_documents(email))


# ----------------------------------------------------------------------------------------------------------
# the downloader, against real HTTP servers


class ShardServer(ThreadingHTTPServer):
    """Serves `files` by name. misbehave: None, "fail_first" (503 to the first request for each file),
    "drop_first" (the first response breaks off half way), "always_fail" (503 every time),
    "ignore_range" (always sends the whole file, 200)."""

    def __init__(self, files: dict[str, bytes], misbehave: str | None = None):
        super().__init__(("127.0.0.1", 0), ShardHandler)
        self.files, self.misbehave = files, misbehave
        self.requests: list[tuple[str, str | None]] = []  # (file name, Range header)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/shards"


class ShardHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server: ShardServer = self.server
        name = self.path.rsplit("/", 1)[-1]
        with server.lock:
            server.requests.append((name, self.headers.get("Range")))
            first = sum(1 for n, _ in server.requests if n == name) == 1
        if name not in server.files:
            return self.send_error(404)
        if server.misbehave == "always_fail" or (server.misbehave == "fail_first" and first):
            return self.send_error(503)
        data, start = server.files[name], 0
        if self.headers.get("Range") and server.misbehave != "ignore_range":
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.misbehave == "drop_first" and first:
            self.wfile.write(body[: len(body) // 2])  # then the connection closes short of Content-Length
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def origin(tmp_path):
    """Parquet shards as the hub serves them: name -> bytes."""
    store = open_store(str(tmp_path / "origin"))
    files = {}
    for i in range(3):
        key = write_shard(store, "fineweb-edu", i, texts_of(i, n=500), row_group_size=100)
        files[key.rsplit("/", 1)[-1]] = store.get_bytes(key)
    return files


@pytest.fixture
def serve():
    servers = []

    def start(files, misbehave=None) -> ShardServer:
        server = ShardServer(files, misbehave)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def download(store, server, tmp_path, indices=(0, 1, 2), **kwargs):
    kwargs = {"attempts": 3, "backoff_s": 0.01, "download_dir": str(tmp_path / "downloads"), **kwargs}
    return download_shards(store, list(indices), base_url=server.url, workers=2, **kwargs)


def test_download_puts_every_shard_in_the_store(origin, serve, store_url, tmp_path):
    store = open_store(store_url)
    keys = download(store, serve(origin), tmp_path)
    assert keys == [shard_key("fineweb-edu", i) for i in range(3)]
    assert [store.get_bytes(k) for k in keys] == list(origin.values())
    assert os.listdir(tmp_path / "downloads") == []  # partial files are cleaned up


def test_download_retries_a_failed_request(origin, serve, s3_url, tmp_path):
    store = open_store(s3_url)
    server = serve(origin, "fail_first")
    download(store, server, tmp_path)
    assert [store.get_bytes(shard_key("fineweb-edu", i)) for i in range(3)] == list(origin.values())
    assert len(server.requests) == 6  # one 503 and one success per shard


def test_download_resumes_a_broken_transfer_with_a_range_request(serve, store_url, tmp_path):
    # big enough (~6 MB) that some 1 MB chunks land on disk before the connection breaks
    texts = [os.urandom(50_000).hex() for _ in range(60)]
    write_shard(open_store(str(tmp_path / "origin")), "big", 0, texts)
    data = open_store(str(tmp_path / "origin")).get_bytes(shard_key("big", 0))
    store = open_store(store_url)
    server = serve({"shard_00000.parquet": data}, "drop_first")
    download(store, server, tmp_path, indices=[0])
    (_, first_range), (_, second_range) = server.requests
    assert first_range is None
    assert 0 < int(second_range.removeprefix("bytes=").rstrip("-")) <= len(data) // 2
    assert store.get_bytes(shard_key("fineweb-edu", 0)) == data


def test_download_resumes_a_partial_file_left_by_a_killed_process(origin, serve, store_url, tmp_path):
    store = open_store(store_url)
    data = origin["shard_00001.parquet"]
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "shard_00001.parquet.part").write_bytes(data[:1000])
    server = serve(origin)
    download(store, server, tmp_path, indices=[1])
    assert server.requests == [("shard_00001.parquet", "bytes=1000-")]
    assert store.get_bytes(shard_key("fineweb-edu", 1)) == data


def test_download_starts_over_when_the_server_ignores_range(origin, serve, store_url, tmp_path):
    store = open_store(store_url)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "shard_00002.parquet.part").write_bytes(b"stale bytes")
    download(store, serve(origin, "ignore_range"), tmp_path, indices=[2])
    assert store.get_bytes(shard_key("fineweb-edu", 2)) == origin["shard_00002.parquet"]


def test_download_skips_shards_already_in_the_store(origin, serve, store_url, tmp_path):
    store = open_store(store_url)
    write_shard(store, "fineweb-edu", 0, ["kept"])
    server = serve(origin)
    download(store, server, tmp_path, indices=[0, 1])
    assert [name for name, _ in server.requests] == ["shard_00001.parquet"]
    assert all_texts(store, shard_key("fineweb-edu", 0)) == ["kept"]


def test_a_server_that_keeps_failing_is_an_error_after_the_attempts(origin, serve, store_url, tmp_path):
    server = serve(origin, "always_fail")
    with pytest.raises(VibechatError, match=r"could not download .*shard_00000\.parquet in 3 attempts \(HTTP 503\)"):
        download(open_store(store_url), server, tmp_path, indices=[0])
    assert len(server.requests) == 3


def test_a_missing_shard_is_an_error_at_once(origin, serve, store_url, tmp_path):
    server = serve(origin)
    with pytest.raises(VibechatError, match=r"shard_00009\.parquet does not exist \(404\)"):
        download(open_store(store_url), server, tmp_path, indices=[9])
    assert len(server.requests) == 1


def test_a_download_that_is_not_parquet_is_fetched_again_then_refused(serve, store_url, tmp_path):
    server = serve({"shard_00000.parquet": b"<html>rate limited</html>"})
    with pytest.raises(VibechatError, match="not a complete parquet file"):
        download(open_store(store_url), server, tmp_path, indices=[0])
    assert len(server.requests) == 3
    assert not open_store(store_url).exists(shard_key("fineweb-edu", 0))


def test_the_data_program_downloads_and_is_idempotent(origin, serve, store_url, tmp_path, monkeypatch):
    monkeypatch.setenv("VIBECHAT_STORE", store_url)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where partial downloads go
    server = serve(origin)
    argv = ["--dataset", "fineweb-edu", "--num-shards", "3", "--base-url", server.url]
    main(argv)
    main(argv)
    assert len(server.requests) == 3  # the second run found every shard in the store
    assert list_shards(open_store(store_url), "fineweb-edu") == [shard_key("fineweb-edu", i) for i in range(3)]


def test_the_data_program_reports_bad_arguments_in_one_line(store_url):
    env = {**os.environ, "VIBECHAT_STORE": store_url}
    result = subprocess.run(
        [sys.executable, "-m", "jobs.data", "--dataset", "fineweb-edu", "--num-shards", "1"],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --num-shards 1: FineWeb-Edu needs 2..1823 shards (train + val)"
