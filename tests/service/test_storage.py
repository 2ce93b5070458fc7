"""Object storage: the same behaviour from the local folder and from S3 over HTTP (moto on loopback)."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    storage_from_url,
    validate_key,
)

from .moto_server import ACCESS_KEY, REGION, SECRET_KEY, create_bucket, s3_server

__all__ = ["s3_server"]  # re-exported fixture: importing it is what makes pytest see it here

MIB = 1 << 20
BAD_KEYS = [
    "",
    "/etc/passwd",
    "../x",
    "a/../../b",
    "a/./b",
    "a\\b",
    "a\x00b",
    "a\nb",
    "a//b",
    "a/",
    "x" * 1025,
]


def _s3(endpoint: str, bucket: str, **kwargs: Any) -> S3Storage:
    return S3Storage(
        bucket,
        endpoint_url=endpoint,
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        **kwargs,
    )


def _raw_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )


def _urlopen(url: str) -> tuple[bytes, dict[str, str]]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return response.read(), dict(response.headers)


@pytest.fixture
def bucket(s3_server: str) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_server, name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
    else:
        endpoint = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("bucket")
        yield _s3(endpoint, bucket, prefix="svc/root", multipart_threshold=5 * MIB, part_size=5 * MIB)


def test_put_bytes_round_trip(store: Storage, tmp_path: Path) -> None:
    data = b"hello storage\n" * 1000
    obj = store.put_bytes("jobs/1/report.json", data)
    assert obj.key == "jobs/1/report.json"
    assert obj.size == len(data)
    assert obj.sha256 == hashlib.sha256(data).hexdigest()
    assert obj.content_type == "application/json"
    with store.open("jobs/1/report.json") as f:
        assert f.read() == data
    assert b"".join(store.iter_chunks("jobs/1/report.json", chunk_size=1000)) == data
    store.download_to("jobs/1/report.json", tmp_path / "out" / "r.json")
    assert (tmp_path / "out" / "r.json").read_bytes() == data
    assert store.put_bytes("x.bin", b"", content_type="application/x-test").content_type == "application/x-test"
    assert store.size("x.bin") == 0


def test_open_supports_line_reads(store: Storage) -> None:
    store.put_bytes("datasets/d.jsonl", b'{"text": "a"}\n{"text": "b"}\n')
    with store.open("datasets/d.jsonl") as f:
        assert [line for line in f] == [b'{"text": "a"}\n', b'{"text": "b"}\n']


def test_put_file_large_uses_multipart_and_round_trips(store: Storage, tmp_path: Path) -> None:
    data = os.urandom(11 * MIB + 12345)
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    obj = store.put_file("jobs/7/model.safetensors", src)
    assert (obj.size, obj.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert obj.content_type == "application/octet-stream"
    if isinstance(store, S3Storage):
        head = _raw_client(store.endpoint_url or "").head_object(
            Bucket=store.bucket, Key="svc/root/jobs/7/model.safetensors"
        )
        assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1.01 MiB parts
    out = tmp_path / "back.safetensors"
    store.download_to("jobs/7/model.safetensors", out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == obj.sha256
    with store.open("jobs/7/model.safetensors") as f:
        assert hashlib.sha256(f.read()).hexdigest() == obj.sha256


def test_exists_size_list_delete_prefix(store: Storage) -> None:
    for key in ["jobs/1/a.txt", "jobs/1/sub/b.txt", "jobs/10/c.txt", "jobs/1x", "other.txt"]:
        store.put_bytes(key, key.encode())
    assert store.exists("jobs/1/a.txt")
    assert not store.exists("jobs/1/nope.txt")
    assert not store.exists("jobs/1")  # a folder is not an object
    assert store.size("jobs/1/sub/b.txt") == len(b"jobs/1/sub/b.txt")
    assert store.list("jobs/1") == ["jobs/1/a.txt", "jobs/1/sub/b.txt"]
    assert store.list("jobs/1/") == ["jobs/1/a.txt", "jobs/1/sub/b.txt"]
    assert store.list("jobs/1/a.txt") == ["jobs/1/a.txt"]
    assert store.list("") == sorted(["jobs/1/a.txt", "jobs/1/sub/b.txt", "jobs/10/c.txt", "jobs/1x", "other.txt"])
    assert store.list("missing") == []
    # "jobs/1" must not take "jobs/10" or "jobs/1x" with it
    assert store.delete_prefix("jobs/1") == 2
    assert store.list("jobs") == ["jobs/10/c.txt", "jobs/1x"]
    assert store.delete_prefix("jobs/1x") == 1
    assert store.delete_prefix("jobs/1") == 0
    assert store.list("") == ["jobs/10/c.txt", "other.txt"]
    with pytest.raises(ValueError, match="whole store"):
        store.delete_prefix("")


def test_overwrite_replaces_content(store: Storage) -> None:
    store.put_bytes("k", b"first")
    store.put_bytes("k", b"second")
    assert store.open("k").read() == b"second"
    assert store.list("") == ["k"]


def test_missing_keys_raise_object_not_found(store: Storage, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound) as info:
        store.open("nope/missing.bin")
    assert info.value.key == "nope/missing.bin" and not info.value.retryable
    with pytest.raises(ObjectNotFound):
        store.size("nope/missing.bin")
    with pytest.raises(ObjectNotFound):
        store.download_to("nope/missing.bin", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        store.iter_chunks("nope/missing.bin")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
def test_bad_keys_are_rejected(store: Storage, key: str, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, src),
        lambda: store.open(key),
        lambda: store.exists(key),
        lambda: store.size(key),
        lambda: store.download_to(key, tmp_path / "out"),
        lambda: store.presigned_url(key),
    ]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert repr(key)[:10] in str(info.value)
    if key not in ("", "a/"):  # a trailing slash is a valid folder prefix
        with pytest.raises(ValueError):
            store.delete_prefix(key)
        with pytest.raises(ValueError):
            store.list(key)


def test_validate_key_accepts_ordinary_keys() -> None:
    for key in ["a", "jobs/123/model/model-00001-of-00002.safetensors", ".hidden/x", "ü/ñ", "a..b/c", "x" * 1024]:
        assert validate_key(key) == key


def test_local_refuses_symlink_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"top secret")
    store = LocalStorage(tmp_path / "root")
    (store.root / "link").symlink_to(outside, target_is_directory=True)
    (store.root / "file-link").symlink_to(outside / "secret")
    for call in [
        lambda: store.open("link/secret"),
        lambda: store.open("file-link"),
        lambda: store.put_bytes("link/new", b"x"),
        lambda: store.put_bytes("link/deeper/new", b"x"),
        lambda: store.exists("link/secret"),
        lambda: store.delete_prefix("link"),
        lambda: store.list("link"),
    ]:
        with pytest.raises(StorageError, match="outside the storage folder"):
            call()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"top secret"
    # A symlink that stays inside the root is fine.
    store.put_bytes("real/obj", b"inside")
    (store.root / "alias").symlink_to(store.root / "real", target_is_directory=True)
    assert store.open("alias/obj").read() == b"inside"


def test_local_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStorage(tmp_path / "root")
    store.put_bytes("d/k", b"old")

    def fail_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(StorageError, match="No space left"):
        store.put_bytes("d/k", b"new content")
    monkeypatch.undo()
    assert store.open("d/k").read() == b"old"
    assert sorted(p.name for p in (store.root / "d").iterdir()) == ["k"]  # no temp file left behind
    assert (store.root / "d" / "k").stat().st_mode & 0o777 == 0o644


def test_local_check_and_describe(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    store.check()
    assert store.describe() == (tmp_path / "root").resolve().as_uri()
    assert store.presigned_url("a/b") is None
    (tmp_path / "root").rmdir()
    with pytest.raises(StorageError, match="missing"):
        store.check()


def test_s3_presigned_url_is_fetchable(s3_server: str, bucket: str) -> None:
    store = _s3(s3_server, bucket, prefix="p")
    data = os.urandom(4096)
    store.put_bytes("jobs/1/model.safetensors", data)
    body, _ = _urlopen(store.presigned_url("jobs/1/model.safetensors", expires_s=60) or "")
    assert body == data
    url = store.presigned_url("jobs/1/model.safetensors", filename='../evil"name.safetensors')
    assert url and url.startswith(s3_server)
    body, headers = _urlopen(url)
    assert body == data
    disposition = {k.lower(): v for k, v in headers.items()}["content-disposition"]
    assert disposition.startswith('attachment; filename="evilname.safetensors"')
    with pytest.raises(ValueError):
        store.presigned_url("jobs/1/model.safetensors", expires_s=0)


def test_s3_keys_live_under_prefix_and_prefixes_are_isolated(s3_server: str, bucket: str) -> None:
    a = _s3(s3_server, bucket, prefix="tenant-a/")
    b = _s3(s3_server, bucket, prefix="tenant-b")
    a.put_bytes("k.txt", b"a")
    b.put_bytes("k.txt", b"b")
    keys = [o["Key"] for o in _raw_client(s3_server).list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["tenant-a/k.txt", "tenant-b/k.txt"]
    assert a.list("") == ["k.txt"]
    assert a.delete_prefix("k.txt") == 1
    assert b.open("k.txt").read() == b"b"
    assert a.describe() == f"s3://{bucket}/tenant-a @ {s3_server}"


def test_s3_failed_multipart_is_aborted(
    s3_server: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _s3(s3_server, bucket, multipart_threshold=5 * MIB, part_size=5 * MIB, max_concurrency=1)
    src = tmp_path / "big"
    src.write_bytes(os.urandom(11 * MIB))
    client = store._client()
    real_upload_part = client.upload_part
    calls = []

    def flaky_upload_part(**kwargs: object) -> object:
        calls.append(kwargs["PartNumber"])
        if kwargs["PartNumber"] == 2:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "nope"}}, "UploadPart")
        return real_upload_part(**kwargs)

    monkeypatch.setattr(client, "upload_part", flaky_upload_part)
    with pytest.raises(StorageError, match="refused") as info:
        store.put_file("big", src)
    assert not info.value.retryable
    assert 2 in calls
    assert not store.exists("big")
    assert _raw_client(s3_server).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_delete_prefix_aborts_half_written_uploads(s3_server: str, bucket: str) -> None:
    store = _s3(s3_server, bucket, prefix="p")
    raw = _raw_client(s3_server)
    raw.create_multipart_upload(Bucket=bucket, Key="p/jobs/3/model.safetensors")
    raw.create_multipart_upload(Bucket=bucket, Key="p/jobs/30/model.safetensors")
    store.put_bytes("jobs/3/config.json", b"{}")
    assert store.delete_prefix("jobs/3") == 1
    left = [u["Key"] for u in raw.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert left == ["p/jobs/30/model.safetensors"]


def test_s3_check(s3_server: str, bucket: str) -> None:
    _s3(s3_server, bucket).check()
    with pytest.raises(StorageError, match="does not exist") as info:
        _s3(s3_server, "no-such-bucket-here").check()
    assert not info.value.retryable


def test_s3_check_on_closed_port_is_quick_and_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = _s3(f"http://127.0.0.1:{port}", "some-bucket", connect_timeout=1, read_timeout=1)
    started = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach") as info:
        store.check()
    assert info.value.retryable
    assert time.monotonic() - started < 5
    with pytest.raises(StorageError) as info:
        _s3(f"http://127.0.0.1:{port}", "some-bucket", connect_timeout=1, max_attempts=1).put_bytes("k", b"x")
    assert info.value.retryable


def test_s3_error_mapping() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    store = S3Storage("some-bucket", endpoint_url="http://127.0.0.1:1", access_key="a", secret_key="b")

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")

    cases = {
        "NoSuchKey": (client_error("NoSuchKey", 404), ObjectNotFound, False),
        "head 404": (client_error("404", 404), ObjectNotFound, False),
        "403": (client_error("AccessDenied", 403), StorageError, False),
        "503": (client_error("SlowDown", 503), StorageError, True),
        "500": (client_error("InternalError", 500), StorageError, True),
        "400": (client_error("InvalidArgument", 400), StorageError, False),
        "connect": (EndpointConnectionError(endpoint_url="http://x"), StorageError, True),
        "timeout": (ReadTimeoutError(endpoint_url="http://x"), StorageError, True),
    }
    for name, (exc, cls, retryable) in cases.items():
        mapped = store._map_error(exc, "read", "k")
        assert type(mapped) is cls, name
        assert mapped is not None and mapped.retryable is retryable, name
    assert store._map_error(KeyError("x"), "read", "k") is None


def test_s3_constructor_validation() -> None:
    with pytest.raises(ValueError, match="bucket"):
        S3Storage("Bad_Bucket")
    with pytest.raises(ValueError, match="part_size"):
        S3Storage("good-bucket", part_size=1 * MIB)
    with pytest.raises(ValueError, match="prefix"):
        S3Storage("good-bucket", prefix="a/../b")
    with pytest.raises(ValueError, match="access_key"):
        S3Storage("good-bucket", access_key="only-one")


def test_storage_from_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = storage_from_url((tmp_path / "a b").as_uri())
    assert isinstance(local, LocalStorage) and local.root == (tmp_path / "a b").resolve()
    plain = storage_from_url(str(tmp_path / "plain"))
    assert isinstance(plain, LocalStorage) and plain.root == (tmp_path / "plain").resolve()
    monkeypatch.chdir(tmp_path)
    relative = storage_from_url("rel/dir")
    assert isinstance(relative, LocalStorage) and relative.root == (tmp_path / "rel" / "dir").resolve()

    s3 = storage_from_url(
        "s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:9000", access_key="a", secret_key="b"
    )
    assert isinstance(s3, S3Storage)
    assert (s3.bucket, s3.prefix, s3.endpoint_url) == ("my-bucket", "some/prefix", "http://127.0.0.1:9000")
    assert s3.describe() == "s3://my-bucket/some/prefix @ http://127.0.0.1:9000"
    bare = storage_from_url("s3://my-bucket", part_size=8 * MIB)
    assert isinstance(bare, S3Storage) and bare.prefix == "" and bare.part_size == 8 * MIB

    for bad in ["", "s3://", "s3:///prefix", "s3://Bad_Bucket/x", "s3://b/a/../c", "http://host/x", "file:rel/x"]:
        with pytest.raises(ValueError):
            storage_from_url(bad)
    with pytest.raises(ValueError, match="remote host"):
        storage_from_url("file://otherhost/abs")


def test_app_storage_does_not_import_boto3_eagerly(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys; import app.storage as s; s.LocalStorage(sys.argv[1]).put_bytes('k', b'x'); "
        "assert 'boto3' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], check=True, cwd=root)
