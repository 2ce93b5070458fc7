"""The plan comparison chart: a real PNG with the chosen plan drawn in its own colour, and a second
panel for task scores only when tasks were measured."""

from __future__ import annotations

import numpy as np
from matplotlib.image import imread

from lorp.report import plot_plans

SCORES = {"lorp": 2592.1, "shortgpt": 23.9, "streamline": 24.8, "streamline_3": 22.2, "reverse": 51394.7, "x": None}
CHOSEN_RGB = np.array([214, 39, 40]) / 255  # the chosen bar's colour


def _chosen_pixels(path) -> int:
    image = imread(path)[..., :3]
    return int((np.abs(image - CHOSEN_RGB).max(axis=-1) < 0.02).sum())


def test_the_chosen_plan_is_marked_and_tasks_add_a_panel(tmp_path) -> None:
    plain = plot_plans(tmp_path / "plain.png", SCORES, chosen="streamline_3", title="auto at 4 of 30")
    with_tasks = plot_plans(
        tmp_path / "tasks.png",
        SCORES,
        chosen="streamline_3",
        tasks=[("lorp_cloze acc", 0.6, 0.5), ("lorp_cloze acc_norm", 0.62, None)],
    )
    none_chosen = plot_plans(tmp_path / "none.png", SCORES, chosen="not_a_candidate")
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _chosen_pixels(plain) > 200 and _chosen_pixels(none_chosen) == 0
    assert imread(with_tasks).shape[1] > 1.8 * imread(plain).shape[1]  # a second panel beside the first
