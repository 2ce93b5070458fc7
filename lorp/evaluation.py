"""Evaluation (docs/algorithm.md §9): held-out perplexity, and decode/prefill speed and memory."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lorp.blocks import input_device
from lorp.calibration import TokenWindows
from lorp.divergence import DenseFinals, Divergence, logit_rows, next_token_valid, token_divergence
from lorp.errors import InvalidRequestError
from lorp.execution import Batch, Runner, as_runner
from lorp.execution.healed import FoldedMap
from lorp.states import Riders


def batch_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch and its number of predicted tokens.

    A target counts only when it and its context position are real (unmasked) tokens.
    """
    # -log softmax(z)[t] = logsumexp(z) - z[t], without writing the whole log-softmax out, and
    # lorp.divergence.LOGIT_ROWS positions at a time in float32
    targets = logit_rows(ids[:, 1:].unsqueeze(-1))
    parts = []
    for z, target in zip(logit_rows(logits[:, :-1]), targets, strict=True):
        z = z.float()
        parts.append(torch.logsumexp(z, dim=-1) - z.gather(-1, target).squeeze(-1))
    valid = next_token_valid(mask)
    nll = torch.cat(parts).reshape(valid.shape)
    return float(nll[valid].double().sum()), int(valid.sum())


def state_nll(
    runner: Runner,
    batch: Batch,
    final: torch.Tensor,
    *,
    dense: torch.Tensor | None = None,
    divergence: Divergence | None = None,
) -> tuple[float, int]:
    """:func:`batch_nll` of the logits of ``final`` (a state leaving the last block), reduced a window
    at a time so that a batch's logits are never held whole (``Runner.window_logits``).

    With ``dense`` (the dense model's final state of the same batch) and ``divergence``, the same
    windows' divergence of these predictions from the dense ones is added to ``divergence``
    (``lorp.divergence``): the dense logits come from the same head, a window at a time too."""
    total, count = 0.0, 0
    # Both window generators switch gradients off while they run; the dense one, never run to its end,
    # is closed here, inside this block, so that neither leaves them off for the caller.
    with torch.no_grad():
        dense_windows = runner.window_logits(batch, dense) if dense is not None else None
        try:
            for rows, logits in runner.window_logits(batch, final):
                nll, tokens = batch_nll(logits, batch.ids[rows], batch.mask[rows])
                total += nll
                count += tokens
                if dense_windows is not None and divergence is not None:
                    _, dense_logits = next(dense_windows)
                    divergence.add(*token_divergence(dense_logits, logits, next_token_valid(batch.mask[rows])))
        finally:
            if dense_windows is not None:
                dense_windows.close()
    return total, count


def mean_to_perplexity(nll: float, tokens: int) -> float:
    """exp of the mean negative log-likelihood (inf past float range); refuses zero tokens."""
    if tokens == 0:
        raise InvalidRequestError("no tokens to evaluate", field="evaluation.dataset")
    mean = nll / tokens
    return math.exp(mean) if mean < 700 else math.inf


def negative_log_likelihood(
    model: Any,
    windows: TokenWindows,
    *,
    batch_size: int = 4,
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    removed: Sequence[int] = (),
    fits: Sequence[FoldedMap] = (),
    keep: DenseFinals | None = None,
    against: DenseFinals | None = None,
    divergence: Divergence | None = None,
    on_first_batch: Callable[[Runner, Batch, torch.Tensor], None] | None = None,
    ran: Riders | None = None,
) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the windows, and the number of predicted tokens.

    Args:
        model: A causal LM (or a ``lorp.execution.Runner`` for one).
        windows: Token windows; a target counts only when it and its context position are real tokens.
        batch_size: Sequences per forward pass.
        should_cancel: Checked between batches (raises ``JobCancelled``).
        progress: Called as ``progress(done, total)`` after each batch.
        removed, fits: measure the model with these blocks removed and these heal maps folded (a pruned
            view, ``Runner.pruned``), without changing it: how sequential execution measures the pruned
            model it never holds.
        keep, against, divergence: the dense pass keeps its final states; the pruned pass, against
            them, adds its divergence from the dense predictions.
        on_first_batch: called as ``on_first_batch(view, batch, final)`` with the first batch and the
            state leaving its last block while the view and its head are held (how a sequential job's
            reload check takes the pruned model's logits from this pass, ``lorp.export.PrunedLogits``).
        ran: the windows' batches (of ``batch_size``) with their states leaving the last block, carried
            by a pass that ran already (a sequential job's evaluation windows ride its dense pass,
            ``lorp.states.Riders``): only the head runs here. The dense model's only.
    """
    runner = as_runner(model)
    total_nll = 0.0
    total_tokens = 0
    count = windows.num_windows
    done = 0
    index = 0  # the batch's position in the whole pass
    if ran is not None and (
        removed
        or fits
        or ran.finals is None
        or sum(batch.num_windows for batch in ran.batches) != count
        or len(ran.batches) != len(ran.finals)
    ):
        raise ValueError("the batches that ran already are the dense model's, one final state each, of these windows")
    with torch.inference_mode():
        batches = runner.batches(windows, batch_size, should_cancel=should_cancel, doing="evaluating")
        groups = runner.groups(batches) if ran is None else [list(ran.batches)]
        for group in groups:
            with runner.pruned(removed, fits) as view:
                finals = view.run_all(group) if ran is None or ran.finals is None else list(ran.finals)
                with view.head():
                    nlls = []
                    for i, (batch, final) in enumerate(zip(group, finals, strict=True)):
                        if keep is not None:
                            keep.keep(final)
                        if on_first_batch is not None and index + i == 0:
                            on_first_batch(view, batch, final)
                        dense = against.get(index + i, final.shape) if against is not None else None
                        nlls.append(state_nll(view, batch, final, dense=dense, divergence=divergence))
                index += len(group)
                for batch, (nll, tokens) in zip(group, nlls, strict=True):
                    total_nll += nll
                    total_tokens += tokens
                    done += batch.num_windows
                    if progress is not None:
                        progress(done, count)
    return total_nll, total_tokens


def perplexity(model: Any, windows: TokenWindows, **kwargs: Any) -> float:
    """exp of the mean next-token negative log-likelihood over the windows (see ``negative_log_likelihood``,
    whose keywords it takes: ``keep`` / ``against`` and ``divergence`` gather the divergence on the way)."""
    return mean_to_perplexity(*negative_log_likelihood(model, windows, **kwargs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weights_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int(params + buffers)


def measure_speed(
    model: Any,
    prompt_ids: torch.Tensor,
    *,
    new_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """Prefill and greedy-decode throughput with the KV cache, medians over repeats.

    Args:
        model: A causal LM (or a ``lorp.execution.Runner`` for one).
        prompt_ids: int64 ``[batch, prompt_len]`` prompt batch (no padding).
        new_tokens: Decode steps per repeat.
        repeats: Timed repeats; the medians are reported.
        warmup: Untimed runs first (kernel selection, allocator warm-up).

    Returns:
        ``prefill_tokens_per_s``, ``decode_tokens_per_s``, ``weights_bytes`` and, on CUDA,
        ``peak_memory_bytes`` (None on CPU, where no per-model peak is measurable in-process).
    """
    if new_tokens < 1 or repeats < 1:
        raise InvalidRequestError("new_tokens and repeats must be at least 1", field="evaluation.speed")
    device = input_device(model)
    ids = prompt_ids.to(device)
    batch, prompt_len = ids.shape
    prefill_times: list[float] = []
    decode_times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for run in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            next_tok = out.logits[:, -1:].argmax(-1)
            cache = out.cache
            _sync(device)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(input_ids=next_tok, cache=cache, use_cache=True)
                cache = out.cache
                next_tok = out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            if run >= warmup:
                prefill_times.append(t1 - t0)
                decode_times.append(t2 - t1)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return {
        "prefill_tokens_per_s": batch * prompt_len / statistics.median(prefill_times),
        "decode_tokens_per_s": batch * new_tokens / statistics.median(decode_times),
        "weights_bytes": weights_bytes(model),
        "peak_memory_bytes": peak,
        "batch": int(batch),
        "prompt_len": int(prompt_len),
        "new_tokens": new_tokens,
        "repeats": repeats,
    }


def greedy_tokens(model: Any, input_ids: torch.Tensor, new_tokens: int, pad_token_id: int | None) -> list[int]:
    """The first row's greedy continuation: exactly ``new_tokens`` new token ids."""
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_token_id,
        )
    return [int(t) for t in out[0, input_ids.shape[1] :].tolist()]


def greedy_completions(model: Any, tokenizer: Any, prompts: list[str], *, new_tokens: int = 24) -> list[str]:
    """Each prompt's greedy continuation (the new text only), one prompt at a time (no padding)."""
    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out.append(tokenizer.decode(greedy_tokens(model, ids, new_tokens, pad), skip_special_tokens=True))
    return out
