"""The store: one interface over local folders and S3, the same behaviour on both."""

import dataclasses
import http.client
import http.server
import os
import threading
import time

import pytest

from vibechat.storage import PreconditionFailed, StoreError, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store("file://" + str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_url"))


def test_put_then_get_returns_the_same_bytes(store):
    store.put_bytes("a/b.bin", b"\x00\x01hello")
    assert store.get_bytes("a/b.bin") == b"\x00\x01hello"


def test_missing_key_raises_file_not_found_naming_it(store):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        store.get_bytes("nope.txt")


def test_list_returns_keys_under_a_prefix_recursively(store):
    for key in ["runs/r1/run.json", "runs/r1/metrics/base.jsonl", "runs/r2/run.json", "data/x/shard_00000.parquet"]:
        store.put_text(key, "{}")
    assert store.list("runs/r1") == ["runs/r1/metrics/base.jsonl", "runs/r1/run.json"]
    assert store.list("runs/r") == []  # a prefix is a folder, not a string prefix


def test_stat_gives_an_objects_size_and_when_it_was_written(store):
    before = time.time()
    store.put_bytes("a/b.bin", b"x" * 1234)
    size, written = store.stat("a/b.bin")
    assert size == 1234 and before - 5 <= written <= time.time() + 5
    with pytest.raises(FileNotFoundError):
        store.stat("a/missing.bin")


def test_exists_and_delete(store):
    store.put_text("x/y.txt", "1")
    assert store.exists("x/y.txt")
    store.delete("x")
    assert not store.exists("x/y.txt")


def test_file_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"z" * 100_000)
    store.put_file(str(src), "files/big.bin")
    store.get_file("files/big.bin", str(tmp_path / "dst.bin"))
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()


def test_append_text_accumulates_lines(store):
    store.append_text("m.jsonl", "1\n")
    store.append_text("m.jsonl", "2\n")
    assert store.get_text("m.jsonl") == "1\n2\n"


def test_compare_and_swap_rejects_a_stale_version(store):
    version = store.put_if_version("run.json", b"v1", None)
    store.put_if_version("run.json", b"v2", version)
    with pytest.raises(PreconditionFailed):
        store.put_if_version("run.json", b"v3", version)
    assert store.get_bytes("run.json") == b"v2"


def test_compare_and_swap_create_only_once(store):
    store.put_if_version("run.json", b"v1", None)
    with pytest.raises(PreconditionFailed):
        store.put_if_version("run.json", b"other", None)
    assert store.get_bytes("run.json") == b"v1"


def test_child_store_is_rooted_under_the_parent(store):
    store.child("runs/r1").put_text("run.json", "{}")
    assert store.exists("runs/r1/run.json")


def test_unknown_scheme_is_one_clear_error():
    with pytest.raises(StoreError, match="unknown scheme 'gs'"):
        open_store("gs://bucket/x")


@pytest.mark.parametrize("variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_wrong_s3_credentials_name_the_variables(s3_url, monkeypatch, variable):
    monkeypatch.setenv(variable, "not-the-right-value")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"):
        open_store(s3_url).put_text("x.txt", "1")


def test_half_set_s3_credentials_name_the_missing_variable(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "some-key")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StoreError, match="AWS_SECRET_ACCESS_KEY"):
        open_store("s3://bucket/x")


def test_large_s3_file_goes_up_in_parts_and_comes_back_whole(s3_url, tmp_path):
    store = dataclasses.replace(open_store(s3_url), part_size=5 << 20)  # S3's smallest part
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 << 20))
    store.put_file(str(src), "big.bin")
    _, etag = store.get_versioned("big.bin")
    assert etag.strip('"').endswith("-3")  # S3 tags a multipart object <md5 of part md5s>-<number of parts>
    store.get_file("big.bin", str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


class FlakyProxy(http.server.ThreadingHTTPServer):
    """A loopback proxy in front of the S3 server that answers the first request 503 SlowDown."""

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", 0), _FlakyProxyHandler)
        self.upstream = upstream.removeprefix("http://")
        self.statuses: list[int] = []  # what each request got, in order

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _relay(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self.server.statuses:
            status, headers, data = 503, [], b"<Error><Code>SlowDown</Code><Message>try again</Message></Error>"
        else:
            # headers go on as signed (Host included) so the signature checks out upstream; Expect was answered here
            upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
            forwarded = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
            upstream.request(self.command, self.path, body, forwarded)
            response = upstream.getresponse()
            status, data = response.status, response.read()
            hop_by_hop = ("connection", "transfer-encoding")
            headers = [(k, v) for k, v in response.getheaders() if k.lower() not in hop_by_hop]
            upstream.close()
        self.server.statuses.append(status)
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def flaky_proxy(s3_env):
    proxy = FlakyProxy(s3_env)
    thread = threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def test_s3_write_is_retried_after_a_transient_503(s3_url, flaky_proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", flaky_proxy.url)
    open_store(s3_url).put_text("x.txt", "1")
    assert flaky_proxy.statuses == [503, 200]
    assert open_store(s3_url).get_text("x.txt") == "1"


def test_missing_bucket_says_to_create_it(s3_env):
    with pytest.raises(StoreError, match="does not exist: create it"):
        open_store("s3://no-such-bucket-here/x").put_text("a", "1")


def test_non_writable_local_store_says_to_pick_another(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the /proc case below covers root")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(StoreError, match="writable"):
        open_store(str(ro / "store")).put_text("a", "1")


def test_store_under_an_unwritable_path_says_to_pick_another():
    with pytest.raises(StoreError, match="writable"):
        open_store("/proc/vibechat-store").put_text("a", "1")

