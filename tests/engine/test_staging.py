"""Loads through reused buffers (lorp.execution.staging): the same tensors as the plain reader, however
the buffers split them, and a sequential runner that reads each next block early gives the same
result. On a CPU the buffers are plain memory; tests/engine/test_gpu.py runs the same path on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorp.execution import Runner
from lorp.execution.staging import Stager
from lorp.scoring import CachedHealer, PlanScorer
from lorp.shards import Checkpoint
from lorp.similarity import capture_similarity
from lorp.states import StateCache

from .archs import six_blocks
from .helpers import windows


@pytest.mark.parametrize("capacity", [1, 100, 1000, 10_000])
def test_a_stager_loads_what_the_plain_reader_reads_however_its_buffers_split_the_bytes(
    mixed_checkpoint: Checkpoint, capacity: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lorp.execution.staging._READ_BYTES", 64)  # many reads in parallel per fill
    checkpoint = mixed_checkpoint
    stager = Stager("cpu", capacity)
    infos = list(checkpoint.tensors.values())
    try:
        for _ in range(2):  # the buffers are reused
            loaded = stager.load(infos)
            assert list(loaded) == [info.name for info in infos]
            for info in infos:
                expected = checkpoint.read(info.name)
                assert loaded[info.name].dtype == expected.dtype and loaded[info.name].shape == expected.shape
                assert torch.equal(loaded[info.name], expected), info.name
    finally:
        stager.close()
    assert stager.bytes_read == 2 * checkpoint.nbytes


def test_a_prefetched_load_reads_nothing_more_and_one_of_something_else_is_dropped(
    mixed_checkpoint: Checkpoint,
) -> None:
    checkpoint = mixed_checkpoint
    infos = list(checkpoint.tensors.values())
    first, second = infos[:3], infos[3:]
    stager = Stager("cpu", 10_000)
    try:
        stager.load(first)
        stager.prefetch(second)
        loaded = stager.load(second)  # the prefetch read it: only copies now
        assert stager.prefetched == 1 and stager.bytes_read == checkpoint.nbytes  # each byte read once
        assert all(torch.equal(loaded[i.name], checkpoint.read(i.name)) for i in second)
        stager.prefetch(second)
        loaded = stager.load(first)  # not what was prefetched: read now, correctly, from the freed buffer
        assert stager.prefetched == 1
        assert all(torch.equal(loaded[i.name], checkpoint.read(i.name)) for i in first)
    finally:
        stager.close()


# Mixtral: its checkpoint stores each expert apart, so the staged pieces are stacked as the block loads.
@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_a_staged_sequential_runner_reads_each_next_block_early_with_the_same_result(name: str, tmp_path: Path) -> None:
    model = six_blocks(name)
    model.save_pretrained(tmp_path)
    resident = Runner(model)
    staged = Runner.sequential(tmp_path, model.config, device="cpu", dtype=torch.float32, stage=True)
    data = windows(5)
    ref, got = capture_similarity(resident, data, batch_size=2), capture_similarity(staged, data, batch_size=2)
    torch.testing.assert_close(torch.from_numpy(got.S), torch.from_numpy(ref.S), rtol=0, atol=1e-6)
    stager = staged.onloader.stager if staged.onloader is not None else None
    assert stager is not None
    # Block 0 once to learn its output, then one pass over blocks 0..5: each of blocks 1..5 was read
    # while the block before it ran.
    assert staged.block_loads == 7 and stager.prefetched == 5

    cache_r, cache_s = StateCache(resident, data, batch_size=2), StateCache(staged, data, batch_size=2)
    heals = name == "llama"  # a mixture of experts takes no folded map
    scorer_r = PlanScorer(resident, cache_r, healer=CachedHealer(resident, cache_r) if heals else None)
    scorer_s = PlanScorer(staged, cache_s, healer=CachedHealer(staged, cache_s) if heals else None)
    plans = [[2], [1, 4], [3, 4, 5]]
    assert scorer_s.score_many(plans) == pytest.approx(scorer_r.score_many(plans), rel=1e-6)
    assert stager.prefetched > 5
