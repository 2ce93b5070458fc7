"""The steps of a pruning run, in order; progress callbacks name them. Torch-free (the service shows them)."""

from __future__ import annotations

import enum


class Stage(enum.StrEnum):
    loading = "loading"
    calibration = "calibration"
    capture = "capture"
    selection = "selection"
    budget_curve = "budget_curve"
    evaluating_dense = "evaluating_dense"
    pruning = "pruning"
    distilling = "distilling"
    evaluating_pruned = "evaluating_pruned"
    saving = "saving"
    verifying = "verifying"
    reporting = "reporting"


STAGES: tuple[Stage, ...] = tuple(Stage)
