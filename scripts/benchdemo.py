"""The setup the demo benches share: the demo model, seeded; its built-in calibration windows built
the way a job builds them (``lorp.pipeline``'s validation slice included) or all for the capture
(the healing benches'); the held-out windows of the built-in evaluation text; and the capture timed,
with the states heal maps are fitted on kept as a job keeps them."""

from __future__ import annotations

import time
from typing import Any

import torch

from lorp import calibration as cal
from lorp.loading import LoadedModel, load_model
from lorp.planner import heal_windows, hidden_size
from lorp.similarity import SimilarityStats, capture_similarity
from lorp.spec import CalibrationSpec
from lorp.states import StateCache, StateSink


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


def capture_calibration(tokenizer: Any, num_samples: int, seq_len: int) -> cal.CalibrationData:
    """The built-in calibration windows, every one captured (no validation slice)."""
    texts = cal.load_texts(cal.parse_source("builtin"), role="calibration")
    return cal.build_calibration(tokenizer, texts, num_samples=num_samples, seq_len=seq_len, seed=0)


def held_out_windows(tokenizer: Any, seq_len: int, max_windows: int) -> cal.TokenWindows:
    """The held-out windows of the built-in evaluation text."""
    texts = cal.load_texts(cal.parse_source("builtin"), role="evaluation")
    return cal.evaluation_windows(tokenizer, texts, seq_len=seq_len, max_windows=max_windows)


def timed_capture(model: Any, windows: cal.TokenWindows, batch_size: int) -> tuple[SimilarityStats, StateCache, float]:
    """One capture of S and D on ``windows``, keeping the dense states heal maps are fitted on (as a job
    keeps them): the statistics, that state cache and the capture's wall seconds."""
    sink = StateSink(heal_windows(windows, hidden_size(model)).num_windows, batch_size, model.dtype)
    started = time.perf_counter()
    stats = capture_similarity(model, windows, batch_size=batch_size, keep_states=sink)
    return stats, sink.cache(), time.perf_counter() - started
