"""Plain JSON values from results that hold numpy (or torch) numbers and non-finite floats.

Torch-free and numpy-free itself: the report writer, the worker (JSON columns refuse NaN) and the
API (responses) all use these two functions.
"""

from __future__ import annotations

import math
from typing import Any


def finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (numpy scalars included), else None."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, int | float):
        try:
            value = value.item()
        except (TypeError, ValueError):  # an array of more than one element
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def json_safe(value: Any) -> Any:
    """Plain JSON: arrays and numpy/torch scalars unwrapped, NaN and infinities as null, keys as strings,
    anything else that JSON cannot hold as its ``str``."""
    if hasattr(value, "tolist") and callable(value.tolist):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)
