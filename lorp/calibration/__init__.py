"""Calibration and evaluation text: ``sources`` (where the documents come from) and ``windows`` (how
they become token windows). The names below are what the rest of the engine uses."""

from lorp.calibration.sources import Role, SourceKind, TextSource, load_texts, parse_source
from lorp.calibration.windows import (
    CalibrationData,
    TokenWindows,
    build_calibration,
    evaluation_windows,
    tokenize_stream,
)

__all__ = [
    "CalibrationData",
    "Role",
    "SourceKind",
    "TextSource",
    "TokenWindows",
    "build_calibration",
    "evaluation_windows",
    "load_texts",
    "parse_source",
    "tokenize_stream",
]
