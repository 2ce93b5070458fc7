"""The engine on CUDA in bfloat16: capture, auto, removal and the reload check. Skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorp.auto import auto_select
from lorp.blocks import remove_blocks
from lorp.calibration import TokenWindows
from lorp.export import save_pruned, verify_reload
from lorp.similarity import capture_similarity

from .archs import build, probe
from .test_similarity import brute_force, llama_states, tiny_llama, windows_with_padding

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
    result = auto_select(model, stats.S, stats.D, 1, win)
    remove_blocks(model, result.chosen.pruned_layers)
    out = save_pruned(model, tiny_tokenizer, tmp_path / name)
    report = verify_reload(out, model, probe().cuda())
    assert report["num_layers"] == 3
