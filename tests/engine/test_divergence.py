"""The divergence of the pruned model's predictions from the dense model's (lorp.divergence): exact on
hand-built distributions, zero against itself, padding left out, and the pruned pass's figures equal to
what transformers' own forward of both models gives."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lorp.divergence
from lorp.blocks import remove_blocks
from lorp.divergence import DenseFinals, Divergence, next_token_valid, position_kl, token_divergence
from lorp.evaluation import batch_nll, negative_log_likelihood

from .helpers import tiny_llama, windows_with_padding


def test_closed_form_on_hand_built_logits_with_padding_left_out():
    # One window of 4 positions over a vocabulary of 2; the last token is padding, so position 2
    # (whose next token is padding) and position 3 (past the window) do not count.
    dense = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0], [50.0, -50.0], [0.0, 0.0]]])
    pruned = torch.tensor([[[math.log(1.5), 0.0], [1.0, 2.0], [-50.0, 50.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    kl, agree = token_divergence(dense, pruned, next_token_valid(mask))
    # p = (1/4, 3/4), q = (3/5, 2/5): KL = 1/4 ln(5/12) + 3/4 ln(15/8); then identical distributions.
    expected = 0.25 * math.log(0.25 / 0.6) + 0.75 * math.log(0.75 / 0.4)
    assert kl.dtype == torch.float64 and kl.tolist() == pytest.approx([expected, 0.0], abs=1e-7)
    assert agree.tolist() == [False, True]
    found = Divergence()
    found.add(kl, agree)
    summary = found.summary()
    assert summary["kl_mean"] == pytest.approx(expected / 2, abs=1e-7)
    assert summary["kl_p99"] == pytest.approx(0.99 * expected, abs=1e-7)  # linear between 0 and the one
    assert summary["top1_agreement"] == 0.5


def test_position_kl_gives_the_closed_form_and_autograds_gradient():
    dense = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])
    pruned = torch.tensor([[[math.log(1.5), 0.0], [1.0, 2.0]]])
    expected = 0.25 * math.log(0.25 / 0.6) + 0.75 * math.log(0.75 / 0.4)
    assert position_kl(dense, pruned)[0].tolist() == pytest.approx([expected, 0.0], abs=1e-7)

    # Its written-out gradient is the one autograd finds through log_softmax, weighted per position.
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 5, 11, generator=generator) * 3
    student = (torch.randn(2, 5, 11, generator=generator) * 3).requires_grad_()
    weights = torch.rand(2, 5, generator=generator)
    (position_kl(teacher, student) * weights).sum().backward()
    mine = student.grad.clone()
    student.grad = None
    p_log, q_log = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    ((p_log.exp() * (p_log - q_log)).sum(-1) * weights).sum().backward()
    assert torch.allclose(mine, student.grad, atol=1e-6)
    assert not torch.allclose(mine, torch.zeros_like(mine))
    kl, _ = token_divergence(teacher, student.detach(), torch.ones(2, 4, dtype=torch.bool))
    assert position_kl(teacher, student)[:, :-1].flatten().tolist() == pytest.approx(kl.tolist(), abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        position_kl(teacher, student[:, :3])


def _measure(model, windows, **kwargs) -> float:
    nll, tokens = negative_log_likelihood(model, windows, batch_size=2, **kwargs)
    return nll / tokens


def test_logits_are_reduced_a_few_positions_at_a_time_with_the_whole_windows_figures(monkeypatch):
    # Windows of 50 positions (49 predicting), padded, over a vocabulary of 300, reduced 16 positions at
    # a time: parts that do not divide the window, and windows that do not share one.
    vocabulary, rows = 300, 16
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(3, 50, vocabulary, generator=generator).bfloat16()
    pruned = torch.randn(3, 50, vocabulary, generator=generator).bfloat16()
    ids = torch.randint(0, vocabulary, (3, 50), generator=generator)
    mask = torch.ones(3, 50, dtype=torch.long)
    mask[1, 40:] = 0
    valid = next_token_valid(mask)
    p_log, q_log = torch.log_softmax(dense[:, :-1].float(), -1), torch.log_softmax(pruned[:, :-1].float(), -1)
    whole_kl = (p_log.exp() * (p_log - q_log)).sum(-1, dtype=torch.float64)[valid].clamp(min=0.0)
    whole_agree = (p_log.argmax(-1) == q_log.argmax(-1))[valid]
    z = dense[:, :-1].float()
    whole_nll = (torch.logsumexp(z, -1) - z.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1))[valid].double().sum()

    def largest_allocation(parts: int) -> int:
        monkeypatch.setattr(lorp.divergence, "LOGIT_ROWS", parts)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as run:
            kl, agree = token_divergence(dense, pruned, valid)
            nll, tokens = batch_nll(dense, ids, mask)
        assert torch.equal(kl, whole_kl) and torch.equal(agree, whole_agree)
        assert nll == float(whole_nll) and tokens == int(valid.sum()) == 3 * 49 - 10
        return max(event.cpu_memory_usage for event in run.events())

    float32_row = vocabulary * 4
    assert largest_allocation(rows) <= 2 * rows * float32_row
    assert largest_allocation(10**6) >= 49 * float32_row  # a whole window at once, as before


def test_a_model_against_itself_is_zero_and_agrees_everywhere():
    model, win = tiny_llama(4), windows_with_padding()
    finals = DenseFinals()
    dense = _measure(model, win, keep=finals)
    found = Divergence()
    again = _measure(model, win, against=finals, divergence=found)
    assert again == dense
    assert found.summary() == {"kl_mean": 0.0, "kl_p99": 0.0, "top1_agreement": 1.0}
    assert found.count == int(next_token_valid(win.attention_mask).sum())  # the perplexity's positions


def test_the_pruned_pass_gives_what_both_models_forwards_give():
    model, win = tiny_llama(5), windows_with_padding()
    finals = DenseFinals()
    _measure(model, win, keep=finals)
    pruned = copy.deepcopy(model)
    remove_blocks(pruned, [1, 2])
    found = Divergence()
    _measure(pruned, win, against=finals, divergence=found)
    summary = found.summary()

    with torch.no_grad():
        dense_logits = model(input_ids=win.input_ids, attention_mask=win.attention_mask).logits
        pruned_logits = pruned(input_ids=win.input_ids, attention_mask=win.attention_mask).logits
    kl, agree = token_divergence(dense_logits, pruned_logits, next_token_valid(win.attention_mask))
    assert summary["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert summary["kl_p99"] == pytest.approx(float(np.percentile(kl.numpy(), 99)), rel=1e-4)
    assert summary["top1_agreement"] == pytest.approx(float(agree.double().mean()), abs=1e-12)
    assert summary["kl_mean"] > 0 and summary["top1_agreement"] < 1


def test_other_windows_than_the_dense_ones_are_refused():
    model, win = tiny_llama(3), windows_with_padding()
    finals = DenseFinals()
    _measure(model, win, keep=finals)
    fewer = type(win)(input_ids=win.input_ids[:3], attention_mask=win.attention_mask[:3])
    with pytest.raises(Exception, match="other windows"):
        negative_log_likelihood(model, fewer, batch_size=3, against=finals, divergence=Divergence())
