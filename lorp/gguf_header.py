"""A GGUF file's header and tensor table, checked against the file's size without reading tensor data.

transformers reads a GGUF file through the ``gguf`` package, which turns every metadata value (the
49k-token vocabulary included) into numpy arrays before it looks at a tensor: a truncated file fails
only after seconds. This reads the same layout directly (GGUF v2/v3, little-endian: magic, version,
tensor count, metadata count, the metadata, the tensor infos, then the aligned data section), skips
metadata it does not need, and refuses a file whose tensors would end past its last byte.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorp.errors import ModelLoadError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# Metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array.
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# Sanity bounds that keep a hostile header from making the parser loop or allocate without end.
_MAX_COUNT = 1 << 24
_MAX_DIMS = 8


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # scalars and strings only; arrays are skipped
    tensors: list[GGUFTensor]
    data_start: int


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.take("Q")
        if self.pos + length > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            length = self.take("Q")
            self.pos += length
            if self.pos > len(self.buf):
                raise _Truncated

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, count = self.take("I"), self.take("Q")
            if count > _MAX_COUNT * 4:
                raise ValueError(f"an array of {count} metadata values")
            if inner in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[inner]) * count
                if self.pos > len(self.buf):
                    raise _Truncated
            elif inner == _STRING:
                self.skip_strings(count)
            else:
                for _ in range(count):
                    self.value(inner)
            return None
        raise ValueError(f"unknown metadata value type {kind}")


def _bad(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path.name} is not a valid GGUF file: {why}", field="model.id")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s header and tensor table; raises ModelLoadError naming what is wrong."""
    size = path.stat().st_size
    if size < 24:
        with path.open("rb") as fh:
            head = fh.read(4)
        if head != MAGIC[: len(head)] or not head:
            raise _bad(path, "it does not start with the GGUF magic")
        raise _bad(path, f"{size} bytes, shorter than a GGUF header (truncated)")
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        try:
            if bytes(buf[:4]) != MAGIC:
                raise _bad(path, "it does not start with the GGUF magic")
            cur.pos = 4
            version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
            if version not in (2, 3):
                raise _bad(path, f"GGUF version {version} is not supported (2 or 3)")
            if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
                raise _bad(path, f"its header claims {n_tensors} tensors and {n_kv} metadata entries")
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                value = cur.value(cur.take("I"))
                if value is not None:
                    metadata[key] = value
            tensors = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.take("I")
                if not 1 <= n_dims <= _MAX_DIMS:
                    raise _bad(path, f"tensor {name!r} claims {n_dims} dimensions")
                shape = tuple(cur.take("Q") for _ in range(n_dims))
                tensors.append(GGUFTensor(name, shape, cur.take("I"), cur.take("Q")))
        except _Truncated:
            raise _bad(path, f"its header runs past the end of the file ({size} bytes; truncated)") from None
        except (ValueError, struct.error) as exc:
            raise _bad(path, str(exc)) from None
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise _bad(path, f"general.alignment is {alignment!r}")
        data_start = -(-cur.pos // alignment) * alignment
    return GGUFHeader(version, metadata, tensors, data_start)


def check_gguf(path: Path) -> GGUFHeader:
    """The header, after checking that every tensor's data lies inside the file."""
    header = read_gguf_header(path)
    size = path.stat().st_size
    try:
        from gguf import GGML_QUANT_SIZES
    except ImportError:  # pragma: no cover - transformers needs gguf to load the file anyway
        return header
    for tensor in header.tensors:
        block = GGML_QUANT_SIZES.get(tensor.ggml_type)  # type: ignore[call-overload]
        if block is None:
            raise _bad(path, f"tensor {tensor.name!r} has unknown GGML type {tensor.ggml_type}")
        block_size, type_size = block
        count = math.prod(tensor.shape)
        if count % block_size:
            raise _bad(path, f"tensor {tensor.name!r}: shape {list(tensor.shape)} is not whole blocks of {block_size}")
        end = header.data_start + tensor.offset + count // block_size * type_size
        if end > size:
            raise _bad(
                path,
                f"tensor {tensor.name!r} ends at byte {end} but the file holds {size} (truncated, "
                "or its header lies about the shape)",
            )
    return header


def block_count(header: GGUFHeader) -> int | None:
    """The decoder block count the metadata claims (``<architecture>.block_count``), if any."""
    arch = header.metadata.get("general.architecture")
    value = header.metadata.get(f"{arch}.block_count") if isinstance(arch, str) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
