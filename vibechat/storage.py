"""The store: one interface over a local folder (file:// or a plain path) and S3 (s3://bucket/prefix).

Keys are '/'-separated paths relative to the store root. Every artifact of vibechat goes
through this module; it is the only one that imports boto3.

S3 settings come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL for S3-compatible servers such as SeaweedFS or MinIO, AWS_REGION).

A transient S3 failure (no connection, a timeout, a 5xx, throttling) is retried with backoff for the store's
`patience` (PATIENCE_SECONDS by default), so that phases and the controller ride out an S3 restart; only then is
it a StoreError. Interactive readers (the dashboard) open their store with less patience.
"""

import hashlib
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

from vibechat.common import VibechatError


PATIENCE_SECONDS = 120.0  # how long a transient S3 failure is retried before it is an error
RETRY_DELAY_MAX = 8.0  # the backoff between retries doubles from 0.5 s up to this


class StoreError(VibechatError):
    """The store could not be read or written; the message names the URL and what to do."""


class PreconditionFailed(StoreError):
    """A compare-and-swap write lost: someone else changed the object first."""


@dataclass
class Store:
    """Base class: the operations every store supports. Use open_store(url) to get one."""

    url: str
    patience: float = PATIENCE_SECONDS  # seconds transient failures are retried (S3)

    def child(self, key: str) -> "Store":
        """A store rooted at url/key (a run's folder, a checkpoint folder)."""
        return open_store(self.url.rstrip("/") + "/" + key.strip("/"), self.patience)

    def uri(self, key: str = "") -> str:
        return self.url.rstrip("/") + ("/" + key.lstrip("/") if key else "")

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    # the interface, implemented below for file:// and s3://
    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, local_path: str) -> None: ...
    def put_file(self, local_path: str, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def append_text(self, key: str, text: str) -> None: ...
    def stat(self, key: str) -> tuple[int, float]:
        """(size in bytes, time last written as a Unix timestamp) of an object; FileNotFoundError if absent."""
        ...

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        """(content, version tag) or None if absent; the tag feeds put_if_version."""
        ...

    def put_if_version(self, key: str, data: bytes, version: str | None) -> str:
        """Write only if the object's version is still `version` (None: only if absent).

        Returns the new version; raises PreconditionFailed if another writer got there first.
        """
        ...


def open_store(url: str, patience: float = PATIENCE_SECONDS) -> Store:
    """A Store for a file:// URL, a plain local path, or an s3://bucket/prefix URL; transient S3 failures are
    retried for `patience` seconds."""
    if not url:
        raise StoreError("empty store URL: pass file:///path, s3://bucket/prefix or a local path")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store URL {url!r}: file URLs need three slashes, e.g. file:///data/vibechat")
        return LocalStore(url=url, patience=patience, root=os.path.abspath(os.path.expanduser(path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URL {url!r} names no bucket: use s3://bucket/prefix")
        return S3Store(url=url, patience=patience, bucket=parsed.netloc, prefix=parsed.path.strip("/"))
    raise StoreError(f"store URL {url!r} has unknown scheme {parsed.scheme!r}: use file://, s3:// or a local path")


def _transient(e: BaseException) -> bool:
    """Whether an S3 call's failure may pass: no connection, a timeout, a 5xx, throttling (also when boto3 wrapped
    it, as upload_file does)."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as NoConnection

    cause = e.__context__ if type(e).__name__ == "S3UploadFailedError" and e.__context__ is not None else e
    if isinstance(cause, (NoConnection, HTTPClientError)):
        return True
    if isinstance(cause, ClientError):
        code = cause.response.get("Error", {}).get("Code", "")
        status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or code in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                                         "InternalError", "ServiceUnavailable")
    return False


def _content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@dataclass
class LocalStore(Store):
    root: str = ""

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *[p for p in key.split("/") if p]) if key else self.root

    def _missing(self, key: str) -> FileNotFoundError:
        return FileNotFoundError(f"{self.uri(key)} does not exist")

    def get_bytes(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise self._missing(key) from None

    def _writable_dir(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot write to store {self.url}: {e.strerror}; pick a writable --store") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._writable_dir(path)
        # write a temp file then rename: readers never see half a file
        try:
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except PermissionError as e:
            raise StoreError(f"cannot write {self.uri(key)}: {e.strerror}; pick a writable --store") from None

    def get_file(self, key: str, local_path: str) -> None:
        if not os.path.isfile(self._path(key)):
            raise self._missing(key)
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        shutil.copyfile(self._path(key), local_path)

    def put_file(self, local_path: str, key: str) -> None:
        path = self._path(key)
        self._writable_dir(path)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(local_path, tmp)
            os.replace(tmp, path)
        except PermissionError as e:
            raise StoreError(f"cannot write {self.uri(key)}: {e.strerror}; pick a writable --store") from None

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if os.path.isfile(base):
            return [prefix]
        keys = []
        for dirpath, _, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-") or ".tmp-" in name or name.endswith(".lock"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                keys.append(rel.replace(os.sep, "/"))
        return sorted(keys)

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def stat(self, key: str) -> tuple[int, float]:
        try:
            info = os.stat(self._path(key))
        except FileNotFoundError:
            raise self._missing(key) from None
        return info.st_size, info.st_mtime

    def delete(self, key: str) -> None:
        path = self._path(key)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    def append_text(self, key: str, text: str) -> None:
        path = self._path(key)
        self._writable_dir(path)
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.get_bytes(key)
        except FileNotFoundError:
            return None
        return data, _content_version(data)

    def put_if_version(self, key: str, data: bytes, version: str | None) -> str:
        import fcntl

        path = self._path(key)
        self._writable_dir(path)
        # an flock on a side file serializes the read-compare-write across processes
        with open(path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get_versioned(key)
            current_version = current[1] if current else None
            if current_version != version:
                raise PreconditionFailed(f"{self.uri(key)} was changed by another writer")
            self.put_bytes(key, data)
            return _content_version(data)


@dataclass
class S3Store(Store):
    bucket: str = ""
    prefix: str = ""
    part_size: int = 64 << 20  # files above this go up and down in parts of this size (S3's minimum is 5 MiB)

    def __post_init__(self):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
        from botocore.exceptions import PartialCredentialsError

        # botocore's quick retries first; _call's patient ones around them ride out an outage
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=120)
        # the key pair is read at every open: boto3's default session keeps the first credentials it found
        env = os.environ
        try:
            self._client = boto3.client(
                "s3", config=config, aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
                aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"), aws_session_token=env.get("AWS_SESSION_TOKEN"),
            )
        except PartialCredentialsError:
            raise StoreError(
                f"half the S3 credentials for {self.url} are set: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        self._transfer = TransferConfig(
            multipart_threshold=self.part_size, multipart_chunksize=self.part_size, max_concurrency=8
        )

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def _error(self, e: Exception, key: str) -> Exception:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{self._key(key)}"
        if isinstance(e, NoCredentialsError):
            return StoreError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(e, EndpointConnectionError):
            return StoreError(f"cannot reach the S3 endpoint for {where}: check AWS_ENDPOINT_URL and the network")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(f"{where} does not exist")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return PreconditionFailed(f"{where} was changed by another writer")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
                return StoreError(
                    f"S3 refused access to {where} ({code}): check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "and the bucket policy"
                )
            if code == "NoSuchBucket":
                return StoreError(f"bucket {self.bucket!r} does not exist: create it or fix --store")
            return StoreError(f"S3 error on {where}: {code} {e}")
        return e

    def _call(self, key: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), retried with backoff while it fails transiently for up to self.patience seconds."""
        deadline, delay = time.monotonic() + self.patience, 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # translated into one clear error type
                if _transient(e) and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(2 * delay, RETRY_DELAY_MAX)
                    continue
                err = self._error(e, key)
                if err is e:
                    raise
                if _transient(e):
                    err = StoreError(f"{err} (retried for {self.patience:g} s)")
                raise err from None

    def _get_object(self, key: str) -> tuple[bytes, str]:
        def get():  # the body is read inside the retries: a connection can drop mid-read
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return r["Body"].read(), r["ETag"]

        return self._call(key, get)

    def stat(self, key: str) -> tuple[int, float]:
        r = self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
        return r["ContentLength"], r["LastModified"].timestamp()

    def get_bytes(self, key: str) -> bytes:
        return self._get_object(key)[0]

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(key, self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_file(self, key: str, local_path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(local_path)), exist_ok=True)
        tmp = f"{local_path}.tmp-{uuid.uuid4().hex[:8]}"
        self._call(key, self._client.download_file, self.bucket, self._key(key), tmp, Config=self._transfer)
        os.replace(tmp, local_path)

    def put_file(self, local_path: str, key: str) -> None:
        self._call(key, self._client.upload_file, local_path, self.bucket, self._key(key), Config=self._transfer)

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0

        def list_all() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            return [obj["Key"][strip:] for page in pages for obj in page.get("Contents", [])]

        keys = self._call(prefix, list_all)
        if prefix and not prefix.endswith("/"):
            keys = [k for k in keys if k == prefix.strip("/") or k.startswith(prefix.strip("/") + "/")]
        return sorted(keys)

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except FileNotFoundError:
            return False
        except StoreError:
            # head_object gives a bare 404 for "missing"; anything else is real
            raise

    def delete(self, key: str) -> None:
        for k in self.list(key) or [key]:
            self._call(k, self._client.delete_object, Bucket=self.bucket, Key=self._key(k))

    def append_text(self, key: str, text: str) -> None:
        # S3 has no append: read-modify-write, retried with a version check (metrics files stay small)
        for _ in range(20):
            current = self.get_versioned(key)
            data = (current[0] if current else b"") + text.encode("utf-8")
            try:
                self.put_if_version(key, data, current[1] if current else None)
                return
            except PreconditionFailed:
                time.sleep(0.05)
        raise StoreError(f"could not append to {self.uri(key)}: too many concurrent writers")

    def get_versioned(self, key: str) -> tuple[bytes, str] | None:
        try:
            return self._get_object(key)
        except FileNotFoundError:
            return None

    def put_if_version(self, key: str, data: bytes, version: str | None) -> str:
        # S3 conditional writes: If-None-Match: * creates only; If-Match: <etag> replaces only that version
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        r = self._call(key, self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data, **cond)
        return r["ETag"]
