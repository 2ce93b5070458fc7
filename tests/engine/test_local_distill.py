"""Block-local distillation (lorp.local_distill), what a sequential job's ``heal: distill`` runs.

- a resident and a sequential runner give the same trained weights, scores and verdict, the resident
  model is left as it was, and the sequential pass loads each block once and each anchor once more;
- the scores the pass reports are the pruned model's: the linear heal's equal the perplexity of the
  pruned view with the fits, the distilled model's that of the view with the trained folds;
- no steps, or a harmful learning rate, ship the fits unchanged and say why;
- a cancel between steps raises ``JobCancelled``;
- a bfloat16 checkpoint run in float32 holds its trained weights in bfloat16, as they are written.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import transformers

from lorp.errors import JobCancelled
from lorp.evaluation import perplexity
from lorp.execution import Runner
from lorp.execution.healed import TrainedFold
from lorp.local_distill import distill_locally, pruned_weight_names
from lorp.scoring import CachedHealer
from lorp.states import StateCache

from .helpers import tiny_llama, windows

TRAIN = windows(batch=8, length=24, seed=1)
VALIDATION = windows(batch=4, length=24, seed=2)
PLAN = [1, 3, 4]  # two cuts: [1, 2) after anchor 0, [3, 5) after anchor 2


@pytest.fixture(scope="module")
def runners(tmp_path_factory) -> tuple[Runner, Runner, list]:
    model = tiny_llama(6)
    folder: Path = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    resident = Runner(model)
    sequential = Runner.sequential(folder, model.config, device="cpu", dtype=torch.float32)
    fits = CachedHealer(resident, StateCache(resident, TRAIN, batch_size=4)).fits(PLAN)
    next(sequential.batches(TRAIN, 4))  # its first batch loads block 0 once to learn what a block returns
    return resident, sequential, fits


def _distil(runner: Runner, fits: list, **kwargs):
    kwargs = {"steps": 6, "batch_size": 4, "metric": "kl", "learning_rate": 5e-3, **kwargs}
    return distill_locally(runner, TRAIN, VALIDATION, removed=PLAN, fits=fits, **kwargs)


def test_resident_and_sequential_runners_train_the_same_anchors(runners) -> None:
    resident, sequential, fits = runners
    before = {k: v.clone() for k, v in resident.model.state_dict().items()}
    loads = sequential.block_loads
    got = {"resident": _distil(resident, fits), "sequential": _distil(sequential, fits)}
    assert sequential.block_loads - loads == 6 + 2  # each block once, each anchor once more
    assert all(torch.equal(v, resident.model.state_dict()[k]) for k, v in before.items())  # left dense
    (summary_r, shipped_r), (summary_s, shipped_s) = got["resident"], got["sequential"]
    assert summary_r.linear_kl == pytest.approx(summary_s.linear_kl, rel=1e-5)
    assert summary_r.distilled_kl == pytest.approx(summary_s.distilled_kl, rel=1e-5)
    assert summary_s.shipped == "distill" and summary_s.distilled_kl < summary_s.linear_kl
    assert (summary_s.scope, summary_s.loss, summary_s.blocks) == ("local", "state", [0, 1])
    assert summary_s.last_loss < summary_s.first_loss and 0 < summary_s.tokens <= 2 * 6 * 4 * 24
    assert [f.anchor for f in shipped_s] == [0, 2] and all(isinstance(f, TrainedFold) for f in shipped_s)
    for a, b in zip(shipped_r, shipped_s, strict=True):
        assert a.weights.keys() == b.weights.keys() and len(a.weights) == 7  # q, k, v, o, gate, up, down
        for name in a.weights:
            torch.testing.assert_close(a.weights[name], b.weights[name], rtol=0, atol=1e-6)
    names = pruned_weight_names(resident.model, PLAN, shipped_s)
    assert {n.rsplit(".", 3)[0] for n in names} == {"model.layers.0", "model.layers.1"}  # renumbered anchors


def test_the_scores_are_the_pruned_models_with_and_without_the_trained_weights(runners) -> None:
    resident, sequential, fits = runners
    for runner in (resident, sequential):
        summary, shipped = _distil(runner, fits, metric="perplexity")
        linear = perplexity(runner, VALIDATION, batch_size=4, removed=PLAN, fits=fits)
        distilled = perplexity(runner, VALIDATION, batch_size=4, removed=PLAN, fits=shipped)
        assert summary.linear_perplexity == pytest.approx(linear, rel=1e-5)
        assert summary.distilled_perplexity == pytest.approx(distilled, rel=1e-5)
        assert distilled < linear


def test_no_steps_or_a_harmful_learning_rate_ship_the_fits_unchanged(runners) -> None:
    _, sequential, fits = runners
    summary, shipped = _distil(sequential, fits, steps=0)
    assert shipped == list(fits) and summary.shipped == "linear" and summary.reason == "options.heal_steps is 0"
    assert summary.distilled_kl is None and math.isfinite(summary.linear_kl)
    summary, shipped = _distil(sequential, fits, learning_rate=20.0)
    assert shipped == list(fits) and summary.shipped == "linear"
    assert not summary.distilled_kl <= summary.linear_kl  # worse, or not a number at all
    assert "the linear heal ships" in summary.reason


def test_a_cancel_between_steps_raises(runners) -> None:
    resident, _, fits = runners
    before = {k: v.clone() for k, v in resident.model.state_dict().items()}
    calls = iter(range(100))
    with pytest.raises(JobCancelled, match="distilling"):
        _distil(resident, fits, steps=10, should_cancel=lambda: next(calls) >= 9)
    assert all(torch.equal(v, resident.model.state_dict()[k]) for k, v in before.items())


def test_a_bfloat16_checkpoint_run_in_float32_holds_its_trained_weights_as_stored(tmp_path) -> None:
    # A CPU runs a bfloat16 checkpoint in float32: the trained anchors' weights are held until the
    # checkpoint is written in the dtype it stores them in (half the bytes), and a pass puts them back
    # into the float32 block, so the scores are those of the weights written.
    tiny_llama(6).to(torch.bfloat16).save_pretrained(tmp_path)
    resident = Runner(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval())
    sequential = Runner.sequential(tmp_path, resident.model.config, device="cpu", dtype=torch.float32)
    fits = CachedHealer(resident, StateCache(resident, TRAIN, batch_size=4)).fits(PLAN)
    summary, shipped = _distil(sequential, fits, metric="perplexity")
    assert summary.shipped == "distill"
    weights = [value for fit in shipped for value in fit.weights.values()]
    assert len(weights) == 2 * 7 and {value.dtype for value in weights} == {torch.bfloat16}
    distilled = perplexity(sequential, VALIDATION, batch_size=4, removed=PLAN, fits=shipped)
    assert summary.distilled_perplexity == pytest.approx(distilled, rel=1e-5)
