"""Checks a job's budget against its model's depth at submission, where the depth can be known cheaply.

The block count is read without loading any weights: the demo model's GGUF header, a local
directory's ``config.json`` or a local ``.gguf`` header, the ``config.json`` under an ``s3://``
model prefix, or a hub model's ``config.json`` that is already in the local Hugging Face cache. Where
none of these answers (a hub model never downloaded here, an ``s3://`` GGUF, storage unreachable),
the job is accepted and the worker checks the budget right after loading, before any pass.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from app.core import client_json
from app.core.config import Settings
from app.core.errors import Unprocessable
from app.jobspec import JobCreate, ModelLocation, ModelRef
from app.storage import StorageError, model_folder_store
from lorp.depth import blocks_in_config, blocks_in_gguf, plausible
from lorp.errors import BudgetError, EngineError, InvalidRequestError
from lorp.foldable import fold_refusal
from lorp.options import folds_maps
from lorp.selection import protected_set
from lorp.spec import curve_refusal, execution_refusal

logger = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1 << 20


@functools.lru_cache(maxsize=256)
def _gguf_blocks(path: str, size: int, mtime_ns: int) -> int | None:
    # Keyed by size and mtime as well: a file replaced in place is read again.
    return blocks_in_gguf(Path(path))


def _gguf_file_blocks(path: Path) -> int | None:
    stat = path.stat()
    return _gguf_blocks(str(path), stat.st_size, stat.st_mtime_ns)


def _config_dict(raw: bytes) -> dict[str, Any] | None:
    # Bounded nesting: a config.json of 100,000 nested arrays would otherwise end the request in a
    # RecursionError; refused here (a ValueError), its depth is left for the worker to report.
    config = client_json.loads(raw)
    return config if isinstance(config, dict) else None


def known_config(ref: ModelRef, location: ModelLocation, settings: Settings) -> dict[str, Any] | None:
    """The model's ``config.json`` where it can be read without loading weights (not for GGUF), else None."""
    try:
        directory: Path | None = location.path
        if location.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref.id, "config.json", revision=ref.revision)
            directory = Path(cached).parent if isinstance(cached, str) else None
        elif location.s3 is not None:
            store = model_folder_store(location.s3, settings)
            if store.size("config.json") > MAX_CONFIG_BYTES:
                return None
            with store.open("config.json") as fh:
                return _config_dict(fh.read(MAX_CONFIG_BYTES + 1))
        if directory is None or not (directory / "config.json").is_file():
            return None
        if (directory / "config.json").stat().st_size > MAX_CONFIG_BYTES:
            return None
        return _config_dict((directory / "config.json").read_bytes())
    except (ImportError, OSError, ValueError, StorageError) as exc:
        logger.debug("config of %s not known at submission: %s", ref.id, exc)
        return None


def known_block_count(ref: ModelRef, location: ModelLocation, settings: Settings) -> int | None:
    """The model's decoder block count where it can be read without loading weights, else None."""
    try:
        if location.kind == "demo":
            from lorp.assets.packaged import demo_gguf_path

            count = _gguf_file_blocks(demo_gguf_path())
        elif location.path is not None and location.path.suffix == ".gguf":
            count = _gguf_file_blocks(location.path)
        else:
            config = known_config(ref, location, settings)
            count = blocks_in_config(config) if config is not None else None
    except (OSError, ValueError, StorageError, EngineError) as exc:
        # Missing or unreadable: the worker loads the model and reports what is wrong with it.
        logger.debug("block count of %s not known at submission: %s", ref.id, exc)
        return None
    return plausible(count)


def _allowed_ratios(eligible: int, num_blocks: int) -> str:
    low, high = 1 / num_blocks, (eligible + 1) / num_blocks
    return f"{low:.4g} <= target.ratio < {high:.4g}"


def check_budget(spec: JobCreate, num_blocks: int, model: str) -> None:
    """Refuse a target or option the model's depth cannot satisfy, naming the field and the allowed range."""
    options = spec.options
    try:
        protected = sorted(protected_set(num_blocks, options))
    except InvalidRequestError as exc:
        raise Unprocessable(
            f"{model} has {num_blocks} decoder blocks: {exc.message}", field="options.protected_layers"
        ) from None
    eligible = num_blocks - len(protected)
    guarded = f"blocks {protected} are protected" if protected else "no block is protected"
    where = f"{model} has {num_blocks} decoder blocks and {guarded}, so {eligible} can be removed"
    if eligible < 1:
        raise Unprocessable(f"{where}; protect fewer blocks", field="options.protected_layers")
    target = spec.target
    if target.num_layers is not None and target.num_layers > eligible:
        raise Unprocessable(
            f"cannot remove {target.num_layers} blocks: {where}; choose 1 <= target.num_layers <= {eligible}",
            field="target.num_layers",
        )
    if target.ratio is not None:
        try:
            n = target.blocks_for(num_blocks)
        except BudgetError:
            n = 0
        if n > eligible or n < 1:
            raise Unprocessable(
                f"target.ratio {target.ratio} of {num_blocks} blocks is {n} blocks (rounded down): {where}; "
                f"choose {_allowed_ratios(eligible, num_blocks)}",
                field="target.ratio",
            )
    for i, budget in enumerate(spec.evaluation.curve_budgets or []):
        if budget > eligible:
            raise Unprocessable(
                f"the budget curve cannot remove {budget} blocks: {where}", field=f"evaluation.curve_budgets.{i}"
            )
    k = spec.options.num_clusters
    if k is not None and not 2 <= k <= num_blocks - 2:
        raise Unprocessable(
            f"{model} has {num_blocks} decoder blocks: choose 2 <= options.num_clusters <= {num_blocks - 2}",
            field="options.num_clusters",
        )


def check_heal(spec: JobCreate, location: ModelLocation, settings: Settings) -> None:
    """Refuse ``options.heal`` ``linear`` (or ``distill``, which starts from the linear maps) where the
    model's config says a map cannot be folded."""
    heal = spec.options.heal
    if not folds_maps(heal):
        return
    config = known_config(spec.model, location, settings)
    if config is None:
        return
    why = fold_refusal(config.get("model_type"), config)
    if why is not None:
        raise Unprocessable(
            f"options.heal {heal!r} cannot be applied to model {spec.model.id!r}: {why}; use 'none'",
            field="options.heal",
        )


def check_execution(spec: JobCreate) -> None:
    """Refuse what ``options.execution`` cannot give: lm-eval tasks in a sequential run, and a sequential
    run of a GGUF file (its weights are not safetensors a block can be read from); and a curve drawn
    distilled (``evaluation.curve_distill``) in a job that does not distil."""
    evaluation = spec.evaluation
    refusal = execution_refusal(spec.options.execution, len(evaluation.tasks)) or curve_refusal(
        spec.options.heal, evaluation.curve_distill, evaluation.curve_budgets
    )
    if refusal is not None:
        raise Unprocessable(refusal[0], field=refusal[1])
    if spec.options.execution == "sequential" and spec.model.id.lower().endswith(".gguf"):
        raise Unprocessable(
            "options.execution 'sequential' reads safetensors weights a block at a time, and a GGUF model has "
            "none: use 'auto' or 'resident'",
            field="options.execution",
        )


def check_against_model(spec: JobCreate, location: ModelLocation, settings: Settings) -> None:
    """``check_budget`` where the model's depth is known, and ``check_heal`` where its config is;
    otherwise the worker checks after loading."""
    num_blocks = known_block_count(spec.model, location, settings)
    if num_blocks is not None:
        check_budget(spec, num_blocks, f"model {spec.model.id!r}")
    check_heal(spec, location, settings)
