"""The demo model: SmolLM2-135M-Instruct's GGUF converted once into a safetensors Hugging Face directory.

The rest of the engine then loads it like any other local model (``model.id`` ``demo``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lorp.assets.cache import cache_dir, file_lock, source_sha256
from lorp.assets.packaged import demo_gguf_path
from lorp.errors import ModelLoadError

# Bump whenever the converted directory's layout changes: an old conversion is then redone.
_DEMO_FORMAT_VERSION = 1
_MARKER = ".lorp-complete"


def _is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished conversion in the current layout (its marker is written last)."""
    try:
        marker = json.loads((path / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == _DEMO_FORMAT_VERSION


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save it as a safetensors Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lorp.pretrained import PLAIN_MODULES, drop_leftover_quantization

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **PLAIN_MODULES)
    except Exception as exc:  # transformers raises many types here; the caller needs one
        raise ModelLoadError(f"could not load the GGUF file {gguf}: {exc}", field="model.id") from exc
    # The weights are already dequantized to fp32, but transformers still marks the model as
    # gguf-quantized and refuses to serialize it: without the marks it saves as an ordinary model.
    drop_leftover_quantization(model)
    # The GGUF tokenizer carries no length limit; without one every long calibration document
    # triggers a "sequence longer than the maximum" warning.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_positions > 0:
        tokenizer.model_max_length = max_positions
    if model.generation_config is None:
        model.generation_config = GenerationConfig.from_model_config(model.config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    model.generation_config.save_pretrained(str(out_dir))


def demo_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The demo model as a safetensors Hugging Face directory, converted from the GGUF once.

    The directory is ``cache_dir()/models/<gguf stem>-<first 12 hex of the GGUF's sha256>/`` and holds
    the fp32 weights, config, tokenizer (with its chat template) and generation config. The
    conversion (~20 s on a CPU) runs in a temporary directory next to the target under a file lock,
    writes a marker file last and is renamed into place atomically: a crashed or concurrent
    conversion can never leave a directory that is taken as done.

    Args:
        progress: called with a short human-readable line at each step (conversion only); ``None``
            for silence.

    Returns:
        The converted directory, loadable with ``AutoModelForCausalLM.from_pretrained(path)``.
    """
    say = progress or (lambda _msg: None)
    gguf = demo_gguf_path()
    digest = source_sha256(gguf)
    models = cache_dir() / "models"
    target = models / f"{gguf.stem}-{digest[:12]}"
    if _is_complete(target):
        return target
    with file_lock(models / f".{target.name}.lock"):
        # Another process may have finished the conversion while this one waited for the lock.
        if _is_complete(target):
            return target
        # Holding the lock, any leftover temporary directory belongs to a dead conversion.
        for stale in models.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=models))
        try:
            say(f"converting {gguf.name} to safetensors in {target} (once, ~20 s)")
            started = time.perf_counter()
            _convert_gguf(gguf, tmp)
            marker = {
                "source": str(gguf),
                "source_sha256": digest,
                "format_version": _DEMO_FORMAT_VERSION,
                "seconds": round(time.perf_counter() - started, 1),
            }
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            # mkdtemp and the safetensors writer create owner-only modes; a shared cache (a volume
            # mounted into several containers) needs the usual readable ones.
            tmp.chmod(0o755)
            for item in tmp.rglob("*"):
                item.chmod(0o755 if item.is_dir() else 0o644)
            if target.exists():
                # A directory without the marker is a leftover of something unfinished.
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"demo model ready in {target} ({marker['seconds']} s)")
    return target
