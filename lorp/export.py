"""Saving a pruned model, and the reload-and-compare check that must pass before it is published.

docs/algorithm.md §8: a saved directory can look fine and still be wrong. With a stale block count in the
config, transformers 5.x reloads it by creating the missing blocks with random weights and only prints
a load report; so the check reloads the directory with ``AutoModelForCausalLM`` and compares logits
and cached greedy generation against the in-memory model, and also fails on any missing, unexpected
or mismatched key in the load report.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorp.blocks import block_layout, decoder_blocks
from lorp.errors import InvalidRequestError, ReloadCheckError
from lorp.evaluation import greedy_tokens
from lorp.pretrained import drop_leftover_quantization, load_options

# Default tolerance on the max abs logit difference, relative to the largest reference logit (with a
# floor of 1.0): the same weights on the same device give identical or near-identical logits, so the
# budget is a few units in the last place of the dtype. A stale or random block moves logits by O(1).
_RELATIVE_TOLERANCE: dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.float64: 1e-10,
    torch.bfloat16: 1e-2,  # bf16 has 8 mantissa bits: 2^-8 ~ 4e-3 relative
    torch.float16: 2e-3,  # fp16 has 11: 2^-11 ~ 5e-4 relative
}


def save_pruned(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a (pruned) model with its tokenizer and generation config as safetensors.

    Args:
        model: the in-memory Hugging Face causal LM, already pruned with
            :func:`lorp.blocks.remove_blocks`. Leftover quantization state of a model whose
            weights are dense (a GGUF file dequantized at load time) is removed from it in place, since
            ``save_pretrained`` refuses to save while it is present.
        tokenizer: the model's tokenizer (anything with ``save_pretrained``), or ``None`` to skip it.
        out_dir: destination directory; created if missing, and must be empty if it exists.

    Returns:
        The output directory as a ``Path``.

    Raises:
        InvalidRequestError: ``out_dir`` exists and is not an empty directory (field ``"out_dir"``), or
            the model holds quantized weights that cannot be serialized (field ``"model.id"``).
    """
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise InvalidRequestError(f"output path {out} exists and is not a directory", field="out_dir")
        if any(out.iterdir()):
            raise InvalidRequestError(f"output directory {out} is not empty", field="out_dir")
    out.mkdir(parents=True, exist_ok=True)

    drop_leftover_quantization(model)
    # save_pretrained writes generation_config.json only when the model has one; models built from a
    # config (not loaded from a checkpoint) may lack it, and the artifact should always carry one.
    if getattr(model, "generation_config", None) is None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(out, safe_serialization=True)
    if not (out / "generation_config.json").exists() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _default_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    rel = _RELATIVE_TOLERANCE.get(dtype, 1e-2)
    scale = max(1.0, float(reference.detach().abs().max().item())) if reference.numel() else 1.0
    return rel * scale


def _pad_token_id(model: Any) -> int | None:
    gen = getattr(model, "generation_config", None)
    for source in (gen, model.config):
        if source is None:
            continue
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return None


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _check_probe(probe_input_ids: Any) -> None:
    if not isinstance(probe_input_ids, torch.Tensor) or probe_input_ids.dim() != 2 or probe_input_ids.numel() == 0:
        raise InvalidRequestError("probe_input_ids must be a non-empty [batch, seq] tensor", field="probe_input_ids")


def verify_reload(
    out_dir: str | Path,
    model: Any,
    probe_input_ids: torch.Tensor,
    *,
    atol: float | None = None,
    generate_tokens: int = 4,
) -> dict:
    """Reload a saved directory and check it is the same model as the in-memory one.

    The directory is reloaded with ``AutoModelForCausalLM.from_pretrained`` in the in-memory model's
    dtype and on its device (and attention implementation, so the kernels match). Checks, in order:
    the load report has no missing, unexpected or mismatched keys; the reloaded config's block count
    and block list length equal the in-memory ones; the max abs difference of the logits on
    ``probe_input_ids`` is within tolerance; greedy generation with the KV cache
    (``use_cache=True``) of ``generate_tokens`` new tokens from the first probe row gives the same tokens
    on both models.

    Args:
        out_dir: directory written by :func:`save_pruned`.
        model: the in-memory (pruned) causal LM; put in eval mode for the check, mode restored after.
        probe_input_ids: ``[batch, seq]`` token ids without padding; moved to the model's device.
        atol: absolute tolerance on the max abs logit difference. Default: relative to the largest
            reference logit magnitude (floor 1.0) times 1e-5 for fp32, 2e-3 for fp16, 1e-2 for bf16.
        generate_tokens: number of new tokens to generate greedily on both models (>= 1).

    Returns:
        ``{"max_abs_logit_diff": float, "num_layers": int, "generated_tokens": list[int]}`` where
        ``generated_tokens`` are the new tokens of the in-memory model (equal to the reloaded ones).

    Raises:
        ReloadCheckError: any check fails; the message says which, with the max diff where relevant.
        InvalidRequestError: ``probe_input_ids`` is not a non-empty 2-D tensor, or ``generate_tokens`` < 1.
    """
    from transformers import AutoModelForCausalLM

    _check_probe(probe_input_ids)
    if generate_tokens < 1:
        raise InvalidRequestError("generate_tokens must be at least 1", field="generate_tokens")

    layout = block_layout(model)
    num_layers = len(decoder_blocks(model))
    device = _model_device(model)
    dtype = next(model.parameters()).dtype
    ids = probe_input_ids.to(device)
    was_training = model.training
    model.eval()
    load_kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, **load_options(Path(out_dir))}
    attn_impl = getattr(model.config, "_attn_implementation", None)
    if attn_impl:
        load_kwargs["attn_implementation"] = attn_impl
    if device.type != "cpu":
        # Load straight onto the model's accelerator instead of staging a second copy in host memory.
        load_kwargs["device_map"] = device
    try:
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(str(out_dir), **load_kwargs)
            reloaded, info = loaded
        except Exception as exc:
            raise ReloadCheckError(f"the saved model at {out_dir} does not reload: {exc}") from exc
        try:
            reloaded.to(device)
            reloaded.eval()
            return _compare(
                model, reloaded, info, ids, layout.num_layers_attr, num_layers, dtype, atol, generate_tokens
            )
        finally:
            del reloaded, loaded
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        model.train(was_training)


def _compare(
    model: Any,
    reloaded: Any,
    info: dict,
    ids: torch.Tensor,
    num_layers_attr: str,
    num_layers: int,
    dtype: torch.dtype,
    atol: float | None,
    generate_tokens: int,
) -> dict:
    # Every structural problem is collected before raising so that the message carries the max logit
    # diff too: a stale block count shows up both as missing keys and as random logits.
    problems: list[str] = []
    report = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    for key, names in report.items():
        if names:
            problems.append(f"load report {key}: {names[:6]}{' ...' if len(names) > 6 else ''}")

    reloaded_count = getattr(reloaded.config, num_layers_attr, None)
    reloaded_blocks = len(decoder_blocks(reloaded))
    if reloaded_count != num_layers or reloaded_blocks != num_layers:
        problems.append(
            f"block count mismatch: in-memory model has {num_layers} blocks, reloaded config says "
            f"{num_layers_attr}={reloaded_count} and builds {reloaded_blocks} blocks"
        )

    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
        got = reloaded(input_ids=ids, use_cache=False).logits.float()
    max_diff = float("inf")
    if ref.shape != got.shape:
        problems.append(f"logits shape mismatch: in-memory {tuple(ref.shape)}, reloaded {tuple(got.shape)}")
    else:
        max_diff = float((ref - got).abs().max().item())
        tol = atol if atol is not None else _default_tolerance(dtype, ref)
        if not max_diff <= tol:  # also catches NaN
            problems.append(f"logits differ: max abs diff {max_diff:.3g} > tolerance {tol:.3g} ({dtype})")
    if problems:
        raise ReloadCheckError(
            f"the saved model does not reload to the in-memory model (max abs logit diff {max_diff:.3g}): "
            + "; ".join(problems)
        )

    prompt = ids[:1]
    pad = _pad_token_id(model)
    try:
        with torch.no_grad():
            expected = greedy_tokens(model, prompt, generate_tokens, pad)
    except Exception as exc:
        raise ReloadCheckError(
            f"cached generation fails on the in-memory model ({type(exc).__name__}: {exc}); are the blocks' "
            f"per-layer indices consistent with the config? (max abs logit diff {max_diff:.3g})"
        ) from exc
    try:
        with torch.no_grad():
            actual = greedy_tokens(reloaded, prompt, generate_tokens, pad)
    except Exception as exc:
        raise ReloadCheckError(
            f"cached generation fails on the reloaded model ({type(exc).__name__}: {exc}); "
            f"max abs logit diff {max_diff:.3g}"
        ) from exc
    if len(expected) != generate_tokens or expected != actual:
        raise ReloadCheckError(
            f"greedy generation with cache differs: in-memory {expected}, reloaded {actual} "
            f"(wanted {generate_tokens} new tokens; max abs logit diff {max_diff:.3g})"
        )
    return {"max_abs_logit_diff": max_diff, "num_layers": num_layers, "generated_tokens": expected}


def verify_reload_blockwise(out_dir: str | Path, model: Any, probe_input_ids: torch.Tensor) -> dict:
    """The reload check of a resident job whose device cannot hold a second copy of the pruned model:
    the written folder, run block by block through the execution layer (one block held), gives the
    in-memory pruned model's logits. Greedy generation with the KV cache is not checked this way
    (``generated_tokens`` is empty and ``mode`` says ``block by block``)."""
    _check_probe(probe_input_ids)
    device = _model_device(model)
    dtype = next(model.parameters()).dtype
    ids = probe_input_ids.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    result = _compare_blockwise(out_dir, expected, len(decoder_blocks(model)), ids, device, dtype)
    return {**result, "mode": "block by block"}


def _compare_blockwise(
    out_dir: str | Path,
    expected: torch.Tensor,
    num_layers: int,
    ids: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    *,
    mask: torch.Tensor | None = None,
    rows: slice | None = None,
    keep: torch.Tensor | None = None,
) -> dict:
    """Run the written folder block by block on ``ids`` (``mask``: all real where omitted) and compare
    its logits (of the windows ``rows`` at the positions ``keep``, where given) with ``expected``."""
    from transformers import AutoConfig

    from lorp.execution import Runner

    try:
        config = AutoConfig.from_pretrained(out_dir)
        reloaded = Runner.sequential(Path(out_dir), config, device=device, dtype=dtype)
    except Exception as exc:
        raise ReloadCheckError(f"the saved model at {out_dir} does not reload: {exc}") from exc
    problems = []
    missing = reloaded.onloader.missing() if reloaded.onloader is not None else []
    if missing:
        problems.append(f"weights missing from the written files: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    if reloaded.num_blocks != num_layers:
        problems.append(
            f"block count mismatch: the pruned model has {num_layers} blocks, "
            f"the written config builds {reloaded.num_blocks}"
        )
    max_diff = float("inf")
    if not problems:
        ids = ids.to(reloaded.device)
        batch = reloaded.batch(ids, torch.ones_like(ids) if mask is None else mask.to(reloaded.device))
        final = reloaded.run(batch)
        got = reloaded.logits(batch, final if rows is None else final[rows], keep=keep, rows=rows).float()
        max_diff = float((got - expected.to(got.device)).abs().max().item())
        tol = _default_tolerance(dtype, expected)
        if not max_diff <= tol:
            problems.append(f"logits differ: max abs diff {max_diff:.3g} > tolerance {tol:.3g} ({dtype})")
    if problems:
        raise ReloadCheckError(
            f"the saved model does not reload to the pruned computation (max abs logit diff {max_diff:.3g}): "
            + "; ".join(problems)
        )
    return {
        "max_abs_logit_diff": max_diff,
        "num_layers": num_layers,
        "generated_tokens": [],
        "block_loads": reloaded.block_loads,
    }


@dataclass
class PrunedLogits:
    """What the sequential reload check compares the written model with, taken in a pass the job runs
    anyway: the pruned model's evaluation hands over its first batch (:meth:`take`, a
    ``negative_log_likelihood(on_first_batch=...)``), whose tokens and the pruned computation's logits
    (of its first :attr:`windows` windows at its first :attr:`positions` positions) are kept. The check
    then loads only the written model's blocks, not the pruned view's a second time."""

    windows: int = 2
    positions: int = 32
    ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def rows(self) -> slice:
        return slice(0, self.windows)

    @property
    def keep(self) -> torch.Tensor:
        assert self.ids is not None
        return torch.arange(min(self.positions, int(self.ids.shape[1])))

    def take(self, view: Any, batch: Any, final: torch.Tensor) -> None:
        """Keep ``batch`` (a ``lorp.execution.Batch``) and the logits of ``final``, its state leaving the
        last block of the pruned ``view`` (a ``Runner.pruned`` view)."""
        self.ids, self.mask = batch.ids.cpu(), batch.mask.cpu()
        self.logits = view.logits(batch, final[self.rows], keep=self.keep, rows=self.rows).float().cpu()


def verify_reload_sequential(
    out_dir: str | Path,
    runner: Any,
    probe_input_ids: torch.Tensor,
    removed: Sequence[int],
    fits: Sequence[Any] = (),
    taken: PrunedLogits | None = None,
) -> dict:
    """The reload check of sequential execution: the written directory, run block by block through the
    execution layer, gives the logits the engine's pruned computation gives.

    Args:
        out_dir: the written pruned model.
        runner: the dense model's sequential ``lorp.execution.Runner``; spent afterwards (its weights
            outside the blocks are freed before the written model's are loaded, so that one copy is held).
        probe_input_ids: ``[batch, seq]`` token ids without padding, run through the pruned view here
            when ``taken`` holds nothing.
        removed, fits: the blocks removed and the heal maps folded (the pruned view that was written).
        taken: the pruned computation's logits on the first evaluation batch, kept by the pruned
            model's evaluation pass (:class:`PrunedLogits`): then the pruned view runs no block here.

    Checks that the written config builds the kept block count, that every weight it needs is in the
    written files, and that the max abs logit difference is within the dtype's tolerance. Greedy
    generation with the KV cache needs the model whole and is not checked here (``generated_tokens``
    is empty and ``mode`` says ``sequential``). ``probe`` says which windows were compared;
    ``block_loads`` counts the written model's blocks brought to the device.
    """
    dtype = runner.onloader.dtype
    num_layers = runner.num_blocks - len(set(removed))
    if taken is not None and taken.logits is not None:
        assert taken.ids is not None
        expected, ids, mask, rows, keep = taken.logits, taken.ids, taken.mask, taken.rows, taken.keep
        probe = "evaluation"
    else:
        ids = probe_input_ids.to(runner.device)
        batch = runner.batch(ids, torch.ones_like(ids))
        with runner.pruned(removed, fits) as view:
            expected = view.forward_logits(batch).float()
        mask, rows, keep, probe = None, None, None, "validation"
    # The job is done with the dense runner: its embeddings and head make room for the written model's.
    runner.onloader.unload_outside()
    result = _compare_blockwise(
        out_dir, expected, num_layers, ids, runner.device, dtype, mask=mask, rows=rows, keep=keep
    )
    return {**result, "mode": "sequential", "probe": probe}
