"""A model folder's safetensors files, read one tensor at a time and written as a stream.

The safetensors format is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte span in the data section), then the raw bytes. Reading a tensor here is a seek and one
read of its span into a buffer of its own size, with no memory map: a process that walks a checkpoint
holds about one tensor at a time, and nothing of the files stays mapped afterwards (a mapped page that
was touched counts in the resident memory until it is unmapped). Writing goes the other way: the header
is written first from the tensors' shapes and dtypes, then each tensor's bytes as the caller produces
it, so a shard of any size is written holding one tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from lorp.atomic import replacing, write_atomically
from lorp.errors import ModelLoadError
from lorp.quantization import mxfp4_half, mxfp4_halves

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# The safetensors dtype names and their torch dtypes (sub-byte formats are not stored by HF checkpoints).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A header is JSON text describing tensors; 100 MB of it describes millions of tensors.
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return _NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lies: its file, dtype, shape and byte span in the data section."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    data_start: int  # the data section's offset in the file: 8 + the header's length

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _corrupt(path: Path, why: str) -> ModelLoadError:
    return ModelLoadError(f"{path.name} is not a valid safetensors file: {why}", field="model.id")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of one safetensors file, checked against the file's size without reading data.

    Catches truncated files and headers that lie about shapes (a shape whose byte size differs from
    the tensor's data span), with the file and tensor named.

    Raises:
        ModelLoadError: (field ``model.id``) the file is not a valid safetensors file.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise _corrupt(path, f"{size} bytes, shorter than the 8-byte header length (truncated)")
        length = int.from_bytes(raw, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise _corrupt(path, f"its header claims {length} bytes but the file holds {size} (truncated)")
        try:
            header = json.loads(fh.read(length))
        except (UnicodeDecodeError, ValueError):
            raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_size = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            itemsize = DTYPES[dtype].itemsize
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor {name!r} has a malformed entry in the header") from None
        needed = math.prod(shape) * itemsize
        if end - begin != needed:
            raise _corrupt(
                path,
                f"tensor {name!r}: the header's shape {list(shape)} ({dtype}) needs {needed} bytes "
                f"but its data span {end - begin}",
            )
        if end > data_size:
            raise _corrupt(
                path, f"tensor {name!r} ends at byte {end} of the data but the file holds {data_size} (truncated)"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, begin, end, 8 + length)
    return tensors


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model folder: those its index names, or every ``*.safetensors`` file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (KeyError, TypeError, ValueError, UnicodeDecodeError):
            raise ModelLoadError(f"{INDEX_FILE} is not a valid index (no weight_map)", field="model.id") from None
        if any(Path(name).name != name for name in names):
            raise ModelLoadError(f"{INDEX_FILE} names a file outside the model folder", field="model.id")
        return [directory / name for name in names]
    return sorted(directory.glob("*.safetensors"))


class Checkpoint:
    """The tensors of a model folder's safetensors files, listed from their headers and read lazily.

    Args:
        directory: the model folder (one ``model.safetensors``, or shards with their index).

    Raises:
        ModelLoadError: a file is not valid safetensors, or two files hold the same tensor.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensors: dict[str, TensorInfo] = {}
        for path in weight_files(directory):
            for name, info in read_header(path).items():
                if name in self.tensors:
                    raise ModelLoadError(
                        f"tensor {name!r} is in both {self.tensors[name].file.name} and {path.name}", field="model.id"
                    )
                self.tensors[name] = info
        if not self.tensors:
            raise ModelLoadError(f"{directory.name} holds no safetensors weights", field="model.id")

    @property
    def nbytes(self) -> int:
        """The bytes of every tensor together (what the weights take in memory, at their stored dtype)."""
        return sum(info.nbytes for info in self.tensors.values())

    def nbytes_as(self, dtype: torch.dtype) -> int:
        """The bytes the weights take when their floating-point tensors are cast to ``dtype``, and MXFP4
        weights (``<name>_blocks`` of packed 4-bit values beside ``<name>_scales``: gpt-oss's experts)
        dequantized to it, as the engine runs them (``lorp.pretrained.load_options``)."""
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for name, info in self.tensors.items():
            half = mxfp4_half(name)
            if DTYPES[info.dtype].is_floating_point:
                total += math.prod(info.shape) * size
            elif half is not None and all(part in self.tensors for part in mxfp4_halves(half[0])):
                if half[1] == "blocks":  # two values a byte; their scales go with them
                    total += 2 * math.prod(info.shape) * size
            else:
                total += info.nbytes
        return total

    def read(self, name: str, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, read from its file into memory of its own (no memory map), then moved to ``device``."""
        info = self.tensors[name]
        buffer = bytearray(info.nbytes)
        read_span(info, 0, memoryview(buffer))
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            tensor = torch.empty(info.shape, dtype=dtype)
        else:
            tensor = torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)
        return tensor if torch.device(device).type == "cpu" else tensor.to(device)


_COPY_BYTES = 16 << 20  # a stored tensor copied verbatim goes through memory this much at a time


def _stored_parts(info: TensorInfo, buffer: memoryview) -> Iterator[memoryview]:
    """The stored bytes of ``info`` read into ``buffer``, a buffer's length at a time (each part is
    valid until the next is read); a file that ends early is named as truncated."""
    for begin in range(0, info.nbytes, len(buffer)):
        part = buffer[: min(info.nbytes - begin, len(buffer))]
        read_span(info, begin, part)
        yield part


def read_span(info: TensorInfo, begin: int, buffer: memoryview) -> None:
    """Read the stored tensor ``info``'s bytes from ``begin`` on into ``buffer``, filling it (several
    threads may read one file at once: each opens its own handle)."""
    if begin < 0 or begin + len(buffer) > info.nbytes:
        raise ValueError(f"bytes {begin}..{begin + len(buffer)} are outside tensor {info.name!r}")
    with info.file.open("rb", buffering=0) as src:
        src.seek(info.data_start + info.begin + begin)
        done = 0
        while done < len(buffer):
            got = src.readinto(buffer[done:])
            if not got:
                raise _corrupt(info.file, f"tensor {info.name!r} is cut short (truncated)")
            done += got


def copy_stored(info: TensorInfo, fh: IO[bytes]) -> None:
    """Write the bytes of the stored tensor ``info`` to ``fh`` a part at a time (never the whole tensor
    in memory: a copied embedding table is 1 GB in a bf16 8B model)."""
    for part in _stored_parts(info, memoryview(bytearray(min(info.nbytes, _COPY_BYTES)))):
        fh.write(part)


@dataclass(frozen=True)
class Planned:
    """A tensor to be written: its name, dtype and shape, known before its values are."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _ordered(planned: Iterable[Planned]) -> list[Planned]:
    # The order safetensors' own writer uses: widest dtype first, then by name; each tensor's data
    # then starts at a multiple of its item size.
    return sorted(planned, key=lambda p: (-DTYPES[p.dtype].itemsize, p.name))


def write_file(
    path: Path,
    planned: Iterable[Planned],
    produce: Callable[[Planned], torch.Tensor | TensorInfo],
    *,
    metadata: Mapping[str, str] | None = None,
) -> list[Planned]:
    """Write one safetensors file holding ``planned``, asking ``produce`` for each tensor in turn: the
    tensor, or a stored tensor (its :class:`TensorInfo`) to copy as it is, a part at a time.

    The header is written first (so every shape and dtype must be known up front); each produced
    tensor must match its plan and is dropped once its bytes are written. Written to a temporary name
    and renamed into place, so a failure never leaves a partial file under ``path``.

    Returns:
        The tensors in the order they were written.
    """
    order = _ordered(planned)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for p in order:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with replacing(path, durable=True) as fh:
        fh.write(len(text).to_bytes(8, "little"))
        fh.write(text)
        for p in order:
            _write_tensor(fh, p, produce(p))
    return order


def _write_tensor(fh: IO[bytes], planned: Planned, tensor: torch.Tensor | TensorInfo) -> None:
    shape = tuple(tensor.shape)
    dtype = tensor.dtype if isinstance(tensor, TensorInfo) else dtype_name(tensor.dtype)
    if shape != planned.shape or dtype != planned.dtype:
        raise ValueError(
            f"tensor {planned.name!r} came out as {list(shape)} {dtype}, planned {list(planned.shape)} {planned.dtype}"
        )
    if isinstance(tensor, TensorInfo):
        copy_stored(tensor, fh)
    elif planned.nbytes:
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        fh.write(data.data)


def plan_shards(planned: Sequence[Planned], max_bytes: int) -> list[list[Planned]]:
    """Group tensors, in order, into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[Planned]] = []
    size = 0
    for p in planned:
        if not shards or (size + p.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """The file names transformers gives a checkpoint of ``count`` shards."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(directory: Path, written: Mapping[str, Sequence[Planned]]) -> None:
    """``model.safetensors.index.json`` for shards written into ``directory`` (file name -> its tensors)."""
    weight_map = {p.name: file for file, tensors in written.items() for p in tensors}
    total = sum(p.nbytes for tensors in written.values() for p in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_atomically(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n", durable=True)
