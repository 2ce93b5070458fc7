"""Weights read from the shards into reused page-locked host memory and copied to a GPU, the next
block read while this one runs.

A sequential job on a GPU loads a block from disk for every pass that runs it (226 loads of 0.44 GB
for an 8B model's whole job). Read the plain way (:meth:`lorp.shards.Checkpoint.read`: fresh host
memory per tensor, then a copy to the device from pageable memory), a load is three slow steps in a
row: the fresh buffer's pages are faulted in, the file is read by one thread, and the copy to the
device goes through the driver's own bounce buffer. Measured on an H200 with the page cache warm,
those took 76 s, 35 s and 32 s of the job's 292 (docs/benchmarks.md, "On a GPU").

:class:`Stager` does it the way GPU loaders do instead: two page-locked buffers of one block's bytes,
allocated once; the tensors' byte spans read into one by several threads at once (a read releases the
interpreter lock); each tensor copied from it to its own device memory without blocking; and, while
the block runs, the next block read into the other buffer on a background thread
(:meth:`Stager.prefetch`). A request larger than a buffer (a large vocabulary's head) goes through the
buffers a buffer's worth at a time. A buffer is refilled only once the copies out of it are done
(a CUDA event per buffer).

On a CPU there is nothing to copy to: :class:`lorp.execution.onload.Onloader` reads tensors straight
into their own memory there, and uses a stager for CUDA devices only. The stager also runs with
``device="cpu"`` (plain buffers, copies that finish at once), which is how the tests pin what it
reads against the plain reader.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from lorp.shards import DTYPES, TensorInfo, read_span

_READ_BYTES = 32 << 20  # one reader thread's share of a buffer, at most
_READERS = 8  # threads reading a buffer's spans at once


@dataclass(frozen=True)
class _Piece:
    """Bytes ``begin .. end`` of the stored tensor ``info``, at ``offset`` in a buffer."""

    info: TensorInfo
    begin: int
    end: int
    offset: int


def _fills(infos: Sequence[TensorInfo], capacity: int) -> list[list[_Piece]]:
    """The tensors' bytes as buffer fills, in order: each fill at most ``capacity`` bytes, a tensor
    split between fills only when it does not fit a fill of its own."""
    fills: list[list[_Piece]] = [[]]
    used = 0
    for info in infos:
        begin = 0
        if used and used + info.nbytes > capacity:
            fills.append([])
            used = 0
        while begin < info.nbytes or (info.nbytes == 0 and begin == 0):
            if used == capacity:
                fills.append([])
                used = 0
            end = min(info.nbytes, begin + capacity - used)
            fills[-1].append(_Piece(info, begin, end, used))
            used += end - begin
            if info.nbytes == 0:
                break
            begin = end
    return fills


def _read_tasks(pieces: Sequence[_Piece]) -> list[tuple[TensorInfo, int, int, int]]:
    """The pieces split into reads of at most ``_READ_BYTES`` (info, begin, end, buffer offset)."""
    tasks = []
    for piece in pieces:
        for begin in range(piece.begin, piece.end, _READ_BYTES):
            end = min(piece.end, begin + _READ_BYTES)
            tasks.append((piece.info, begin, end, piece.offset + begin - piece.begin))
    return tasks


class Stager:
    """Loads stored tensors onto ``device`` through two reused host buffers of ``capacity`` bytes
    (page-locked when ``device`` is a GPU); see the module's docstring.

    Args:
        device: where the tensors go.
        capacity: each buffer's bytes (a block's stored bytes: one fill per block).
    """

    def __init__(self, device: torch.device | str, capacity: int) -> None:
        self.device = torch.device(device)
        self.capacity = max(1, int(capacity))
        self._cuda = self.device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._views: list[memoryview | None] = [None, None]
        self._copied: list[Any] = [None, None]  # per buffer, a CUDA event: the copies out of it are done
        self._next = 0  # the buffer the next fill goes into
        self._readers = ThreadPoolExecutor(_READERS, thread_name_prefix="lorp-read")
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="lorp-prefetch")
        self._pending: tuple[tuple[str, ...], int, Future[None]] | None = None
        self.prefetched = 0  # requests served from a prefetch
        self.bytes_read = 0

    def _buffer(self, index: int) -> memoryview:
        view = self._views[index]
        if view is None:
            buffer = torch.empty(self.capacity, dtype=torch.uint8, pin_memory=self._cuda)
            self._buffers[index] = buffer
            self._views[index] = view = buffer.numpy().data.cast("B")
        return view

    def _wait_copied(self, index: int) -> None:
        event = self._copied[index]
        if event is not None:
            event.synchronize()
            self._copied[index] = None

    def _fill(self, index: int, pieces: Sequence[_Piece]) -> None:
        """Read ``pieces`` into buffer ``index`` (several threads at once)."""
        view = self._buffer(index)
        tasks = _read_tasks(pieces)
        reads = [
            self._readers.submit(read_span, info, begin, view[at : at + end - begin]) for info, begin, end, at in tasks
        ]
        for future in reads:
            future.result()
        self.bytes_read += sum(end - begin for _, begin, end, _ in tasks)

    def _copy_out(self, index: int, pieces: Sequence[_Piece], out: dict[str, torch.Tensor]) -> None:
        """Copy buffer ``index``'s pieces into their tensors on the device (allocated at their first
        piece), without blocking; an event marks when the buffer may be refilled."""
        buffer = self._buffers[index]
        assert buffer is not None
        for piece in pieces:
            info = piece.info
            if info.name not in out:
                out[info.name] = torch.empty(info.shape, dtype=DTYPES[info.dtype], device=self.device)
            if piece.end > piece.begin:
                target = out[info.name].reshape(-1).view(torch.uint8)
                source = buffer[piece.offset : piece.offset + piece.end - piece.begin]
                target[piece.begin : piece.end].copy_(source, non_blocking=self._cuda)
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._copied[index] = event

    def _take_pending(self, key: tuple[str, ...]) -> tuple[int, bool]:
        """Wait for a pending prefetch; (its buffer, whether it read ``key``). One that read something
        else is dropped: its buffer is free again."""
        if self._pending is None:
            return -1, False
        pending_key, index, future = self._pending
        self._pending = None
        future.result()
        return index, pending_key == key

    def load(self, infos: Sequence[TensorInfo]) -> dict[str, torch.Tensor]:
        """The stored tensors ``infos`` on the device, by name, at their stored dtype."""
        key = tuple(info.name for info in infos)
        fills = _fills(infos, self.capacity)
        out: dict[str, torch.Tensor] = {}
        index, ready = self._take_pending(key)
        for n, pieces in enumerate(fills):
            if n == 0 and ready:
                self.prefetched += 1
            else:
                index = self._next
                self._wait_copied(index)
                self._fill(index, pieces)
            self._copy_out(index, pieces, out)
            self._next = 1 - index
        return out

    def prefetch(self, infos: Sequence[TensorInfo]) -> None:
        """Start reading what a later :meth:`load` of ``infos`` needs first (one buffer's worth) on a
        background thread; that load then only copies it. A load of anything else drops it."""
        self._take_pending(())
        if not infos:
            return
        pieces = _fills(infos, self.capacity)[0]
        index = self._next
        self._wait_copied(index)
        future = self._prefetcher.submit(self._fill, index, pieces)
        self._pending = (tuple(info.name for info in infos), index, future)

    def close(self) -> None:
        """Finish what is in flight and free the buffers."""
        self._take_pending(())
        for index in (0, 1):
            self._wait_copied(index)
        self._readers.shutdown()
        self._prefetcher.shutdown()
        self._buffers = [None, None]
        self._views = [None, None]
