"""Objects as files under a root folder: atomic writes, and no path leaves the root."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import BinaryIO

from app.storage.base import CHUNK_SIZE, ObjectNotFound, Storage, StorageError, StoredObject, guess_content_type
from app.storage.keys import TMP_MARK, validate_key, validate_prefix
from lorp.atomic import replacing


def write_atomically(src: BinaryIO, target: Path) -> tuple[int, str]:
    """Copy `src` into `target` whole or not at all (a temp file in the same folder, flushed to the disk,
    renamed over it); returns (size, sha256)."""
    digest = hashlib.sha256()
    size = 0
    # 0644 whatever the umask: the API and the worker may run as different users over a shared folder.
    with replacing(target, durable=True, mode=0o644) as out:
        while chunk := src.read(CHUNK_SIZE):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


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
        if any(segment.startswith(TMP_MARK) for segment in key.split("/")):
            raise ValueError(f"invalid storage key {key!r}: segments starting with {TMP_MARK!r} are reserved")
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
            size, sha = write_atomically(src, target)
        except IsADirectoryError as exc:
            raise StorageError(f"cannot write {key!r}: a folder of objects already has that name") from exc
        except OSError as exc:
            raise self._os_error(exc, "write", key) from exc
        return StoredObject(key=key, size=size, sha256=sha, content_type=content_type or guess_content_type(key))

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
            write_atomically(src, dest)

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
            1 for _, _, names in os.walk(base, followlinks=False) for name in names if not name.startswith(TMP_MARK)
        )

    def delete_prefix(self, prefix: str) -> int:
        """Delete the file named `prefix` or the folder `prefix/` with everything in it."""
        stripped = validate_prefix(prefix, allow_empty=False)
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
        stripped = validate_prefix(prefix, allow_empty=True)
        base = self._path(stripped) if stripped else self.root
        if base.is_file():
            return [stripped]
        keys: builtins.list[str] = []
        for dirpath, _, names in os.walk(base, followlinks=False):
            for name in names:
                if not name.startswith(TMP_MARK):
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
