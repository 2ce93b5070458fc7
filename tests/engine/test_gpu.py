"""The engine on CUDA: capture, auto, removal and the reload check in bfloat16, a sequential job
(one block on the device at a time) against a resident one, a mixture of experts' experts stacked as
they load, a sequential job distilled block-locally and a resident one distilled whole. Skipped
without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as safe_load

from lorp.blocks import remove_blocks
from lorp.calibration import CalibrationData, TokenWindows
from lorp.distill import WARM_STEPS
from lorp.execution import Runner
from lorp.execution.staging import Stager
from lorp.export import save_pruned, verify_reload
from lorp.pipeline import run_prune
from lorp.planner import choose_plan
from lorp.shards import Checkpoint
from lorp.similarity import capture_similarity
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec

from .archs import build, probe, six_blocks, write_mxfp4_gpt_oss, write_wide_llama
from .helpers import make_spec, tiny_llama, windows_with_padding
from .reference import brute_force, llama_states

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_capture_on_cuda_matches_cpu_reference():
    model = tiny_llama()
    windows = windows_with_padding()
    S_ref, D_ref = brute_force(model, llama_states, windows)
    stats = capture_similarity(model.cuda(), windows, batch_size=2)
    np.testing.assert_allclose(stats.S, S_ref, atol=1e-4)
    np.testing.assert_allclose(stats.D, D_ref, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3_text", "gpt2"])
def test_bf16_prune_save_reload_on_cuda(name, tmp_path, tiny_tokenizer):
    model = build(name).to(device="cuda", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 384, (4, 16), generator=gen)
    win = TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids))
    stats = capture_similarity(model, win, batch_size=2)
    assert np.isfinite(stats.S).all() and np.isfinite(stats.D).all()
    spec = PruneSpec(
        model=ModelSpec(id=name),
        target=TargetSpec(num_layers=1),
        calibration=CalibrationSpec(batch_size=2),
        options=SelectionOptions(heal="none"),
    )
    data = CalibrationData(capture=win, validation=win, text_sha256="", num_stream_tokens=0)
    choice = choose_plan(model, stats.S, stats.D, data, spec, 4)  # method auto, as a job chooses
    assert np.isfinite(choice.scores[choice.chosen_name]) and len(choice.chosen.pruned_layers) == 1
    remove_blocks(model, choice.chosen.pruned_layers)
    out = save_pruned(model, tiny_tokenizer, tmp_path / name)
    report = verify_reload(out, model, probe().cuda())
    assert report["num_layers"] == 3


def test_a_sequential_mixture_of_experts_on_cuda_stacks_its_experts_through_the_pinned_buffers(tmp_path):
    # Mixtral's checkpoint stores each expert apart: the staged pieces are stacked on the device.
    model = six_blocks("mixtral")
    model.save_pretrained(tmp_path)
    runner = Runner.sequential(tmp_path, model.config, device="cuda", dtype=torch.float32)
    assert runner.onloader is not None and runner.onloader.stage
    win = windows_with_padding()
    ref = capture_similarity(model.cuda(), win, batch_size=2)
    got = capture_similarity(runner, win, batch_size=2)
    np.testing.assert_allclose(got.S, ref.S, atol=1e-4)
    np.testing.assert_allclose(got.D, ref.D, atol=1e-4)
    assert runner.onloader.stager is not None and runner.onloader.stager.prefetched > 0


def test_a_sequential_gpt_oss_stored_in_mxfp4_dequantizes_its_experts_on_cuda(tmp_path):
    # The packed bytes and exponents are staged like any tensor and dequantized on the device; the
    # CPU's sequential pass (which tests/engine/test_sequential.py holds to transformers' load) agrees.
    write_mxfp4_gpt_oss(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    on_cuda = Runner.sequential(tmp_path, config, device="cuda", dtype=torch.float32)
    on_cpu = Runner.sequential(tmp_path, config, device="cpu", dtype=torch.float32)
    assert on_cuda.onloader is not None and on_cuda.onloader.stage
    win = windows_with_padding()
    ref = capture_similarity(on_cpu, win, batch_size=2)
    got = capture_similarity(on_cuda, win, batch_size=2)
    np.testing.assert_allclose(got.S, ref.S, atol=1e-4)
    np.testing.assert_allclose(got.D, ref.D, atol=1e-4)


def test_a_sequential_capture_on_cuda_holds_about_one_block_of_device_memory(tmp_path):
    # 16 float32 blocks of 16 MiB (about 260 MiB of weights): the device holds one block, the pass's
    # states and the head's slices, never the model.
    write_wide_llama(tmp_path, num_hidden_layers=16)
    size = Checkpoint(tmp_path).nbytes
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    runner = Runner.sequential(tmp_path, config, device="cuda", dtype=torch.float32)
    ids = torch.randint(2, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    stats = capture_similarity(runner, TokenWindows(input_ids=ids, attention_mask=torch.ones_like(ids)), batch_size=2)
    peak = torch.cuda.max_memory_allocated() - before
    assert np.isfinite(stats.S).all()
    assert (runner.block_loads, runner.onloader.most_held) == (17, 1)
    print(f"device peak {peak / 2**20:.1f} MiB of a {size / 2**20:.1f} MiB checkpoint")
    assert peak < 0.25 * size, (peak, size)


def test_a_sequential_bf16_job_on_cuda_gives_the_resident_jobs_plan_and_checkpoint(
    tiny_model_dir, corpus_files, tmp_path
):
    runs = {}
    for mode in ("resident", "sequential"):
        spec = make_spec(
            tiny_model_dir,
            corpus_files,
            model=ModelSpec(id=str(tiny_model_dir), device="cuda", dtype="bfloat16"),
            options=SelectionOptions(execution=mode, heal="linear"),
        )
        runs[mode] = run_prune(spec, tmp_path / mode)
    r, s = runs["resident"].report, runs["sequential"].report
    assert (s.execution.mode, r.execution.mode) == ("sequential", "resident")
    assert s.chosen == r.chosen and s.heal.method == r.heal.method == "linear"
    np.testing.assert_allclose(runs["sequential"].stats.S, runs["resident"].stats.S, rtol=0, atol=1e-2)
    assert s.metrics.pruned["perplexity"] == pytest.approx(r.metrics.pruned["perplexity"], rel=1e-2)
    got = safe_load(runs["sequential"].model_dir / "model.safetensors")
    expected = safe_load(runs["resident"].model_dir / "model.safetensors")
    # Run in bfloat16, written in the checkpoint's own dtype.
    assert got.keys() == expected.keys() and {t.dtype for t in got.values()} == {torch.float32}
    for name in expected:
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=2e-2, atol=2e-2)
    assert s.reload_check["max_abs_logit_diff"] <= 5e-2


@pytest.mark.parametrize("capacity", [100, 1000, 10_000])
def test_a_stager_on_cuda_loads_through_pinned_buffers_what_the_plain_reader_reads(mixed_checkpoint, capacity):
    stager = Stager("cuda", capacity)
    checkpoint = mixed_checkpoint
    infos = list(checkpoint.tensors.values())
    try:
        assert stager._buffer(0) is not None and stager._buffers[0].is_pinned()
        stager.prefetch(infos)
        for _ in range(3):  # a prefetched load, then loads that reuse both buffers
            loaded = stager.load(infos)
            stager.prefetch(infos[::-1])  # dropped by the next load
            for info in infos:
                got = loaded[info.name]
                assert got.device.type == "cuda"
                assert torch.equal(got.cpu(), checkpoint.read(info.name)), info.name
        assert stager.prefetched == 1
    finally:
        stager.close()


@pytest.mark.parametrize(
    ("execution", "scope", "loss"), [("sequential", "local", "state"), ("resident", "all", "kl+ce")]
)
def test_a_bf16_job_on_cuda_distils_and_writes_what_it_measured(
    execution, scope, loss, tiny_model_dir, corpus_files, tmp_path
):
    """Sequential: each cut's anchor block-locally. Resident: the whole model, its teacher's states kept
    on the host and taken to the device a window at a time."""
    spec = make_spec(
        tiny_model_dir,
        corpus_files,
        model=ModelSpec(id=str(tiny_model_dir), device="cuda", dtype="bfloat16"),
        options=SelectionOptions(execution=execution, heal="distill", heal_steps=8, selection_metric="kl"),
    )
    report = run_prune(spec, tmp_path / "distill").report
    summary = report.heal.distill
    assert report.execution.mode == execution and (summary["scope"], summary["loss"]) == (scope, loss)
    assert summary["shipped"] == report.heal.method and summary["steps"] == 8
    assert summary["distilled_kl"] is not None and summary["first_loss"] > 0
    assert summary["warm_steps"] == (WARM_STEPS if execution == "resident" else 0)  # the anchor first, resident
    if execution == "sequential":  # a block's relative error falls; the tiny model's KL is step-to-step noise
        assert summary["last_loss"] < summary["first_loss"]
    assert report.reload_check["max_abs_logit_diff"] <= 5e-2  # the written model is the one measured
