"""How many decoder blocks a model has, read from its config or GGUF header without loading weights.

Torch-free on purpose: the API asks this before it accepts a job (a budget larger than the model's
eligible blocks is refused at submission), and the loader asks it before transformers builds a
single module (a config that claims a million blocks is refused at once).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorp.gguf_header import block_count, read_gguf_header

# Where each supported family's config keeps the count: most say num_hidden_layers, GPT-2 says
# n_layer; the others cover configs written by older or third-party tooling.
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# More decoder blocks than any published model has by two orders of magnitude: a claim beyond this
# is not believed.
MAX_BLOCKS = 10_000


def blocks_in_config(config: Mapping[str, Any]) -> int | None:
    """The block count a ``config.json`` claims (its own, else its ``text_config``'s), if any."""
    for holder in (config, config.get("text_config") or {}):
        if isinstance(holder, Mapping):
            for key in _LAYER_KEYS:
                value = holder.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
    return None


def blocks_in_gguf(path: Path) -> int | None:
    """The block count a GGUF file's metadata claims (``<architecture>.block_count``), if any.

    Reads the header only (tens of milliseconds for a 100 MB file); raises ``ModelLoadError`` for a
    file that is not a readable GGUF.
    """
    return block_count(read_gguf_header(path))


def plausible(count: int | None) -> int | None:
    """``count`` when it is a block count a real model could have, else None."""
    return count if count is not None and 1 <= count <= MAX_BLOCKS else None
