"""The setup the plan benches share: the demo model, seeded, and its built-in calibration windows
built the way a job builds them (``lorp.pipeline``'s validation slice included)."""

from __future__ import annotations

from typing import Any

import torch

from lorp import calibration as cal
from lorp.loading import LoadedModel, load_model
from lorp.spec import CalibrationSpec


def demo_model() -> LoadedModel:
    torch.manual_seed(0)
    return load_model("demo", device="cpu")


def demo_calibration(tokenizer: Any, spec: CalibrationSpec, num_training: int = 0) -> cal.CalibrationData:
    return cal.build_calibration(
        tokenizer,
        cal.load_texts(cal.parse_source("builtin"), role="calibration"),
        num_samples=spec.num_samples,
        seq_len=spec.seq_len,
        seed=0,
        validation_fraction=spec.validation_fraction,
        max_validation_windows=spec.validation_windows,
        num_training=num_training,
    )
