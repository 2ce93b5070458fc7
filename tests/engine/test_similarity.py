"""The one-pass capture equals a brute-force per-token computation (docs/algorithm.md §1-2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lorp.errors import JobCancelled
from lorp.execution import Runner
from lorp.similarity import capture_similarity

from .helpers import VOCAB, tiny_llama, windows_with_padding
from .reference import brute_force, llama_states


def test_capture_matches_brute_force_llama_with_padding():
    model = tiny_llama()
    windows = windows_with_padding()
    stats = capture_similarity(model, windows, batch_size=2)
    S_ref, D_ref = brute_force(model, llama_states, windows)
    assert stats.S.shape == (6, 6) and stats.S.dtype == np.float64
    assert stats.num_tokens == int(windows.attention_mask.sum())
    np.testing.assert_allclose(stats.S, S_ref, atol=1e-5)
    np.testing.assert_allclose(stats.D, D_ref, atol=1e-5)
    assert np.all(np.diag(stats.S) == 1.0)
    np.testing.assert_allclose(stats.S, stats.S.T, atol=1e-12)


def test_capture_last_token_angular_variant():
    model = tiny_llama()
    windows = windows_with_padding()
    stats = capture_similarity(model, windows, batch_size=3, angular="last_token")
    S_ref, D_ref = brute_force(model, llama_states, windows, last_token_only=True)
    np.testing.assert_allclose(stats.S, S_ref, atol=1e-5)
    np.testing.assert_allclose(stats.D, D_ref, atol=1e-5)


def test_batch_size_does_not_change_the_result():
    model = tiny_llama()
    windows = windows_with_padding()
    a = capture_similarity(model, windows, batch_size=1)
    b = capture_similarity(model, windows, batch_size=5)
    np.testing.assert_allclose(a.S, b.S, atol=1e-6)
    np.testing.assert_allclose(a.D, b.D, atol=1e-6)


def test_capture_matches_brute_force_gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64)).eval()

    def gpt2_states(m, ids):
        ln_f = m.transformer.ln_f
        m.transformer.ln_f = torch.nn.Identity()
        try:
            return list(m(input_ids=ids, output_hidden_states=True).hidden_states)
        finally:
            m.transformer.ln_f = ln_f

    windows = windows_with_padding()
    stats = capture_similarity(model, windows, batch_size=2)
    S_ref, D_ref = brute_force(model, gpt2_states, windows)
    np.testing.assert_allclose(stats.S, S_ref, atol=1e-5)
    np.testing.assert_allclose(stats.D, D_ref, atol=1e-5)


def test_capture_stops_after_the_last_block():
    model = tiny_llama()
    calls = {"norm": 0, "head": 0}
    model.model.norm.register_forward_hook(lambda *_: calls.__setitem__("norm", calls["norm"] + 1))
    model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    windows = windows_with_padding()
    capture_similarity(model, windows, batch_size=2)
    runner = Runner(model)
    for batch in runner.batches(windows, 2):
        runner.run(batch)
    assert calls == {"norm": 0, "head": 0}
    # the blocks are the model's own again afterwards: a normal forward reaches the head
    model(input_ids=windows.input_ids[:1])
    assert calls["head"] == 1


def test_progress_and_cancel_between_batches():
    model = tiny_llama()
    windows = windows_with_padding()
    seen: list[tuple[int, int]] = []
    capture_similarity(model, windows, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(2, 5), (4, 5), (5, 5)]
    batches = {"n": 0}

    def cancel_after_one() -> bool:
        batches["n"] += 1
        return batches["n"] > 1

    with pytest.raises(JobCancelled):
        capture_similarity(model, windows, batch_size=2, should_cancel=cancel_after_one)
