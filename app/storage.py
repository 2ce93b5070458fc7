"""Object storage for artifacts and uploaded datasets: an S3-compatible backend and a local folder.

Both backends take the same slash-separated keys (validated by `validate_key`). boto3 is imported only
inside `S3Storage`, so the embedded mode runs without it being importable.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import mimetypes
import os
import re
import shutil
import tempfile
import threading
import unicodedata
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "MAX_KEY_LENGTH",
    "LocalStorage",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StoredObject",
    "storage_from_url",
    "validate_key",
]

MAX_KEY_LENGTH = 1024  # S3's limit, in UTF-8 bytes; applied to the local backend too so keys stay portable
CHUNK_SIZE = 1 << 20
_MIB = 1 << 20
_S3_MIN_PART = 5 * _MIB
_S3_MAX_PART = 5 << 30
_S3_MAX_PARTS = 10_000
_S3_MAX_PRESIGN_S = 7 * 24 * 3600
_S3_DELETE_BATCH = 1000
# Temp files of in-progress local writes carry this name prefix; keys may not use it, so a listing can
# tell them apart from objects.
_TMP_MARK = ".lorp-partial-"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling"}
)
_AUTH_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AllAccessDisabled"}
)
_CONTENT_TYPES = {".jsonl": "application/x-ndjson", ".md": "text/markdown", ".safetensors": "application/octet-stream"}


@dataclass(frozen=True)
class StoredObject:
    """An object as written: key, size in bytes, hex sha256 of its content, content type."""

    key: str
    size: int
    sha256: str
    content_type: str


class StorageError(Exception):
    """A storage operation failed; `retryable` says whether the same call may succeed later."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ObjectNotFound(StorageError):
    """No object exists under the key."""

    def __init__(self, key: str, where: str = "") -> None:
        super().__init__(f"object {key!r} not found" + (f" in {where}" if where else ""), retryable=False)
        self.key = key


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return "not a string"
    if not key:
        return "empty"
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if len(encoded) > MAX_KEY_LENGTH:
        return f"longer than {MAX_KEY_LENGTH} bytes"
    if any(unicodedata.category(c) == "Cc" for c in key):
        return "contains a NUL or control character"
    if key.startswith("/"):
        return "absolute (starts with '/')"
    if "\\" in key:
        return "contains a backslash"
    for segment in key.split("/"):
        if segment == "":
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
    return None


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise ValueError naming it."""
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(f"invalid storage key {key!r}: {problem}")
    return key


def _validate_prefix(prefix: str, *, allow_empty: bool) -> str:
    # A prefix names a folder: "a/b" and "a/b/" are the same, and "" (when allowed) means everything.
    if not isinstance(prefix, str):
        raise ValueError(f"invalid storage prefix {prefix!r}: not a string")
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if not stripped:
        if allow_empty:
            return ""
        raise ValueError("invalid storage prefix '': refusing to operate on the whole store")
    problem = _key_problem(stripped)
    if problem is not None:
        raise ValueError(f"invalid storage prefix {prefix!r}: {problem}")
    return stripped


def _guess_content_type(key: str) -> str:
    suffix = Path(key).suffix.lower()
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    return mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    # A raw or socket-backed stream may return short reads; a multipart part must be full-sized.
    buf = bytearray()
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _write_atomically(src: BinaryIO, target: Path) -> tuple[int, str]:
    """Copy `src` into `target` via a temp file in the same folder; returns (size, sha256)."""
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_MARK, dir=target.parent)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK_SIZE):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
            out.flush()
            # fsync before the rename: otherwise a crash can leave a complete-looking but empty file.
            os.fsync(out.fileno())
        # mkstemp creates 0600; the API and the worker may run as different users over a shared folder.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return size, digest.hexdigest()


def _iter_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(chunk_size):
            yield chunk


def _content_disposition(filename: str) -> str:
    # Only the last path component, without quotes or control characters: the header must not be
    # injectable and the browser must not be told to write outside its download folder.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C" and c not in '"')
    name = name.strip() or "download"
    ascii_name = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


class Storage(ABC):
    """One interface over object stores; keys are slash-separated relative paths."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> StoredObject:
        """Store the file at `path` under `key`, streaming it and computing its sha256."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> StoredObject:
        """Store `data` under `key`."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """Open the object for streaming reads; raises ObjectNotFound at once if it is missing."""

    @abstractmethod
    def download_to(self, key: str, path: Path) -> None:
        """Write the object to `path` atomically, creating parent folders."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists under `key`."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises ObjectNotFound if it is missing."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete the object named `prefix` and everything under `prefix/`; returns how many objects went."""

    @abstractmethod
    def list(self, prefix: str = "") -> builtins.list[str]:
        """Sorted keys equal to `prefix` or under `prefix/` ("" lists everything)."""

    @abstractmethod
    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        """A time-limited GET URL for the object, or None where the backend has none."""

    @abstractmethod
    def check(self) -> None:
        """Readiness probe: raise StorageError if the store cannot be used."""

    @abstractmethod
    def describe(self) -> str:
        """Where objects go, for logs and errors (no credentials)."""

    def iter_chunks(self, key: str, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Iterate the object's bytes; the object is opened now so a missing key fails before streaming."""
        return _iter_chunks(self.open(key), chunk_size)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class LocalStorage(Storage):
    """Objects as files under a root folder; writes are atomic and no path leaves the root."""

    def __init__(self, root: Path | str) -> None:
        root_path = Path(root).expanduser()
        try:
            root_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage folder {root_path}: {exc.strerror or exc}") from exc
        self.root = root_path.resolve()

    def _inside(self, path: Path, key: str, *, allow_root: bool = False) -> Path:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
            raise StorageError(f"cannot resolve key {key!r} under {self.root}: {exc}") from exc
        if (resolved == self.root and not allow_root) or not resolved.is_relative_to(self.root):
            raise StorageError(
                f"key {key!r} resolves to {resolved}, outside the storage folder {self.root} (a symlink?)"
            )
        return resolved

    def _path(self, key: str) -> Path:
        validate_key(key)
        if any(segment.startswith(_TMP_MARK) for segment in key.split("/")):
            raise ValueError(f"invalid storage key {key!r}: segments starting with {_TMP_MARK!r} are reserved")
        return self._inside(self.root.joinpath(*key.split("/")), key)

    def _os_error(self, exc: OSError, action: str, key: str) -> StorageError:
        return StorageError(f"cannot {action} {key!r} in {self.describe()}: {exc.strerror or exc}")

    def _write(self, key: str, src: BinaryIO, content_type: str | None) -> StoredObject:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StorageError(f"cannot write {key!r}: a parent of it is an object, not a folder") from exc
        except OSError as exc:
            raise self._os_error(exc, "write", key) from exc
        # A symlink could have appeared between the check and mkdir; the temp file lands in the parent.
        self._inside(target.parent, key, allow_root=True)
        try:
            size, sha = _write_atomically(src, target)
        except IsADirectoryError as exc:
            raise StorageError(f"cannot write {key!r}: a folder of objects already has that name") from exc
        except OSError as exc:
            raise self._os_error(exc, "write", key) from exc
        return StoredObject(key=key, size=size, sha256=sha, content_type=content_type or _guess_content_type(key))

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> StoredObject:
        """Copy the file at `path` into the store under `key`."""
        validate_key(key)
        with Path(path).open("rb") as src:
            return self._write(key, src, content_type)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> StoredObject:
        """Store `data` under `key`."""
        return self._write(key, io.BytesIO(data), content_type)

    def open(self, key: str) -> BinaryIO:
        """Open the object's file for reading."""
        target = self._path(key)
        try:
            return target.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(key, self.describe()) from exc
        except OSError as exc:
            raise self._os_error(exc, "read", key) from exc

    def download_to(self, key: str, path: Path) -> None:
        """Copy the object to `path` atomically."""
        dest = Path(path)
        with self.open(key) as src:
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(src, dest)

    def exists(self, key: str) -> bool:
        """Whether a file exists under `key`."""
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        """The file's size in bytes."""
        target = self._path(key)
        if not target.is_file():
            raise ObjectNotFound(key, self.describe())
        try:
            return target.stat().st_size
        except FileNotFoundError as exc:
            raise ObjectNotFound(key, self.describe()) from exc
        except OSError as exc:
            raise self._os_error(exc, "stat", key) from exc

    def _count_objects(self, base: Path) -> int:
        return sum(
            1 for _, _, names in os.walk(base, followlinks=False) for name in names if not name.startswith(_TMP_MARK)
        )

    def delete_prefix(self, prefix: str) -> int:
        """Delete the file named `prefix` or the folder `prefix/` with everything in it."""
        stripped = _validate_prefix(prefix, allow_empty=False)
        base = self._path(stripped)
        try:
            if base.is_dir():
                count = self._count_objects(base)
                # rmtree never follows symlinks inside the folder, so nothing outside the root is touched.
                shutil.rmtree(base)
            elif base.exists():
                base.unlink()
                count = 1
            else:
                return 0
        except OSError as exc:
            raise self._os_error(exc, "delete", prefix) from exc
        # Empty parent folders are left by per-job prefixes; removing them keeps the tree browsable.
        parent = base.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return count

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys of the files equal to `prefix` or under `prefix/`, sorted."""
        stripped = _validate_prefix(prefix, allow_empty=True)
        base = self._path(stripped) if stripped else self.root
        if base.is_file():
            return [stripped]
        keys: builtins.list[str] = []
        for dirpath, _, names in os.walk(base, followlinks=False):
            for name in names:
                if not name.startswith(_TMP_MARK):
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        """None: a local folder has no URL of its own, so the API streams the file instead."""
        self._path(key)
        return None

    def check(self) -> None:
        """Raise StorageError unless the root folder exists and is writable."""
        if not self.root.is_dir():
            raise StorageError(f"storage folder {self.root} is missing or not a folder")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage folder {self.root} is not writable by this process (uid {os.getuid()})")

    def describe(self) -> str:
        """The root as a file:// URL."""
        return self.root.as_uri()


class _S3Raw(io.RawIOBase):
    """A boto3 StreamingBody as a raw stream, with read errors mapped to StorageError."""

    def __init__(self, body: Any, on_error: Callable[[Exception], StorageError | None]) -> None:
        super().__init__()
        self._body = body
        self._on_error = on_error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except Exception as exc:
            mapped = self._on_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


class S3Storage(Storage):
    """Objects in an S3-compatible bucket (AWS, MinIO, moto), under an optional key prefix."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        multipart_threshold: int = 64 << 20,
        part_size: int = 16 << 20,
        max_concurrency: int = 4,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        max_attempts: int = 3,
        public_endpoint_url: str | None = None,
    ) -> None:
        if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(f"invalid S3 bucket name {bucket!r}: 3-63 lowercase letters, digits, '.' or '-'")
        stripped = prefix.strip("/") if prefix else ""
        if stripped:
            problem = _key_problem(stripped)
            if problem is not None:
                raise ValueError(f"invalid S3 prefix {prefix!r}: {problem}")
        if not _S3_MIN_PART <= part_size <= _S3_MAX_PART:
            raise ValueError(f"part_size {part_size} must be between 5 MiB and 5 GiB (S3's part limits)")
        if multipart_threshold < 0:
            raise ValueError(f"multipart_threshold {multipart_threshold} must be >= 0")
        if max_concurrency < 1 or max_attempts < 1 or connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("max_concurrency and max_attempts must be >= 1, timeouts > 0")
        if (access_key is None) != (secret_key is None):
            raise ValueError("give both access_key and secret_key, or neither (to use the default AWS chain)")
        self.bucket = bucket
        self.prefix = stripped
        self.endpoint_url = endpoint_url or None
        self.public_endpoint_url = public_endpoint_url or None
        self.region = region
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self._credentials = (access_key, secret_key, session_token)
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}

    # -- clients -------------------------------------------------------------------------------------

    def _make_client(self, endpoint: str | None, connect_timeout: float, read_timeout: float, attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"total_max_attempts": attempts, "mode": "standard"},
            # MinIO and moto serve buckets as paths; virtual hosts would need wildcard DNS.
            s3={"addressing_style": "path" if endpoint else "auto"},
            max_pool_connections=max(10, self.max_concurrency * 2),
        )
        access_key, secret_key, token = self._credentials
        # A session per storage: boto3's default session is not safe to share across threads.
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=token,
            region_name=self.region,
        )
        return session.client("s3", endpoint_url=endpoint, config=config)

    def _client(self, kind: str = "main") -> Any:
        with self._lock:
            client = self._clients.get(kind)
            if client is None:
                if kind == "probe":
                    # A readiness probe must answer within a probe interval, not after retries with backoff.
                    client = self._make_client(
                        self.endpoint_url, min(self.connect_timeout, 2), min(self.read_timeout, 5), 1
                    )
                elif kind == "public":
                    client = self._make_client(
                        self.public_endpoint_url, self.connect_timeout, self.read_timeout, self.max_attempts
                    )
                else:
                    client = self._make_client(
                        self.endpoint_url, self.connect_timeout, self.read_timeout, self.max_attempts
                    )
                self._clients[kind] = client
            return client

    # -- keys and errors -----------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        validate_key(key)
        full = f"{self.prefix}/{key}" if self.prefix else key
        if len(full.encode("utf-8")) > MAX_KEY_LENGTH:
            raise ValueError(
                f"invalid storage key {key!r}: longer than {MAX_KEY_LENGTH} bytes with prefix {self.prefix!r}"
            )
        return full

    def _relative(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _map_error(self, exc: Exception, action: str, key: str) -> StorageError | None:
        """Translate a botocore/boto3 error into a StorageError; None for anything else."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = self.describe()
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            message = error.get("Message") or code
            if code == "NoSuchBucket" or (action == "check" and status == 404):
                return StorageError(
                    f"bucket {self.bucket!r} does not exist at {where}; create it or fix the storage URL"
                )
            if code in ("NoSuchKey", "NotFound", "404") or status == 404:
                return ObjectNotFound(key, where)
            if status in (401, 403) or code in _AUTH_CODES:
                return StorageError(
                    f"{action} {key!r} on {where} was refused ({code or status}): "
                    "check the access key, secret key and the bucket's policy"
                )
            retryable = status >= 500 or status == 429 or code in _RETRYABLE_CODES
            return StorageError(
                f"{action} {key!r} on {where} failed: {code} {message} (HTTP {status})", retryable=retryable
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(f"no S3 credentials for {where}: configure an access key and secret key")
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            return StorageError(f"cannot reach S3 at {where} to {action} {key!r}: {exc}", retryable=True)
        if isinstance(exc, BotoCoreError):
            return StorageError(f"{action} {key!r} on {where} failed: {exc}")
        if isinstance(exc, Boto3Error):
            # s3transfer gives up with these after its own retries of dropped connections.
            return StorageError(f"{action} {key!r} on {where} failed: {exc}", retryable=True)
        return None

    def _call(self, action: str, key: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except Exception as exc:
            mapped = self._map_error(exc, action, key)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    # -- writes --------------------------------------------------------------------------------------

    def _put_stream(self, key: str, src: BinaryIO, size: int, content_type: str | None) -> StoredObject:
        full = self._full(key)
        ctype = content_type or _guess_content_type(key)
        if size > self.multipart_threshold:
            return self._put_multipart(key, full, src, size, ctype)
        data = src.read()  # at most multipart_threshold bytes in memory
        self._call("upload", key, self._client().put_object, Bucket=self.bucket, Key=full, Body=data, ContentType=ctype)
        return StoredObject(key=key, size=len(data), sha256=hashlib.sha256(data).hexdigest(), content_type=ctype)

    def _upload_part(self, key: str, full: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        response = self._call(
            "upload part of",
            key,
            self._client().upload_part,
            Bucket=self.bucket,
            Key=full,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _put_multipart(self, key: str, full: str, src: BinaryIO, size: int, ctype: str) -> StoredObject:
        part_size = self.part_size
        if size > part_size * _S3_MAX_PARTS:
            # S3 allows 10,000 parts; grow the parts (whole MiB) rather than fail on a very large file.
            per_part = -(-size // _S3_MAX_PARTS)
            part_size = -(-per_part // _MIB) * _MIB
        client = self._client()
        created = self._call(
            "start upload of", key, client.create_multipart_upload, Bucket=self.bucket, Key=full, ContentType=ctype
        )
        upload_id = created["UploadId"]
        digest = hashlib.sha256()
        total = 0
        parts: builtins.list[dict[str, Any]] = []
        try:
            with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="s3-part") as pool:
                pending: deque[Future[dict[str, Any]]] = deque()
                number = 0
                while True:
                    chunk = _read_exactly(src, part_size)
                    if not chunk and number > 0:
                        break
                    number += 1
                    digest.update(chunk)
                    total += len(chunk)
                    pending.append(pool.submit(self._upload_part, key, full, upload_id, number, chunk))
                    # Bounds memory to max_concurrency parts in flight.
                    while len(pending) >= self.max_concurrency:
                        parts.append(pending.popleft().result())
                    if len(chunk) < part_size:
                        break
                while pending:
                    parts.append(pending.popleft().result())
            self._call(
                "finish upload of",
                key,
                client.complete_multipart_upload,
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            # An unfinished multipart upload is invisible but billed until aborted.
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            if isinstance(exc, Exception):
                mapped = self._map_error(exc, "upload", key)
                if mapped is not None and mapped is not exc:
                    raise mapped from exc
            raise
        return StoredObject(key=key, size=total, sha256=digest.hexdigest(), content_type=ctype)

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> StoredObject:
        """Upload the file at `path`, as a multipart upload above `multipart_threshold` bytes."""
        self._full(key)
        source = Path(path)
        with source.open("rb") as src:
            return self._put_stream(key, src, os.fstat(src.fileno()).st_size, content_type)

    def put_bytes(self, key: str, data: bytes, *, content_type: str | None = None) -> StoredObject:
        """Upload `data` under `key`."""
        return self._put_stream(key, io.BytesIO(data), len(data), content_type)

    # -- reads ---------------------------------------------------------------------------------------

    def open(self, key: str) -> BinaryIO:
        """A buffered stream over a GET of the object."""
        full = self._full(key)
        response = self._call("read", key, self._client().get_object, Bucket=self.bucket, Key=full)
        raw = _S3Raw(response["Body"], lambda exc: self._map_error(exc, "read", key))
        return io.BufferedReader(raw, buffer_size=CHUNK_SIZE)

    def download_to(self, key: str, path: Path) -> None:
        """Download with parallel ranged GETs for large objects; s3transfer renames a temp file into place."""
        from boto3.s3.transfer import TransferConfig

        full = self._full(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        config = TransferConfig(
            multipart_threshold=max(self.multipart_threshold, 1),
            multipart_chunksize=self.part_size,
            max_concurrency=self.max_concurrency,
        )
        self._call(
            "download",
            key,
            self._client().download_file,
            Bucket=self.bucket,
            Key=full,
            Filename=str(dest),
            Config=config,
        )

    def _head(self, key: str) -> dict[str, Any]:
        full = self._full(key)
        return dict(self._call("stat", key, self._client().head_object, Bucket=self.bucket, Key=full))

    def exists(self, key: str) -> bool:
        """Whether the object exists (a HEAD request)."""
        try:
            self._head(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        """The object's Content-Length."""
        return int(self._head(key)["ContentLength"])

    def _iter_full_keys(self, full_prefix: str, action: str, prefix: str) -> Iterator[str]:
        paginator = self._client().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                for item in page.get("Contents", []):
                    yield item["Key"]
        except Exception as exc:
            mapped = self._map_error(exc, action, prefix)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    def _matching_full_keys(self, stripped: str, action: str) -> builtins.list[str]:
        if not stripped:
            return builtins.list(self._iter_full_keys(f"{self.prefix}/" if self.prefix else "", action, ""))
        full = self._full(stripped)
        # Listing "full/" rather than "full" keeps "jobs/1" from matching "jobs/10/...".
        keys = builtins.list(self._iter_full_keys(full + "/", action, stripped))
        if self.exists(stripped):
            keys.append(full)
        return keys

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Keys equal to `prefix` or under `prefix/`, without the storage prefix, sorted."""
        stripped = _validate_prefix(prefix, allow_empty=True)
        return sorted(self._relative(k) for k in self._matching_full_keys(stripped, "list"))

    def delete_prefix(self, prefix: str) -> int:
        """Delete the object `prefix` and all objects under `prefix/`, and abort unfinished uploads there."""
        stripped = _validate_prefix(prefix, allow_empty=False)
        keys = self._matching_full_keys(stripped, "delete")
        client = self._client()
        for start in range(0, len(keys), _S3_DELETE_BATCH):
            batch = keys[start : start + _S3_DELETE_BATCH]
            response = self._call(
                "delete",
                prefix,
                client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = response.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"could not delete {len(errors)} object(s) under {prefix!r} in {self.describe()}, "
                    f"e.g. {self._relative(first.get('Key', ''))!r}: {first.get('Code')} {first.get('Message')}",
                    retryable=any(
                        e.get("Code") in _RETRYABLE_CODES or e.get("Code") == "InternalError" for e in errors
                    ),
                )
        # Best effort: some S3-compatible stores do not list uploads, and leftovers do not affect reads.
        with contextlib.suppress(StorageError):
            full = self._full(stripped)
            uploads = self._call(
                "list uploads under", prefix, client.list_multipart_uploads, Bucket=self.bucket, Prefix=full
            )
            for upload in uploads.get("Uploads", []):
                if upload["Key"] == full or upload["Key"].startswith(full + "/"):
                    self._call(
                        "abort upload of",
                        prefix,
                        client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
        return len(keys)

    def presigned_url(self, key: str, *, expires_s: int = 3600, filename: str | None = None) -> str | None:
        """A presigned GET; with `filename`, the response asks the browser to save it under that name."""
        if not 1 <= expires_s <= _S3_MAX_PRESIGN_S:
            raise ValueError(f"expires_s {expires_s} must be between 1 and {_S3_MAX_PRESIGN_S} (7 days)")
        params: dict[str, str] = {"Bucket": self.bucket, "Key": self._full(key)}
        if filename:
            params["ResponseContentDisposition"] = _content_disposition(filename)
        client = self._client("public" if self.public_endpoint_url else "main")
        url = self._call(
            "sign", key, client.generate_presigned_url, ClientMethod="get_object", Params=params, ExpiresIn=expires_s
        )
        return str(url)

    def check(self) -> None:
        """HEAD the bucket with short timeouts and no retries."""
        self._call("check", "", self._client("probe").head_bucket, Bucket=self.bucket)

    def describe(self) -> str:
        """s3://bucket/prefix @ endpoint."""
        location = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        return f"{location} @ {self.endpoint_url or f'AWS {self.region}'}"


def storage_from_url(url: str, **s3_options: Any) -> Storage:
    """Build a store from "s3://bucket[/prefix]", "file:///abs/dir" or a plain path; s3_options go to S3Storage."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("storage URL is empty: use s3://bucket[/prefix], file:///absolute/folder or a folder path")
    url = url.strip()
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        if not parts.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket: use s3://bucket[/prefix]")
        if parts.query or parts.fragment:
            raise ValueError(f"storage URL {url!r}: query strings and fragments are not supported")
        return S3Storage(parts.netloc, prefix=unquote(parts.path).strip("/"), **s3_options)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"storage URL {url!r} names a remote host; file URLs must be local (file:///abs/dir)")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise ValueError(f"storage URL {url!r} must hold an absolute path (file:///abs/dir)")
        return LocalStorage(Path(path))
    if "://" in url:
        raise ValueError(f"storage URL {url!r}: unsupported scheme {parts.scheme!r}; use s3:// or file://")
    return LocalStorage(Path(url))
