"""A sequential pass's states on disk: what lets a long pass hold one block, not all states, and resume.

A sequential capture runs each block over every window before the next one (block-major), so the state
entering block j is complete, for every token, once block j-1 has run. :class:`StateStore` writes it
then, as one file per state (the real tokens' rows, ``[tokens, d]`` in window order, at the dtype the
model computes them in when that is 16-bit, else float32: lossless, and half the disk for a bf16 run),
and says in a small manifest how many states are complete. Two things follow:

- S and D are summed from the files a batch at a time (that batch's rows of every state), so the host
  holds one batch's states, not every token's N + 1 states;
- a pass that was interrupted (a killed worker) finds the files of its earlier attempt and resumes at
  the first block whose input is complete, when the manifest's key (the model, the windows, the dtype)
  is this pass's; any other store in the folder is cleared.

Files are read with plain reads into memory of their own, never memory-mapped: the pages stay in the
kernel's page cache, not in the process.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from lorp.atomic import PARTIAL_PREFIX, replacing, write_atomically

_MANIFEST = "manifest.json"
# How each stored dtype's bytes are written and read (numpy has no bfloat16: its bits go as int16).
_BITS = {torch.float32: torch.float32, torch.bfloat16: torch.int16, torch.float16: torch.float16}


class StateStore:
    """States ``0..num_states-1`` of ``num_tokens`` real tokens of width ``width``, one file each.

    Args:
        directory: the store's folder (created; cleared when it holds another pass's store).
        key: what makes two passes the same (model, windows, dtype): a store with another key is cleared.
        num_tokens, width, num_states: the shape every state file has.
        dtype: what a state is stored as (float32, bfloat16 or float16); reads hand out float32.
    """

    def __init__(
        self,
        directory: Path,
        key: str,
        *,
        num_tokens: int,
        width: int,
        num_states: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in _BITS:
            raise ValueError(f"a state store keeps float32, bfloat16 or float16, not {dtype}")
        self.directory = Path(directory)
        self.key = key
        self.dtype = dtype
        self.shape = {"tokens": int(num_tokens), "width": int(width), "states": int(num_states)}
        self._stored = str(dtype).removeprefix("torch.")
        self.resumed_from = 0
        found = self._manifest()
        mine = {"key": key, "shape": self.shape, "dtype": self._stored}
        if found is not None and all(found.get(name) == value for name, value in mine.items()):
            self.done = int(found.get("done", 0))
            self.resumed_from = self.done
            for stale in self.directory.glob(f"{PARTIAL_PREFIX}*"):
                stale.unlink(missing_ok=True)  # what a killed attempt was writing
        else:
            if self.directory.exists():
                shutil.rmtree(self.directory)
            self.done = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_manifest()

    def _manifest(self) -> dict | None:
        try:
            return dict(json.loads((self.directory / _MANIFEST).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _write_manifest(self) -> None:
        manifest = {"key": self.key, "shape": self.shape, "dtype": self._stored, "done": self.done}
        write_atomically(self.directory / _MANIFEST, json.dumps(manifest), durable=True)

    def _path(self, index: int) -> Path:
        return self.directory / f"state_{index:05d}.bin"

    @property
    def row_bytes(self) -> int:
        return self.shape["width"] * self.dtype.itemsize

    def write(self, index: int, rows: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Store state ``index`` (``[tokens, d]``, every real token in window order, or its parts in that
        order: written one after the other, never joined in memory) and count it done; states are
        written in order, each after the one before it."""
        if index != self.done:
            raise ValueError(f"state {index} written out of order (the store holds {self.done})")
        parts = [rows] if isinstance(rows, torch.Tensor) else list(rows)
        expected = (self.shape["tokens"], self.shape["width"])
        got = (sum(int(part.shape[0]) for part in parts), *{int(part.shape[-1]) for part in parts})
        if got != expected or any(part.dim() != 2 for part in parts):
            raise ValueError(f"state {index} has shape {got}, the store holds {expected}")
        with replacing(self._path(index), durable=True) as fh:
            for part in parts:
                fh.write(part.detach().to("cpu", self.dtype).contiguous().view(_BITS[self.dtype]).numpy().data)
        self.done = index + 1
        self._write_manifest()

    def read(self, index: int, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """Rows ``begin..end-1`` of state ``index`` (``[rows, d]`` float32), read into memory of their own."""
        if index >= self.done:
            raise ValueError(f"state {index} is not stored (the store holds {self.done})")
        end = self.shape["tokens"] if end is None else end
        out = torch.empty((end - begin, self.shape["width"]), dtype=_BITS[self.dtype])
        view = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
        with self._path(index).open("rb", buffering=0) as fh:
            fh.seek(begin * self.row_bytes)
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise OSError(f"state file {self._path(index).name} is cut short")
                got += n
        return out.view(self.dtype).float() if self.dtype != torch.float32 else out

    def remove(self) -> None:
        """Delete the store (its pass finished, or the job no longer needs it)."""
        shutil.rmtree(self.directory, ignore_errors=True)
