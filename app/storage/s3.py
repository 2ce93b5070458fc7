"""An S3-compatible object store (AWS, MinIO, moto): streamed and multipart uploads, presigned links,
retries of transient errors. boto3 is imported only when a store is created."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import re
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from app.storage.base import CHUNK_SIZE, ObjectNotFound, Storage, StorageError, StoredObject, guess_content_type
from app.storage.keys import MAX_KEY_LENGTH, key_problem, validate_key, validate_prefix

_MIB = 1 << 20
_S3_MIN_PART = 5 * _MIB
_S3_MAX_PART = 5 << 30
_S3_MAX_PARTS = 10_000
_S3_MAX_PRESIGN_S = 7 * 24 * 3600
_S3_DELETE_BATCH = 1000
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_RETRYABLE_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling"}
)
_AUTH_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "AllAccessDisabled"}
)


def read_exactly(src: BinaryIO, n: int) -> bytes:
    # A raw or socket-backed stream may return short reads; a multipart part must be full-sized.
    buf = bytearray()
    while len(buf) < n:
        chunk = src.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def content_disposition(filename: str) -> str:
    # Only the last path component, without quotes or control characters: the header must not be
    # injectable and the browser must not be told to write outside its download folder.
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C" and c not in '"')
    name = name.strip() or "download"
    ascii_name = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


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
            problem = key_problem(stripped)
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
        ctype = content_type or guess_content_type(key)
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
                    chunk = read_exactly(src, part_size)
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
        stripped = validate_prefix(prefix, allow_empty=True)
        return sorted(self._relative(k) for k in self._matching_full_keys(stripped, "list"))

    def delete_prefix(self, prefix: str) -> int:
        """Delete the object `prefix` and all objects under `prefix/`, and abort unfinished uploads there."""
        stripped = validate_prefix(prefix, allow_empty=False)
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
            params["ResponseContentDisposition"] = content_disposition(filename)
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
