"""Sequential execution (lorp.execution, one block on the device at a time) against resident, on every
architecture: the same S and D, cached states, heal fits, plan scores and perplexity; each block
loaded once per pass and never more than one held.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorp.blocks import remove_blocks
from lorp.calibration import TokenWindows
from lorp.errors import InvalidRequestError, ReloadCheckError
from lorp.evaluation import negative_log_likelihood, perplexity
from lorp.execution import Runner
from lorp.execution.choice import choose_execution, device_memory, memory_budget, working_bytes
from lorp.execution.scratch import StateStore
from lorp.execution.stored import Mxfp4, StoredLayout
from lorp.export import PrunedLogits, verify_reload_sequential
from lorp.heal import heal_refusal
from lorp.pipeline import working_set
from lorp.planner import MIN_TOKENS_PER_WIDTH
from lorp.pretrained import load_options, remember_stored_quantization
from lorp.scoring import CachedHealer, PlanScorer
from lorp.shards import Checkpoint
from lorp.similarity import capture_similarity
from lorp.states import Riders, StateCache, StoredStateCache, store_states, stored_cache, window_store
from lorp.surgery import write_pruned

from .archs import ARCHS, six_blocks, write_mxfp4_gpt_oss, write_wide_llama
from .helpers import EXPERTS, PER_EXPERT, REFUSED, windows


def both(name: str, tmp_path: Path) -> tuple[Runner, Runner]:
    model = six_blocks(name)
    model.save_pretrained(tmp_path)
    sequential = Runner.sequential(tmp_path, model.config, device="cpu", dtype=torch.float32)
    return Runner(model), sequential


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_sequential_and_resident_give_the_same_statistics_states_scores_and_perplexity(
    name: str, tmp_path: Path
) -> None:
    resident, sequential = both(name, tmp_path)
    n = resident.num_blocks
    data = windows(5)

    ref = capture_similarity(resident, data, batch_size=2)
    got = capture_similarity(sequential, data, batch_size=2)
    torch.testing.assert_close(torch.from_numpy(got.S), torch.from_numpy(ref.S), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.D), torch.from_numpy(ref.D), rtol=0, atol=1e-6)
    # One load per block for the whole capture (three batches), plus block 0 once to learn its output.
    assert sequential.block_loads == n + 1
    assert sequential.onloader is not None and sequential.onloader.most_held == 1

    cache_r = StateCache(resident, data, batch_size=2)
    cache_s = StateCache(sequential, data, batch_size=2)
    for b in range(cache_r.num_batches):
        real = cache_r.batches[b].real
        for j in range(n + 1):
            torch.testing.assert_close(cache_s.state(b, j)[real], cache_r.state(b, j)[real], rtol=0, atol=1e-6)

    heals = name not in REFUSED
    scorer_r = PlanScorer(resident, cache_r, healer=CachedHealer(resident, cache_r) if heals else None)
    scorer_s = PlanScorer(sequential, cache_s, healer=CachedHealer(sequential, cache_s) if heals else None)
    for plan in ([], [2], [1, 4], [3, 4, 5]):
        assert scorer_s.score(plan) == pytest.approx(scorer_r.score(plan), rel=1e-6), plan
        if heals:
            for fit_s, fit_r in zip(scorer_s.fits(plan), scorer_r.fits(plan), strict=True):
                assert (fit_s.span.start, fit_s.span.end) == (fit_r.span.start, fit_r.span.end)
                torch.testing.assert_close(fit_s.T, fit_r.T, rtol=1e-6, atol=1e-8)

    assert perplexity(sequential, data, batch_size=2) == pytest.approx(
        perplexity(resident, data, batch_size=2), rel=1e-6
    )
    assert sequential.onloader.most_held == 1


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_a_bf16_checkpoint_run_in_float32_keeps_its_embeddings_and_head_in_bf16(name: str, tmp_path: Path) -> None:
    # A bf16 checkpoint on a CPU runs in float32. Resident casts every weight on load; sequential
    # keeps the token embeddings and the head (the largest weights outside the blocks) as stored and
    # casts them as they are used, and gives the same states, statistics and perplexity.
    six_blocks(name).to(torch.bfloat16).save_pretrained(tmp_path)
    resident = Runner(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval())
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    sequential = Runner.sequential(tmp_path, config, device="cpu", dtype=torch.float32)
    model = sequential.model
    with sequential.head():  # an untied head waits on disk until logits are taken
        embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
        # A scaled embedding (Gemma's) computes in its weight's dtype: it, and a head tied to it, are cast.
        scaled = type(embeddings) is not torch.nn.Embedding
        tied = head is not None and head.weight is embeddings.weight
        expected = {id(embeddings.weight)} if not scaled else set()
        if head is not None and type(head) is torch.nn.Linear and not (tied and scaled):
            expected.add(id(head.weight))
            assert head.weight.device.type != "meta"
        for weight, param in model.named_parameters():
            if param.device.type != "meta":
                assert param.dtype == (torch.bfloat16 if id(param) in expected else torch.float32), weight
    assert expected or name.startswith("gemma")
    data = windows(5)
    ref = capture_similarity(resident, data, batch_size=2)
    got = capture_similarity(sequential, data, batch_size=2)
    torch.testing.assert_close(torch.from_numpy(got.S), torch.from_numpy(ref.S), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.D), torch.from_numpy(ref.D), rtol=0, atol=1e-6)
    batch_r = resident.batch(data.input_ids, data.attention_mask)
    batch_s = sequential.batch(data.input_ids, data.attention_mask)
    torch.testing.assert_close(batch_s.entering, batch_r.entering, rtol=0, atol=0)
    torch.testing.assert_close(sequential.forward_logits(batch_s), resident.forward_logits(batch_r), rtol=0, atol=1e-5)
    assert perplexity(sequential, data, batch_size=2) == pytest.approx(
        perplexity(resident, data, batch_size=2), rel=1e-6
    )
    # The states a sequential job caches on disk are float32 too, not the narrow embeddings' dtype
    # (the skeleton's model.dtype says bfloat16: transformers reads it off the first weight), and plans
    # scored from them, from block 0 and later, are resident's (a norm that casts back to its input's
    # dtype, Cohere's or gpt-oss's, failed on a bfloat16 state; the others rounded the states).
    assert (sequential.dtype, resident.dtype) == (torch.float32, torch.float32)
    cache_s = stored_cache(sequential, data, tmp_path / "scratch", "job", batch_size=2)
    cache_r = StateCache(resident, data, batch_size=2)
    for b in range(cache_r.num_batches):
        assert cache_s.state(b, 1).dtype == torch.float32
        real = cache_r.batches[b].real
        torch.testing.assert_close(cache_s.state(b, 1)[real], cache_r.state(b, 1)[real], rtol=0, atol=1e-6)
    for plan in ([0], [2, 3]):
        assert PlanScorer(sequential, cache_s).score(plan) == pytest.approx(
            PlanScorer(resident, cache_r).score(plan), rel=1e-6
        ), plan
    if name not in REFUSED:  # sequential rounds a folded weight as the bf16 checkpoint will store it
        healed_s = PlanScorer(sequential, cache_s, healer=CachedHealer(sequential, cache_s)).score([1])
        assert healed_s == pytest.approx(
            PlanScorer(resident, cache_r, healer=CachedHealer(resident, cache_r)).score([1]), rel=1e-3
        )
    # Untied token embeddings are read only to embed a batch and an untied head only for logits; tied,
    # they are one weight, held.
    assert (embeddings.weight.device.type == "meta") == (not tied), (name, tied)
    if head is not None:
        assert (model.get_output_embeddings().weight.device.type == "meta") == (not tied), (name, tied)


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "gpt2"])
def test_a_capture_through_a_state_store_gives_the_same_statistics(name: str, tmp_path: Path) -> None:
    resident, sequential = both(name, tmp_path / "model")
    data = windows(5)
    ref = capture_similarity(resident, data, batch_size=2)
    store = window_store(sequential, data, tmp_path / "scratch", key="job")
    got = capture_similarity(sequential, data, batch_size=2, store=store)
    torch.testing.assert_close(torch.from_numpy(got.S), torch.from_numpy(ref.S), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.D), torch.from_numpy(ref.D), rtol=0, atol=1e-6)
    assert store.done == sequential.num_blocks + 1 and store.resumed_from == 0
    assert sequential.block_loads == sequential.num_blocks + 1


@pytest.mark.parametrize("angular", ["all_tokens", "last_token"])
def test_a_stored_capture_reads_its_states_back_in_parts_with_the_same_statistics(
    angular: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read back 5 tokens' states at a time: parts that split windows and batches, padding included.
    resident, sequential = both("llama", tmp_path / "model")
    data = windows(5)
    monkeypatch.setattr("lorp.similarity.STORED_READ_BYTES", 5 * (resident.num_blocks + 1) * 32 * 4)
    ref = capture_similarity(resident, data, batch_size=2, angular=angular)
    store = window_store(sequential, data, tmp_path / "scratch", key="job")
    got = capture_similarity(sequential, data, batch_size=2, angular=angular, store=store)
    torch.testing.assert_close(torch.from_numpy(got.S), torch.from_numpy(ref.S), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.D), torch.from_numpy(ref.D), rtol=0, atol=1e-6)
    assert (got.num_tokens, got.num_sequences) == (ref.num_tokens, ref.num_sequences)


@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3", "granite", "qwen2_moe", "gpt_oss"])
def test_a_stored_capture_keeps_the_heal_windows_mlp_outputs_so_fits_load_no_block(name: str, tmp_path: Path) -> None:
    """The capture writes each block's MLP output on the heal windows (the first ones) beside its
    states; a healer on that store fits as a resident healer does, without loading any block again."""
    resident, sequential = both(name, tmp_path / "model")
    data = windows(5)
    heal_on = TokenWindows(input_ids=data.input_ids[:3], attention_mask=data.attention_mask[:3])
    store = window_store(sequential, data, tmp_path / "scratch", key="job")
    n = sequential.num_blocks
    mlp = window_store(sequential, heal_on, tmp_path / "scratch-mlp", key="job", num_states=n)
    capture_similarity(sequential, data, batch_size=2, store=store, mlp_store=mlp)
    assert mlp.done == n and mlp.shape["tokens"] == int(heal_on.attention_mask.sum())
    loads = sequential.block_loads
    heal_batches = list(sequential.batches(heal_on, 2))
    stored = StoredStateCache(store, heal_batches, 2, torch.float32, mlp=mlp)
    healer_s = CachedHealer(sequential, stored, mode="dense")
    healer_r = CachedHealer(resident, StateCache(resident, heal_on, batch_size=2), mode="dense")
    # A mixture of experts' output depends on the batch at float32's last bits (the tokens routed to an
    # expert are gathered per batch: 1e-10 against outputs of 1e-3 here), and a map fitted on 34 tokens
    # at width 32 is nearly singular, which turns that into 1e-4 relative.
    rtol, atol = (1e-3, 1e-4) if name in EXPERTS else (1e-5, 1e-7)
    for plan in ([2], [1, 4], [3, 4, 5]):
        for fit_s, fit_r in zip(healer_s.fits(plan), healer_r.fits(plan), strict=True):
            assert fit_s.anchor == fit_r.anchor
            torch.testing.assert_close(fit_s.T, fit_r.T, rtol=rtol, atol=atol)
    assert healer_s.anchor_passes == 0 and healer_r.anchor_passes == 4  # anchors 1, 0 and 3, 2
    assert sequential.block_loads == loads  # no block loaded again


def test_a_bf16_pass_stores_its_states_as_bf16_losslessly(tmp_path: Path) -> None:
    """A 16-bit model's states are stored at 16 bits (half float32's disk) and read back as the same
    values: the capture equals the same bf16 pass's capture held in memory."""
    model = six_blocks("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "model")
    sequential = Runner.sequential(tmp_path / "model", model.config, device="cpu", dtype=torch.bfloat16)
    data = windows(5)
    ref = capture_similarity(sequential, data, batch_size=2)
    store = window_store(sequential, data, tmp_path / "scratch", key="job")
    assert store.dtype == torch.bfloat16 and store.row_bytes == 2 * store.shape["width"]
    got = capture_similarity(sequential, data, batch_size=2, store=store)
    np.testing.assert_allclose(got.S, ref.S, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.D, ref.D, rtol=0, atol=1e-6)
    tokens = int(data.attention_mask.sum())
    files = sorted((tmp_path / "scratch").glob("state_*.bin"))
    assert len(files) == sequential.num_blocks + 1
    assert {f.stat().st_size for f in files} == {tokens * store.shape["width"] * 2}
    # Read back, each state is the bf16 value the block gave, as float32.
    last = store.read(store.done - 1)
    assert last.dtype == torch.float32 and torch.equal(last, last.to(torch.bfloat16).float())


class _Killed(Exception):
    pass


def test_an_interrupted_capture_resumes_at_the_next_block_with_the_same_result(tmp_path: Path) -> None:
    _, first = both("llama", tmp_path / "model")
    data = windows(5)
    whole = capture_similarity(first, data, batch_size=2)

    _, interrupted = both("llama", tmp_path / "model")
    dying = window_store(interrupted, data, tmp_path / "scratch", key="job")
    _die_after_state(dying, 4)  # states 0..4 are on disk: blocks 0..3 ran
    with pytest.raises(_Killed):
        capture_similarity(interrupted, data, batch_size=2, store=dying)
    _, again = both("llama", tmp_path / "model")
    store = window_store(again, data, tmp_path / "scratch", key="job")
    assert store.resumed_from == 5
    resumed = capture_similarity(again, data, batch_size=2, store=store)
    np.testing.assert_allclose(resumed.S, whole.S, rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed.D, whole.D, rtol=0, atol=1e-6)
    # Blocks 4 and 5, plus block 0 once to learn what a block returns: N - k + 1 loads.
    assert again.block_loads == 3

    # A store of another pass (other windows, or another model: another key) is cleared, not reused.
    other = window_store(again, windows(seed=9), tmp_path / "scratch", key="job")
    assert other.resumed_from == 0 and other.done == 0
    elsewhere = window_store(again, data, tmp_path / "scratch", key="another model")
    assert elsewhere.resumed_from == 0


def test_evaluation_windows_ride_the_validation_pass_so_the_dense_evaluation_loads_no_block(tmp_path: Path) -> None:
    resident, sequential = both("llama", tmp_path / "model")
    validation, evaluation = windows(5), windows(4, seed=9)
    riders = Riders(list(sequential.batches(evaluation, 2)))
    before = sequential.block_loads
    cache = stored_cache(sequential, validation, tmp_path / "scratch", "job", batch_size=2, riders=riders)
    assert sequential.block_loads - before == 6  # each block once, for both sets of windows
    assert riders.finals is not None and len(riders.finals) == len(riders.batches) == 2
    before = sequential.block_loads
    got = negative_log_likelihood(sequential, evaluation, batch_size=2, ran=riders)
    assert sequential.block_loads == before  # only the head ran
    expected = negative_log_likelihood(resident, evaluation, batch_size=2)
    assert got[1] == expected[1] and got[0] == pytest.approx(expected[0], rel=1e-6)
    # The validation windows' states are what a cache without riders holds.
    plain = StateCache(resident, validation, batch_size=2)
    for b in range(plain.num_batches):
        real = plain.batches[b].real
        torch.testing.assert_close(cache.state(b, 6)[real], plain.state(b, 6)[real], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="dense model"):
        negative_log_likelihood(sequential, evaluation, batch_size=2, removed=[2], ran=riders)

    # A pass that goes on from an earlier attempt's blocks takes no riders: they would start at block 0.
    _, again = both("llama", tmp_path / "model")
    dying = window_store(again, validation, tmp_path / "resumed", key="job")
    _die_after_state(dying, 3)
    with pytest.raises(_Killed):
        store_states(again, list(again.batches(validation, 2)), dying)
    _, third = both("llama", tmp_path / "model")
    riders = Riders(list(third.batches(evaluation, 2)))
    stored_cache(third, validation, tmp_path / "resumed", "job", batch_size=2, riders=riders)
    assert riders.finals is None


def _die_after_state(store: StateStore, index: int) -> None:
    """``store`` raises :class:`_Killed` once its state ``index`` is written (a worker killed there)."""
    write = store.write

    def write_then_die(at: int, rows: torch.Tensor) -> None:
        write(at, rows)
        if at == index:
            raise _Killed

    store.write = write_then_die  # type: ignore[method-assign]


def test_the_capture_pass_stores_the_validation_windows_too_and_a_store_left_behind_goes_on_alone(
    tmp_path: Path,
) -> None:
    resident, sequential = both("llama", tmp_path / "model")
    capture, validation = windows(5), windows(4, seed=9)
    plain = StateCache(resident, validation, batch_size=2)
    val_batches = list(sequential.batches(validation, 2))
    val_store = window_store(sequential, validation, tmp_path / "validation", key="job")
    store = window_store(sequential, capture, tmp_path / "capture", key="job")
    before = sequential.block_loads
    stats = capture_similarity(sequential, capture, batch_size=2, store=store, also=[(val_batches, val_store)])
    assert sequential.block_loads - before == 6  # one pass for both sets of windows
    ref = capture_similarity(resident, capture, batch_size=2)
    np.testing.assert_allclose(stats.S, ref.S, rtol=0, atol=1e-6)
    before = sequential.block_loads
    cache = stored_cache(
        sequential, validation, tmp_path / "validation", "job", batch_size=2, store=val_store, batches=val_batches
    )
    assert sequential.block_loads == before  # complete: nothing left to run
    for b in range(plain.num_batches):
        real = plain.batches[b].real
        for j in range(7):
            torch.testing.assert_close(cache.state(b, j)[real], plain.state(b, j)[real], rtol=0, atol=1e-6)

    # Killed after the capture's state 4 but before the validation windows' (they are written in turn):
    # the resumed capture leaves the validation store out, whose own pass then goes on from its state 3.
    _, dying = both("llama", tmp_path / "model")
    val_store = window_store(dying, validation, tmp_path / "validation-2", key="job")
    _die_after_state(val_store, 3)
    with pytest.raises(_Killed):
        capture_similarity(
            dying,
            capture,
            batch_size=2,
            store=window_store(dying, capture, tmp_path / "capture-2", key="job"),
            also=[(list(dying.batches(validation, 2)), val_store)],
        )
    _, again = both("llama", tmp_path / "model")
    store = window_store(again, capture, tmp_path / "capture-2", key="job")
    val_store = window_store(again, validation, tmp_path / "validation-2", key="job")
    assert (store.done, val_store.done) == (4, 4)
    val_batches = list(again.batches(validation, 2))
    _die_after_state(store, 5)  # now the capture gets one state ahead
    with pytest.raises(_Killed):
        capture_similarity(again, capture, batch_size=2, store=store, also=[(val_batches, val_store)])
    _, third = both("llama", tmp_path / "model")
    store = window_store(third, capture, tmp_path / "capture-2", key="job")
    val_store = window_store(third, validation, tmp_path / "validation-2", key="job")
    assert (store.done, val_store.done) == (6, 5)
    val_batches = list(third.batches(validation, 2))
    resumed = capture_similarity(third, capture, batch_size=2, store=store, also=[(val_batches, val_store)])
    np.testing.assert_allclose(resumed.S, ref.S, rtol=0, atol=1e-6)
    assert val_store.done == 5  # left out of the capture's pass
    cache = stored_cache(
        third, validation, tmp_path / "validation-2", "job", batch_size=2, store=val_store, batches=val_batches
    )
    for b in range(plain.num_batches):
        real = plain.batches[b].real
        torch.testing.assert_close(cache.state(b, 6)[real], plain.state(b, 6)[real], rtol=0, atol=1e-6)


def test_an_interrupted_capture_resumes_its_mlp_outputs_too(tmp_path: Path) -> None:
    _, first = both("llama", tmp_path / "model")
    data = windows(5)
    n = first.num_blocks
    whole = window_store(first, data, tmp_path / "whole-mlp", key="job", num_states=n)
    capture_similarity(
        first, data, batch_size=2, store=window_store(first, data, tmp_path / "whole", "job"), mlp_store=whole
    )

    _, interrupted = both("llama", tmp_path / "model")
    dying = window_store(interrupted, data, tmp_path / "scratch", key="job")
    _die_after_state(dying, 4)
    mlp = window_store(interrupted, data, tmp_path / "scratch-mlp", key="job", num_states=n)
    with pytest.raises(_Killed):
        capture_similarity(interrupted, data, batch_size=2, store=dying, mlp_store=mlp)
    assert mlp.done == 4  # blocks 0..3's MLP outputs, written before the states leaving them

    _, again = both("llama", tmp_path / "model")
    store = window_store(again, data, tmp_path / "scratch", key="job")
    mlp = window_store(again, data, tmp_path / "scratch-mlp", key="job", num_states=n)
    assert mlp.resumed_from == 4
    capture_similarity(again, data, batch_size=2, store=store, mlp_store=mlp)
    assert mlp.done == n
    for j in range(n):
        torch.testing.assert_close(mlp.read(j), whole.read(j), rtol=0, atol=1e-6)


def test_a_plan_score_loads_only_the_blocks_from_its_first_change(tmp_path: Path) -> None:
    _, sequential = both("llama", tmp_path)
    cache = StateCache(sequential, windows(5), batch_size=2)
    before = sequential.block_loads
    PlanScorer(sequential, cache).score([4])
    # blocks 5 (block 4 is removed), once for all three batches
    assert sequential.block_loads - before == 1
    before = sequential.block_loads
    PlanScorer(sequential, cache).score([1])
    assert sequential.block_loads - before == 4  # blocks 2..5


def test_plans_scored_together_load_each_block_once_for_all_of_them(tmp_path: Path) -> None:
    resident, sequential = both("llama", tmp_path)
    plans = [[2], [4], [1, 3], [2, 3]]
    cache = StateCache(sequential, windows(5), batch_size=2)
    healer = CachedHealer(sequential, cache)
    scorer = PlanScorer(sequential, StateCache(sequential, windows(5, seed=4), batch_size=2), healer=healer)
    for plan in plans:
        healer.fits(plan)  # the heal fits' own passes are not what this test counts
    before = sequential.block_loads
    together = scorer.score_many(plans)
    # Blocks 0..5 (the earliest change is the anchor of [1, 3]'s first span, block 0), each loaded once
    # for all four plans; one plan at a time they would take 4 + 2 + 4 + 3 = 13 loads.
    assert sequential.block_loads - before == 6
    assert scorer.evaluations == 4 and scorer.score_many(plans) == together  # reused, not measured again
    assert sequential.block_loads - before == 6
    ref_cache = StateCache(resident, windows(5), batch_size=2)
    ref = PlanScorer(
        resident, StateCache(resident, windows(5, seed=4), batch_size=2), healer=CachedHealer(resident, ref_cache)
    )
    for plan, score in zip(plans, together, strict=True):
        assert score == pytest.approx(ref.score(plan), rel=1e-6), plan


def test_the_sequential_reload_check_compares_with_the_pruned_evaluations_logits_and_loads_only_the_written_blocks(
    tmp_path: Path,
) -> None:
    model = six_blocks("llama")
    source, written = tmp_path / "source", tmp_path / "pruned"
    model.save_pretrained(source)
    removed = [2, 3]
    write_pruned(source, written, removed)
    ids = torch.randint(2, 384, (5, 12), generator=torch.Generator().manual_seed(5))
    data = TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids))  # evaluation windows: no padding

    config = transformers.AutoConfig.from_pretrained(source)
    runner = Runner.sequential(source, config, device="cpu", dtype=torch.float32)
    taken = PrunedLogits(windows=2, positions=8)
    negative_log_likelihood(runner, data, batch_size=3, removed=removed, on_first_batch=taken.take)
    # What was taken is the pruned model's computation on the first batch: its first 2 windows, 8 positions.
    remove_blocks(model, removed)
    with torch.no_grad():
        reference = model(input_ids=ids[:3]).logits[:2, :8]
    assert taken.logits is not None and taken.ids is not None and taken.ids.shape == (3, 12)
    torch.testing.assert_close(taken.logits, reference, rtol=1e-5, atol=1e-5)

    before = runner.block_loads
    check = verify_reload_sequential(written, runner, ids[:2, :8], removed, taken=taken)
    assert runner.block_loads == before  # the pruned view ran no block a second time
    assert (check["mode"], check["probe"], check["num_layers"]) == ("sequential", "evaluation", 4)
    assert check["block_loads"] == 4 + 1  # the written model's 4 blocks, and block 0 once to learn its output
    assert check["max_abs_logit_diff"] <= 1e-5

    # A written checkpoint whose weights are not the pruned model's fails against the same logits.
    tensors = load_file(written / "model.safetensors")
    name = next(key for key in tensors if ".layers.1." in key and key.endswith("down_proj.weight"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, written / "model.safetensors", metadata={"format": "pt"})
    spent = Runner.sequential(source, config, device="cpu", dtype=torch.float32)
    with pytest.raises(ReloadCheckError, match="logits differ"):
        verify_reload_sequential(written, spent, ids[:2, :8], removed, taken=taken)


_PEAK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch, transformers
    from transformers import LlamaForCausalLM  # the modeling code's import is the process's, not the pass's
    from lorp.calibration import TokenWindows
    from lorp.execution import Runner
    from lorp.similarity import capture_similarity

    def status(key):  # kB, from /proc/self/status
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here, past the imports
    base = status("VmRSS:")
    source = Path(sys.argv[1])
    config = transformers.AutoConfig.from_pretrained(source)
    runner = Runner.sequential(source, config, device="cpu", dtype=torch.float32)
    ids = torch.randint(2, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    capture_similarity(runner, TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids)), batch_size=2)
    print(base, status("VmHWM:"), runner.block_loads, runner.onloader.most_held)
    """
)


def test_a_sequential_capture_holds_about_one_block_not_the_model(tmp_path: Path) -> None:
    # 16 blocks of 16 MiB (float32, hidden 512, MLP 2048): ~260 MiB of weights. A capture holding one
    # block at a time grows its peak memory (past its imports) by about a block plus the pass's working
    # memory and the allocator's slack: 57 to 68 MiB measured, here and in CI, whatever the block count.
    # Loading the model resident would grow it by more than the model.
    src = tmp_path / "big"
    write_wide_llama(src, num_hidden_layers=16)
    size = Checkpoint(src).nbytes
    done = subprocess.run([sys.executable, "-c", _PEAK, str(src)], capture_output=True, text=True, check=True)
    base_kb, peak_kb, loads, most_held = map(int, done.stdout.split())
    growth = (peak_kb - base_kb) * 1024
    assert (loads, most_held) == (17, 1)
    print(f"growth {growth / 2**20:.1f} MiB of a {size / 2**20:.1f} MiB checkpoint")
    assert growth < 0.4 * size, (growth, size)


def test_execution_choice_by_budget_and_by_what_the_weights_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", "1")
    fits = choose_execution("auto", device=cpu, weights_bytes=600_000_000, working=300_000_000, streamable=True)
    over = choose_execution("auto", device=cpu, weights_bytes=600_000_000, working=500_000_000, streamable=True)
    assert (fits.mode, over.mode) == ("resident", "sequential")
    assert fits.budget_bytes == over.budget_bytes == 1_000_000_000
    # A GGUF file or pickled weights cannot be read a block at a time: auto runs them resident, and
    # asking for sequential is refused naming the option.
    gguf = choose_execution("auto", device=cpu, weights_bytes=0, working=0, streamable=False)
    assert gguf.mode == "resident" and "safetensors" in gguf.reason
    with pytest.raises(InvalidRequestError) as err:
        choose_execution("sequential", device=cpu, weights_bytes=0, working=0, streamable=False)
    assert err.value.field == "options.execution"
    monkeypatch.delenv("LORP_DEVICE_MEMORY_GB")
    budget, source = memory_budget(cpu)
    assert 0 < budget < device_memory(cpu) and "available host memory" in source


@pytest.mark.parametrize("value", ["0", "-2", "lots", "nan"])
def test_a_memory_budget_that_is_not_a_positive_number_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", value)
    with pytest.raises(InvalidRequestError) as err:
        memory_budget(torch.device("cpu"))
    assert err.value.field == "LORP_DEVICE_MEMORY_GB" and repr(value) in str(err.value)
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", " 2.5 ")
    assert memory_budget(torch.device("cpu")) == (2_500_000_000, "LORP_DEVICE_MEMORY_GB=2.5")


def test_the_working_set_counts_the_heal_tokens_a_models_width_keeps() -> None:
    """A wide model keeps more heal tokens (4 x d or more, so that an 8B model can heal at all), and
    auto's estimate of what a resident run holds counts them."""
    from lorp.spec import CalibrationSpec

    calibration = CalibrationSpec(num_samples=128, seq_len=256, validation_windows=16, batch_size=4)
    work = working_set(calibration)
    narrow, wide = 576, 4096
    assert work.cached_tokens(narrow) == 16 * 256 + 8192
    assert work.cached_tokens(wide) == 16 * 256 + 128 * 256  # every capture token: below the cap of 8 d
    assert work.heal_tokens(wide) >= MIN_TOKENS_PER_WIDTH * wide
    config = type("Config", (), {"hidden_size": wide, "intermediate_size": 14336, "vocab_size": 1000})()
    states = (32 + 1) * work.cached_tokens(wide) * wide * 2
    on_gpu = working_bytes(config, torch.bfloat16, 32, work, torch.device("cuda"))
    on_cpu = working_bytes(config, torch.bfloat16, 32, work, torch.device("cpu"))
    assert on_gpu >= states
    # On the CPU the device is the host, where the capture keeps the heal tokens' MLP outputs.
    assert on_cpu - on_gpu == 32 * work.heal_tokens(wide) * wide * 2
    # Distillation keeps two states (the teacher's, the one entering its first adapted block) per window.
    distilling = working_bytes(config, torch.bfloat16, 32, working_set(calibration, 512), torch.device("cuda"))
    assert distilling - on_gpu == 2 * 512 * 256 * wide * 2


def test_a_state_store_writes_a_state_whole_or_in_parts_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    from lorp.execution.scratch import StateStore

    rows = torch.randn(7, 4)
    whole = StateStore(tmp_path / "whole", "k", num_tokens=7, width=4, num_states=2, dtype=torch.bfloat16)
    parts = StateStore(tmp_path / "parts", "k", num_tokens=7, width=4, num_states=2, dtype=torch.bfloat16)
    whole.write(0, rows)
    parts.write(0, [rows[:3], rows[3:5], rows[5:]])
    assert torch.equal(parts.read(0), whole.read(0))
    assert torch.equal(parts.read(0, 2, 6), rows.to(torch.bfloat16).float()[2:6])
    with pytest.raises(ValueError, match="shape"):
        parts.write(1, [rows[:3], rows[3:6]])  # a token short
    with pytest.raises(ValueError, match="out of order"):
        parts.write(0, rows)
    assert parts.done == 1


def test_a_resumed_state_store_drops_what_a_killed_attempt_was_writing(tmp_path: Path) -> None:
    from lorp.atomic import PARTIAL_PREFIX
    from lorp.execution.scratch import StateStore

    rows = torch.randn(7, 4)
    shape = {"num_tokens": 7, "width": 4, "num_states": 3}
    first = StateStore(tmp_path / "store", "k", **shape)
    first.write(0, rows)
    # An attempt killed while writing state 1 leaves its temporary file (up to a state's size) behind.
    leftover = tmp_path / "store" / f"{PARTIAL_PREFIX}state_00001.bin.123.abcd"
    leftover.write_bytes(b"\0" * 50)
    again = StateStore(tmp_path / "store", "k", **shape)
    assert again.resumed_from == 1 and not leftover.exists()
    assert torch.equal(again.read(0), rows)
    again.write(1, rows + 1)
    assert sorted(path.name for path in (tmp_path / "store").iterdir()) == [
        "manifest.json",
        "state_00000.bin",
        "state_00001.bin",
    ]


@pytest.mark.parametrize("name", sorted(PER_EXPERT))
def test_experts_stored_apart_are_stacked_as_they_load_and_a_missing_one_is_refused_before_a_pass(
    name: str, tmp_path: Path
) -> None:
    model = six_blocks(name)
    model.save_pretrained(tmp_path / "whole")
    stored = Checkpoint(tmp_path / "whole").tensors
    pieces = [key for key in stored if ".experts.0." in key]
    assert pieces and not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in stored)
    # (The sequential tests above run these families from such files: the stacked weights are exact.)
    runner = Runner.sequential(tmp_path / "whole", model.config, device="cpu", dtype=torch.float32)
    assert runner.onloader is not None and runner.onloader.missing() == [] and runner.onloader.layout.unclaimed() == []
    with runner.onloader.block(1) as block:
        for key, value in model.model.layers[1].state_dict().items():
            torch.testing.assert_close(block.state_dict()[key], value, rtol=0, atol=0)

    # One expert's piece gone: the stack cannot be formed, and the check says so before any block loads.
    tensors = load_file(tmp_path / "whole" / "model.safetensors")
    gone = next(key for key in tensors if ".layers.1." in key and ".experts.1." in key)
    del tensors[gone]
    (tmp_path / "gap").mkdir()
    save_file(tensors, tmp_path / "gap" / "model.safetensors", metadata={"format": "pt"})
    gap = Runner.sequential(tmp_path / "gap", model.config, device="cpu", dtype=torch.float32)
    assert gap.onloader is not None
    with pytest.raises(InvalidRequestError, match="another layout") as err:
        gap.onloader.check_layout("the model")
    assert err.value.field == "options.execution" and gap.onloader.block_loads == 0


def test_a_checkpoint_in_the_layout_the_model_holds_passes_the_layout_check(tmp_path: Path) -> None:
    model = six_blocks("gpt_oss")  # experts stacked in the files as in the model
    model.save_pretrained(tmp_path)
    runner = Runner.sequential(tmp_path, model.config, device="cpu", dtype=torch.float32)
    assert runner.onloader is not None
    runner.onloader.check_layout("the model")
    assert runner.onloader.missing() == [] and runner.onloader.layout.unclaimed() == []


def test_a_gpt_oss_checkpoint_stored_in_mxfp4_runs_sequentially_on_the_weights_transformers_dequantizes(
    tmp_path: Path,
) -> None:
    # gpt-oss ships its experts in MXFP4 (the 120B model: about 65 GB stored, 230 GB in bfloat16):
    # sequential execution dequantizes a block's experts as it loads, the way transformers loads the
    # whole model where it has no MXFP4 kernels, and both give the same states, S, D and perplexity.
    write_mxfp4_gpt_oss(tmp_path, dtype=torch.bfloat16)  # as shipped: bfloat16 beside the MXFP4 experts
    resident = Runner(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval())
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    sequential = Runner.sequential(tmp_path, config, device="cpu", dtype=torch.float32)
    assert sequential.onloader is not None
    stored, assembly = sequential.onloader.layout.sources("model.layers.2.mlp.experts.down_proj")
    assert isinstance(assembly, Mxfp4) and stored == [
        "model.layers.2.mlp.experts.down_proj_blocks",
        "model.layers.2.mlp.experts.down_proj_scales",
    ]
    # The other way round (what the checkpoint writer asks of each stored tensor): either half names its
    # weight, for the skeleton and for the model transformers loaded dequantized (which forgets its
    # quantization: the engine's loader keeps it, lorp.pretrained); other tensors none.
    remember_stored_quantization(resident.model, tmp_path)
    for layout in (sequential.onloader.layout, StoredLayout(resident.model, Checkpoint(tmp_path))):
        for half in stored:
            assert layout.packed(half) == assembly
        assert layout.packed("model.layers.2.mlp.experts.down_proj_bias") is None
        assert layout.packed("model.layers.2.self_attn.q_proj.weight") is None
    data = windows(5)
    ref = capture_similarity(resident, data, batch_size=2)
    got = capture_similarity(sequential, data, batch_size=2)
    torch.testing.assert_close(torch.from_numpy(got.S), torch.from_numpy(ref.S), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.from_numpy(got.D), torch.from_numpy(ref.D), rtol=0, atol=1e-6)
    assert perplexity(sequential, data, batch_size=2) == pytest.approx(
        perplexity(resident, data, batch_size=2), rel=1e-6
    )
    assert sequential.onloader.most_held == 1
    # What auto's choice counts for the weights: the experts dequantized, as the resident model holds them.
    held = sum(p.numel() * 4 for p in resident.model.parameters())
    assert Checkpoint(tmp_path).nbytes_as(torch.float32) == held
    # A resident load asks transformers to dequantize too, wherever it runs (on a GPU it would otherwise
    # fetch MXFP4 kernels from the hub); a plain checkpoint's loads pass nothing of the kind.
    assert load_options(tmp_path)["quantization_config"].dequantize
    six_blocks("gpt_oss").save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in load_options(tmp_path / "plain")
    # A heal map folds into the dequantized experts, rounded as the checkpoint will hold them: written
    # unquantized, in the dtype of the experts' biases (tests/engine/test_pipeline.py).
    assert heal_refusal(sequential.model) is None
    third = torch.full((1,), 1 / 3)
    assert torch.equal(sequential.onloader.rounded(2, "mlp.experts.down_proj", third), third.bfloat16().float())
