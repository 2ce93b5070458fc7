"""The whole job on a tiny local model: outputs, report, reload, early validation, cancel, reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as safe_load
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lorp.calibration import CalibrationData, TokenWindows
from lorp.errors import BudgetError, InvalidRequestError, JobCancelled, ModelLoadError
from lorp.foldable import fold_refusal
from lorp.pipeline import NOT_IN_CAPTURE, calibration_fingerprint, run_analysis, run_prune
from lorp.result import ChosenPlan
from lorp.spec import (
    CalibrationSpec,
    EvaluationSpec,
    SelectionOptions,
    TargetSpec,
)
from lorp.stages import STAGES

from .archs import six_blocks, upcycled_mixtral, write_mxfp4_gpt_oss
from .helpers import make_spec


def test_run_prune_auto_writes_a_reloadable_model_and_a_full_report(tiny_model_dir, corpus_files, tmp_path):
    seen: list[tuple[str, float]] = []
    result = run_prune(
        make_spec(tiny_model_dir, corpus_files), tmp_path / "run", progress=lambda s, f: seen.append((s, f))
    )
    out = result.out_dir
    charts = {"heatmap.png", "plans.png", "budgets.png"}
    assert {p.name for p in out.iterdir()} == {"model", "analysis.npz", "report.json", *charts}
    assert (out / "model" / "model.safetensors").is_file()
    assert not list((out / "model").glob("*.bin"))
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in charts)

    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "auto"
    chosen = report["chosen"]
    assert len(chosen["pruned_layers"]) == 2
    assert not {0, 7} & set(chosen["pruned_layers"])
    # Only auto's finalists are measured in full; the other candidates were screened.
    scores = {k: v["validation_perplexity"] for k, v in report["plans"].items() if v["validation_perplexity"]}
    assert chosen["candidate"] in scores and scores[chosen["candidate"]] == min(scores.values())
    assert report["plans"][chosen["candidate"]]["pruned_layers"] == chosen["pruned_layers"]
    assert len(report["analysis"]["clusters"]) == 8
    assert report["metrics"]["dense"]["num_layers"] == 8
    assert report["metrics"]["pruned"]["num_layers"] == 6
    assert report["metrics"]["dense"]["perplexity"] > 1
    assert report["metrics"]["speedup_bound"] == pytest.approx(8 / 6)
    prov = report["provenance"]
    assert prov["model"]["kind"] == "local" and len(prov["model"]["weights_sha256"]) == 64
    assert prov["calibration"]["num_samples"] == 8 and prov["calibration"]["seq_len"] == 32
    assert prov["libraries"]["torch"] and prov["libraries"]["transformers"]
    assert report["reload_check"]["max_abs_logit_diff"] <= 1e-5
    # The budget curve: each one-pass method at 1 and 2 blocks, scored as the candidates were.
    curve = report["budget_curve"]
    assert report["heal"]["method"] == "linear" and curve["healed"] is True
    assert {(p["method"], p["budget"]) for p in curve["points"]} == {
        (m, n) for m in ("lorp", "shortgpt", "streamline", "angular") for n in (1, 2)
    }
    at_budget = {p["method"]: p for p in curve["points"] if p["budget"] == 2}
    for method, point in at_budget.items():
        assert point["pruned_layers"] == report["plans"][method]["pruned_layers"]
        full = report["plans"][method]["validation_perplexity"]
        # a finalist's own score (healed alike), not measured again; a screened candidate measured in full
        assert point["validation_perplexity"] == full if full is not None else point["validation_perplexity"] > 1
    assert curve["dense_validation_perplexity"] > 1  # (a random tiny model: cuts need not raise it)
    assert report["files"]["budget_curve"] == "budgets.png"

    with np.load(out / "analysis.npz") as data:
        assert data["S"].shape == (9, 9) and data["D"].shape == (9, 9)
        np.testing.assert_allclose(data["S"], result.stats.S)

    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 6
    assert list(dict.fromkeys(stage for stage, _ in seen)) == [s for s in STAGES if s != "distilling"]  # linear
    assert all(0.0 <= f <= 1.0 for _, f in seen)


def test_named_method_and_ratio(tiny_model_dir, corpus_files, tmp_path):
    spec = make_spec(
        tiny_model_dir,
        corpus_files,
        method="reverse",
        target=TargetSpec(ratio=0.3),  # floor(0.3 * 8) = 2
        evaluation=EvaluationSpec(perplexity=False, speed=False, curve_budgets=[]),
    )
    report = run_prune(spec, tmp_path / "rev").report
    assert report.budget_curve is None and "budget_curve" not in report.files
    assert not (tmp_path / "rev" / "budgets.png").exists()
    assert report.chosen == ChosenPlan(candidate="reverse", pruned_layers=[5, 6])
    # a named method's plan is still scored on the validation windows, healed as it ships
    assert list(report.plans) == ["reverse"] and report.plans["reverse"].validation_perplexity is not None
    assert report.heal.method == "linear" and [s["anchor"] for s in report.heal.spans] == [4]
    on_disk = json.loads((tmp_path / "rev" / "report.json").read_text())
    assert on_disk["chosen"] == {"candidate": "reverse", "pruned_layers": [5, 6]}
    assert "decode_speedup" not in on_disk["metrics"]  # not measured: left out, not null


def test_budget_is_checked_before_any_forward_pass(tiny_model_dir, corpus_files, tmp_path, monkeypatch):
    import lorp.pipeline as pipeline

    def must_not_run(*_a, **_k):
        raise AssertionError("capture ran before the budget was validated")

    monkeypatch.setattr(pipeline, "capture_similarity", must_not_run)
    with pytest.raises(BudgetError) as err:
        run_prune(make_spec(tiny_model_dir, corpus_files, target=TargetSpec(num_layers=7)), tmp_path / "a")
    assert err.value.field == "target.num_layers"
    with pytest.raises(InvalidRequestError) as err:
        run_prune(
            make_spec(tiny_model_dir, corpus_files, options=SelectionOptions(num_clusters=7)),
            tmp_path / "b",
        )
    assert err.value.field == "options.num_clusters"
    with pytest.raises(BudgetError):
        run_prune(make_spec(tiny_model_dir, corpus_files, target=TargetSpec(ratio=0.1)), tmp_path / "c")
    with pytest.raises(InvalidRequestError) as err:  # 6 of the 8 blocks may go, not 7
        run_prune(
            make_spec(tiny_model_dir, corpus_files, evaluation=EvaluationSpec(curve_budgets=[2, 7])), tmp_path / "d"
        )
    assert err.value.field == "evaluation.curve_budgets.1"


def test_cancel_stops_the_run_and_refuses_nonempty_out(tiny_model_dir, corpus_files, tmp_path):
    calls = {"n": 0}

    def cancel_during_capture() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(JobCancelled):
        run_prune(make_spec(tiny_model_dir, corpus_files), tmp_path / "x", should_cancel=cancel_during_capture)
    assert not (tmp_path / "x" / "model").exists()
    with pytest.raises(InvalidRequestError) as err:
        run_prune(make_spec(tiny_model_dir, corpus_files), tmp_path)  # holds "x"
    assert err.value.field == "out"


def test_precomputed_analysis_is_reused(tiny_model_dir, corpus_files, tmp_path):
    spec = make_spec(tiny_model_dir, corpus_files, method="shortgpt", evaluation=EvaluationSpec(speed=False))
    stats, provenance = run_analysis(spec.model, spec.calibration)
    first = run_prune(spec, tmp_path / "one")
    assert provenance["fingerprint"] == first.report.fingerprint
    np.testing.assert_allclose(stats.S, first.stats.S, atol=1e-12)
    import lorp.pipeline as pipeline

    original = pipeline.capture_similarity
    pipeline.capture_similarity = None  # type: ignore[assignment]
    asked: list[str] = []

    def lookup(fingerprint: str):
        asked.append(fingerprint)
        return (stats, provenance) if fingerprint == provenance["fingerprint"] else None

    sequential = spec.model_copy(update={"options": spec.options.model_copy(update={"execution": "sequential"})})
    try:
        second = run_prune(spec, tmp_path / "two", lookup_analysis=lookup)
        # Sequential, no capture ran to keep the heal windows' states: a pass of its own stores them.
        third = run_prune(sequential, tmp_path / "three", lookup_analysis=lookup)
    finally:
        pipeline.capture_similarity = original
    assert asked == [provenance["fingerprint"]] * 2
    assert second.report.analysis_reused is True
    assert second.report.chosen == first.report.chosen
    assert third.report.analysis_reused is True and third.report.execution.mode == "sequential"
    assert third.report.chosen == first.report.chosen
    assert third.report.heal.method == first.report.heal.method == "linear" and third.report.heal.spans
    assert third.report.metrics.pruned["perplexity"] == pytest.approx(
        first.report.metrics.pruned["perplexity"], rel=1e-4
    )


def test_pickled_weights_are_refused(tmp_path):
    cfg = LlamaConfig(vocab_size=384, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    state = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    from lorp.loading import load_model

    with pytest.raises(ModelLoadError) as err:
        load_model(str(tmp_path), device="cpu")
    assert "pickled" in err.value.message and err.value.field == "model.id"


def test_the_heatmap_title_names_the_plan_that_won() -> None:
    from lorp.pipeline import _heatmap_title

    assert _heatmap_title("demo", "auto", "shortgpt", [12, 13]) == "demo: auto chose shortgpt, removing blocks [12, 13]"
    # A local path shows as its folder name, not the worker's work folder.
    assert _heatmap_title("/srv/work/job/model-source", "lorp", "lorp", [3]).startswith("model-source: lorp,")
    assert (
        _heatmap_title("demo", "search", "search", [5, 6], healed=True)
        == "demo: search, removing blocks [5, 6] (healed)"
    )
    assert _heatmap_title("demo", "search", "shortgpt", [5]).startswith("demo: search chose shortgpt,")


def test_a_bfloat16_checkpoint_is_written_in_bfloat16_with_its_heal_folded(
    tiny_model_dir, corpus_files, tmp_path, tiny_tokenizer
):
    # On a CPU the engine runs float32; the pruned checkpoint keeps the source's dtype, and the folded
    # projection is rounded in memory too, so the reload check compares the very model that ships.
    source = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    result = run_prune(make_spec(source, corpus_files, method="reverse"), tmp_path / "run")
    report = json.loads((result.out_dir / "report.json").read_text())
    assert report["provenance"]["model"]["dtype"] == "float32"
    assert report["chosen"]["pruned_layers"] == [5, 6]
    assert report["heal"]["method"] == "linear"

    model_dir = result.out_dir / "model"
    written = safe_load(model_dir / "model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    dense = safe_load(source / "model.safetensors")
    assert not torch.equal(written["model.layers.4.mlp.down_proj.weight"], dense["model.layers.4.mlp.down_proj.weight"])
    assert torch.equal(written["model.layers.5.mlp.up_proj.weight"], dense["model.layers.7.mlp.up_proj.weight"])
    assert report["reload_check"]["max_abs_logit_diff"] <= 1e-5


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return safe_load(model_dir / "model.safetensors")


def test_a_sequential_job_gives_the_resident_jobs_plan_statistics_and_checkpoint(
    tiny_model_dir, corpus_files, tmp_path
):
    runs = {}
    for mode in ("resident", "sequential"):
        # Ranked by KL: the sequential scorer reads the dense final states from its store on disk.
        options = SelectionOptions(execution=mode, heal="linear", selection_metric="kl")
        runs[mode] = run_prune(make_spec(tiny_model_dir, corpus_files, options=options), tmp_path / mode)
    resident, sequential = runs["resident"], runs["sequential"]
    np.testing.assert_allclose(sequential.stats.S, resident.stats.S, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sequential.stats.D, resident.stats.D, rtol=0, atol=1e-6)
    r, s = resident.report, sequential.report
    assert s.chosen == r.chosen and s.heal.method == r.heal.method == "linear"
    for name, plan in r.plans.items():
        assert s.plans[name].pruned_layers == plan.pruned_layers
        if plan.validation_perplexity is None:  # screened only, in both modes
            assert s.plans[name].validation_perplexity is None and s.plans[name].validation_kl is None
        else:
            assert s.plans[name].validation_perplexity == pytest.approx(plan.validation_perplexity, rel=1e-5)
            assert plan.validation_kl is not None and plan.validation_kl > 0
            assert s.plans[name].validation_kl == pytest.approx(plan.validation_kl, rel=1e-4, abs=1e-7)
    measured = {name: plan.validation_kl for name, plan in r.plans.items() if plan.validation_kl is not None}
    assert measured[r.chosen.candidate] == min(measured.values())
    for key in ("perplexity", "num_layers", "num_parameters"):
        assert s.metrics.dense[key] == pytest.approx(r.metrics.dense[key], rel=1e-5), key
        assert s.metrics.pruned[key] == pytest.approx(r.metrics.pruned[key], rel=1e-5), key
    # The divergence from the dense predictions, pruned only, alike in both modes.
    for key in ("kl_mean", "kl_p99", "top1_agreement"):
        assert key not in r.metrics.dense and key not in s.metrics.dense
        assert s.metrics.pruned[key] == pytest.approx(r.metrics.pruned[key], rel=1e-4, abs=1e-7), key
    assert r.metrics.pruned["kl_mean"] > 0 and 0 < r.metrics.pruned["top1_agreement"] < 1
    assert r.metrics.pruned["kl_p99"] >= r.metrics.pruned["kl_mean"]
    # The same checkpoint: the same tensor names, values and config.
    got, expected = _tensors(sequential.model_dir), _tensors(resident.model_dir)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
    config = json.loads((sequential.model_dir / "config.json").read_text())
    assert config == json.loads((resident.model_dir / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(sequential.model_dir)
    assert reloaded.config.num_hidden_layers == 6

    # What ran, and what the sequential run did not measure.
    assert (r.execution.mode, r.execution.requested, r.execution.block_loads) == ("resident", "resident", 0)
    assert (s.execution.mode, s.execution.requested) == ("sequential", "sequential")
    assert s.execution.block_loads > 8
    assert [line.split(":")[0] for line in s.execution.skipped] == [
        "evaluation.speed",
        "evaluation.prompts",
    ]
    assert "decode_tokens_per_s" not in s.metrics.pruned and s.generations == []
    assert r.generations and not r.execution.skipped
    assert s.reload_check["mode"] == "sequential"
    assert s.reload_check["max_abs_logit_diff"] <= 1e-4
    # Compared with the logits the pruned model's evaluation gave, so the check loads only the written
    # model's 6 blocks (and block 0 again to learn its output); the job's count includes them.
    assert (s.reload_check["probe"], s.reload_check["block_loads"]) == ("evaluation", 7)
    # Where the loads went: they add up to the job's; the dense evaluation rode the validation pass.
    by_stage = s.execution.block_loads_by_stage
    assert sum(by_stage.values()) == s.execution.block_loads and by_stage["verifying"] == 7
    assert by_stage["evaluating_dense"] == 0 and by_stage["evaluating_pruned"] == 6
    assert by_stage["capture"] == 8 + 1 and r.execution.block_loads_by_stage == {}  # 8 blocks, block 0 again
    on_disk = json.loads((sequential.out_dir / "report.json").read_text())["execution"]
    assert on_disk["mode"] == "sequential" and on_disk["block_loads"] == s.execution.block_loads


# Each family's MLP output weights in a checkpoint: every expert's down projection stored apart
# (Mixtral's w2, Qwen2-MoE's with its shared expert's), or stacked with a bias per expert (gpt-oss).
_EXPERT_OUTPUTS = {
    "mixtral": [f"block_sparse_moe.experts.{e}.w2.weight" for e in range(4)],
    "qwen2_moe": [f"mlp.experts.{e}.down_proj.weight" for e in range(4)] + ["mlp.shared_expert.down_proj.weight"],
    "gpt_oss": ["mlp.experts.down_proj", "mlp.experts.down_proj_bias"],
}


@pytest.mark.parametrize("name", sorted(_EXPERT_OUTPUTS))
def test_a_mixture_of_experts_job_heals_its_cut_into_every_expert_in_both_modes(
    name, corpus_files, tmp_path, tiny_tokenizer
):
    source = tmp_path / "source"
    model, g = six_blocks(name), torch.Generator().manual_seed(0)
    with torch.no_grad():  # biases start at zero (gpt-oss's experts'): give the fold something to change
        for parameter in (p for n, p in model.named_parameters() if n.endswith("bias") and not p.any()):
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=g))
    model.save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    evaluation = EvaluationSpec(dataset=f"{corpus_files[1]}#body", max_windows=6, speed=False, prompts=[])
    calibration = CalibrationSpec(dataset=str(corpus_files[0]), num_samples=32, seq_len=32, batch_size=8)

    def job(heal: str, mode: str = "auto"):
        options = SelectionOptions(execution=mode, heal=heal, selection_metric="kl")
        spec = make_spec(source, corpus_files, method="reverse", options=options, calibration=calibration)
        return run_prune(spec.model_copy(update={"evaluation": evaluation}), tmp_path / f"{heal}-{mode}").report

    runs = {mode: job("linear", mode) for mode in ("resident", "sequential")}
    resident, sequential = runs["resident"], runs["sequential"]
    for report in (resident, sequential):
        assert report.heal.method == "linear" and report.chosen.pruned_layers == [3, 4], report.heal
        assert report.reload_check["max_abs_logit_diff"] <= 1e-4  # the checkpoint computes what was measured
    assert sequential.metrics.pruned["perplexity"] == pytest.approx(resident.metrics.pruned["perplexity"], rel=1e-5)
    dense = _tensors(source)
    written = {mode: _tensors(tmp_path / f"linear-{mode}" / "model") for mode in runs}
    for mode, tensors in written.items():
        for rest in _EXPERT_OUTPUTS[name]:  # the anchor, block 2: every expert output folded
            key = f"model.layers.2.{rest}"
            assert not torch.equal(tensors[key], dense[key]), (mode, key)
        for key, value in tensors.items():  # nothing else changed: block 5 is now block 3
            if not any(key == f"model.layers.2.{rest}" for rest in _EXPERT_OUTPUTS[name]):
                old = key.replace("model.layers.3.", "model.layers.5.")
                assert torch.equal(value, dense[old]), (mode, key)
    for key, value in written["sequential"].items():
        torch.testing.assert_close(value, written["resident"][key], rtol=1e-5, atol=1e-6)
    # Healing helps: the healed cut is closer to the dense model than the same cut left alone.
    unhealed = job("none")
    assert unhealed.chosen.pruned_layers == [3, 4]
    assert resident.metrics.pruned["kl_mean"] < unhealed.metrics.pruned["kl_mean"]


def _upcycled(dense_dir: Path, out: Path) -> Path:
    """``upcycled_mixtral`` of the Llama in ``dense_dir``, saved with its tokenizer in ``out``."""
    upcycled_mixtral(LlamaForCausalLM.from_pretrained(dense_dir)).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (dense_dir / name).exists():
            (out / name).write_bytes((dense_dir / name).read_bytes())
    return out


def test_a_mixture_of_experts_made_from_a_trained_model_prunes_and_heals_as_that_model(
    trained_model_dir, structured_corpus, tmp_path
):
    # The heal map of an MoE acts on the routed sum and folds into every expert: a Mixtral whose
    # experts are all its source's MLP must be cut and healed as the source is, in both modes (a map
    # folded into one expert, or fitted on one expert's output, would not give the source's figures).
    moe_dir = _upcycled(trained_model_dir, tmp_path / "moe")
    calibration = CalibrationSpec(dataset=str(structured_corpus[0]), num_samples=16, seq_len=32, batch_size=8)
    evaluation = EvaluationSpec(dataset=f"{structured_corpus[1]}#body", max_windows=6, speed=False, prompts=[])

    def job(model_dir: Path, mode: str, name: str):
        options = SelectionOptions(execution=mode, heal="linear", selection_metric="kl")
        spec = make_spec(model_dir, structured_corpus, options=options, calibration=calibration)
        return run_prune(spec.model_copy(update={"evaluation": evaluation}), tmp_path / name).report

    dense = job(trained_model_dir, "resident", "dense")
    assert dense.heal.method == "linear" and dense.heal.spans
    for mode in ("resident", "sequential"):
        moe = job(moe_dir, mode, f"moe-{mode}")
        assert moe.chosen.pruned_layers == dense.chosen.pruned_layers, mode
        assert moe.heal.method == "linear", (mode, moe.heal.reason)
        for got, expected in zip(moe.heal.spans, dense.heal.spans, strict=True):
            assert [got[k] for k in ("start", "end", "anchor")] == [expected[k] for k in ("start", "end", "anchor")]
            assert got["residual_after"] == pytest.approx(expected["residual_after"], rel=1e-3, abs=1e-5), mode
            assert got["residual_after"] < got["residual_before"]
        for key in ("perplexity", "kl_mean", "top1_agreement"):
            assert moe.metrics.pruned[key] == pytest.approx(dense.metrics.pruned[key], rel=1e-3, abs=1e-6), (mode, key)
        assert moe.reload_check["max_abs_logit_diff"] <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_gpt_oss_stored_in_mxfp4_prunes_and_heals_in_both_modes_shipping_the_other_experts_as_stored(
    dtype, corpus_files, tmp_path, tiny_tokenizer
):
    # gpt-oss as OpenAI ships it (bfloat16 beside its MXFP4 experts), run in float32 on this CPU.
    source = tmp_path / "source"
    write_mxfp4_gpt_oss(source, dtype=dtype)
    tiny_tokenizer.save_pretrained(source)
    evaluation = EvaluationSpec(dataset=f"{corpus_files[1]}#body", max_windows=6, speed=False, prompts=[])

    def job(mode: str, heal: str):
        options = SelectionOptions(execution=mode, heal=heal, selection_metric="kl")
        spec = make_spec(source, corpus_files, method="reverse", options=options, evaluation=evaluation)
        return run_prune(spec, tmp_path / f"{mode}-{heal}").report

    stored = _tensors(source)
    for heal in ("none", "linear"):
        runs = {mode: job(mode, heal) for mode in ("resident", "sequential")}
        for mode, report in runs.items():
            assert report.chosen.pruned_layers == [3, 4] and report.heal.method == heal, (mode, report.heal)
            assert report.reload_check["max_abs_logit_diff"] <= 1e-5  # the written checkpoint computes it
        assert runs["sequential"].metrics.pruned["perplexity"] == pytest.approx(
            runs["resident"].metrics.pruned["perplexity"], rel=1e-6
        )
        written = {mode: _tensors(tmp_path / f"{mode}-{heal}" / "model") for mode in runs}
        for key, value in written["sequential"].items():
            torch.testing.assert_close(value, written["resident"][key], rtol=0, atol=0)
        tensors = written["resident"]
        # Kept experts as stored, renumbered (block 5 is now 3): the same packed bytes and exponents.
        for name in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"):
            for new, old in ((0, 0), (3, 5)) if heal == "linear" else ((0, 0), (2, 2), (3, 5)):
                key = f"mlp.experts.{name}"
                assert torch.equal(tensors[f"model.layers.{new}.{key}"], stored[f"model.layers.{old}.{key}"])
        config = json.loads((tmp_path / f"resident-{heal}" / "model" / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "mxfp4" and config["num_hidden_layers"] == 4
        unquantized = [m for m in config["quantization_config"]["modules_to_not_convert"] if "layers.2" in m]
        if heal == "none":
            assert unquantized == []
            continue
        # The anchor, block 2: its experts written in the checkpoint's dtype (its biases'), unquantized:
        # gate and up exactly as transformers dequantizes them, down with the map folded in.
        assert unquantized == ["model.layers.2.mlp.experts"]
        assert not any(key.startswith("model.layers.2.") and key.endswith(("_blocks", "_scales")) for key in tensors)
        dense = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).model.layers[2].mlp.experts
        assert tensors["model.layers.2.mlp.experts.gate_up_proj"].dtype == dtype
        assert torch.equal(tensors["model.layers.2.mlp.experts.gate_up_proj"], dense.gate_up_proj.detach())
        assert not torch.equal(tensors["model.layers.2.mlp.experts.down_proj"], dense.down_proj.detach())
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"resident-{heal}" / "model", dtype=dtype)
        assert torch.equal(
            reloaded.model.layers[2].mlp.experts.down_proj, tensors["model.layers.2.mlp.experts.down_proj"]
        )
        assert reloaded.config.num_hidden_layers == 4


def test_a_heal_is_refused_for_weights_stored_quantized_but_gpt_oss_mxfp4():
    # A map folded into quantized weights would have to be quantized again; gpt-oss's MXFP4 experts are
    # written unquantized in the anchor block instead.
    fp8 = {"quantization_config": {"quant_method": "fp8"}}
    assert "quantized (fp8)" in (fold_refusal("llama", fp8) or "")
    assert "quantized (fp8)" in (fold_refusal("gpt_oss", fp8) or "")
    assert fold_refusal("gpt_oss", {"quantization_config": {"quant_method": "mxfp4"}}) is None
    assert "quantized (mxfp4)" in (fold_refusal("mixtral", {"quantization_config": {"quant_method": "mxfp4"}}) or "")


def test_auto_execution_runs_sequentially_when_the_model_exceeds_the_memory_budget(
    tiny_model_dir, corpus_files, tmp_path, monkeypatch
):
    spec = make_spec(tiny_model_dir, corpus_files, evaluation=EvaluationSpec(speed=False, prompts=[]))
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", "0.0001")  # 100 kB: less than the tiny model's weights
    small = run_prune(spec, tmp_path / "small").report.execution
    assert (small.mode, small.requested, small.budget_bytes) == ("sequential", "auto", 100_000)
    assert "exceed the budget" in small.reason and "LORP_DEVICE_MEMORY_GB=0.0001" in small.reason
    assert small.skipped == []  # nothing asked that needs the model whole
    # Resident asked for under that budget: the reload check cannot load a second copy beside the
    # model, so it runs the written folder block by block against the in-memory pruned model.
    resident = run_prune(
        spec.model_copy(update={"options": SelectionOptions(execution="resident")}), tmp_path / "resident"
    ).report
    assert resident.execution.mode == "resident" and resident.reload_check["mode"] == "block by block"
    assert resident.reload_check["max_abs_logit_diff"] <= 1e-4 and resident.reload_check["num_layers"] == 6
    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", "4")
    large = run_prune(spec, tmp_path / "large").report.execution
    assert (large.mode, large.requested) == ("resident", "auto") and "fit the budget" in large.reason
    assert "mode" not in run_prune(spec, tmp_path / "checked").report.reload_check  # from_pretrained, KV cache
    assert large.weights_bytes == small.weights_bytes > 0

    monkeypatch.setenv("LORP_DEVICE_MEMORY_GB", "lots")
    with pytest.raises(InvalidRequestError) as err:
        run_prune(spec, tmp_path / "bad")
    assert err.value.field == "LORP_DEVICE_MEMORY_GB"


def test_the_phases_run_on_their_own_and_make_the_whole_jobs_result(tiny_model_dir, corpus_files, tmp_path):
    from lorp.blocks import decoder_blocks
    from lorp.pipeline import execute, plan, report, validate

    spec = make_spec(tiny_model_dir, corpus_files, evaluation=EvaluationSpec(speed=False, prompts=["the"]))
    prepared = validate(spec)
    assert prepared.n_blocks == 8 and not prepared.sequential
    planned = plan(prepared, spec)
    assert len(planned.choice.chosen.pruned_layers) == 2 and planned.stats.S.shape == (9, 9)
    assert len(decoder_blocks(prepared.loaded.model)) == 8  # planning leaves the model dense
    out = tmp_path / "phases"
    out.mkdir()
    executed = execute(prepared, planned, spec, out)
    assert executed.pruned["num_layers"] == 6 and (executed.model_dir / "config.json").is_file()
    assert executed.reload_check["num_layers"] == 6
    result = report(prepared, planned, executed, spec, out)
    whole = run_prune(spec, tmp_path / "whole").report
    assert result.chosen == whole.chosen and result.plans == whole.plans
    assert json.loads((out / "report.json").read_text())["chosen"] == whole.to_json()["chosen"]


def test_a_sequential_job_stopped_mid_capture_resumes_from_its_scratch(tiny_model_dir, corpus_files, tmp_path):
    from lorp.pipeline import Sources

    spec = make_spec(
        tiny_model_dir,
        corpus_files,
        options=SelectionOptions(execution="sequential"),
        evaluation=EvaluationSpec(speed=False, prompts=[], curve_budgets=[]),
    )
    sources = Sources(scratch=tmp_path / "scratch")
    halfway = []

    def progress(stage: str, fraction: float) -> None:
        if stage == "capture" and fraction >= 0.5:
            halfway.append(fraction)

    with pytest.raises(JobCancelled):
        run_prune(spec, tmp_path / "first", progress=progress, should_cancel=lambda: bool(halfway), sources=sources)
    resumed = run_prune(spec, tmp_path / "second", sources=sources).report
    whole = run_prune(spec, tmp_path / "whole").report
    assert resumed.execution.resumed_at_block is not None and 3 <= resumed.execution.resumed_at_block < 8
    assert whole.execution.resumed_at_block is None
    assert resumed.chosen == whole.chosen and resumed.plans == whole.plans
    # The resumed run loaded the blocks from where the first stopped, not all 8, for its capture (and the
    # validation windows' states, stored by the same pass); the evaluation windows, which ride only a
    # pass from block 0, then took a pass of their own (8 loads) instead of riding the capture's.
    resumed_loads, whole_loads = resumed.execution.block_loads_by_stage, whole.execution.block_loads_by_stage
    assert resumed_loads["capture"] == whole_loads["capture"] - resumed.execution.resumed_at_block
    assert (resumed_loads["evaluating_dense"], whole_loads["evaluating_dense"]) == (8, 0)
    assert resumed.execution.block_loads == whole.execution.block_loads - resumed.execution.resumed_at_block + 8


def test_a_sequential_plan_keeps_its_dense_states_on_disk_not_in_memory(tiny_model_dir, corpus_files, tmp_path):
    from lorp.pipeline import Sources, plan, validate
    from lorp.states import StoredStateCache

    spec = make_spec(tiny_model_dir, corpus_files, options=SelectionOptions(execution="sequential", heal="linear"))
    sources = Sources(scratch=tmp_path / "scratch")
    planned = plan(validate(spec, sources), spec, sources)
    scorer = planned.choice.scorer
    assert scorer is not None and scorer.healer is not None
    # The validation windows' states and the heal windows' (the capture's first windows) are read from
    # the scratch's files a batch at a time; nothing holds (N + 1) x tokens x d in memory.
    assert isinstance(scorer.cache, StoredStateCache) and isinstance(scorer.healer.cache, StoredStateCache)
    assert scorer.cache.nbytes == 0 and scorer.healer.cache.store is not scorer.cache.store
    assert {p.name for p in (tmp_path / "scratch").iterdir()} == {"capture", "capture-mlp", "validation", "fits"}
    assert len(list((tmp_path / "scratch" / "validation").glob("state_*.bin"))) == 9
    # Beside the capture's states, each block's MLP output on the heal windows: the dense fits read
    # them and run no block again.
    assert len(list((tmp_path / "scratch" / "capture-mlp").glob("state_*.bin"))) == 8
    assert scorer.healer.fits_computed > 0 and scorer.healer.anchor_passes == 0
    # The candidates' heal maps wait on disk too, one file each, and the chosen plan's stay there for
    # the rest of the job (the scratch is the caller's, kept).
    assert len(list((tmp_path / "scratch" / "fits").glob("fit-*.pt"))) == scorer.healer.fits_computed
    assert planned.choice.fits
    assert all(fit.held is None and fit.file.parent == tmp_path / "scratch" / "fits" for fit in planned.choice.fits)


def test_a_sequential_job_asking_for_lm_eval_tasks_is_refused_before_loading(tiny_model_dir, corpus_files, tmp_path):
    from lorp.spec import TaskSpec

    spec = make_spec(
        tiny_model_dir,
        corpus_files,
        options=SelectionOptions(execution="sequential"),
        evaluation=EvaluationSpec(tasks=[TaskSpec(name="lorp_cloze", limit=2)]),
    )
    with pytest.raises(InvalidRequestError) as err:
        run_prune(spec, tmp_path / "out")
    assert err.value.field == "evaluation.tasks" and "'sequential'" in err.value.message


def _fingerprint_data() -> CalibrationData:
    empty = TokenWindows(input_ids=torch.zeros(0, 4, dtype=torch.long), attention_mask=torch.zeros(0, 4))
    return CalibrationData(capture=empty, validation=empty, text_sha256="ab" * 32, num_stream_tokens=0)


def test_the_calibration_fingerprint_follows_every_field_that_can_change_a_capture() -> None:
    provenance = {"weights_sha256": "cd" * 32, "source": "/models/x", "device": "cpu"}
    base = CalibrationSpec()
    key = calibration_fingerprint(provenance, _fingerprint_data(), base)
    changed = {
        "dataset": "other.txt",
        "num_samples": 8,
        "seq_len": 64,
        "seed": 3,
        "chat_template": True,
        "batch_size": 2,
        "angular": "last_token",
        "validation_fraction": 0.2,
        "validation_windows": 4,
    }
    assert set(changed) == set(CalibrationSpec.model_fields)  # a new field is added here too
    for name, value in changed.items():
        other = calibration_fingerprint(provenance, _fingerprint_data(), base.model_copy(update={name: value}))
        assert (other == key) == (name in NOT_IN_CAPTURE), name
    # Where the hashed weights sit, and the device, do not matter; the scope does.
    moved = {**provenance, "source": "/elsewhere", "device": "cuda"}
    assert calibration_fingerprint(moved, _fingerprint_data(), base) == key
    assert calibration_fingerprint(provenance, _fingerprint_data(), base, "tenant-a") != key


class _WithStride(CalibrationSpec):
    stride: int = 1  # a calibration option added later


def test_a_calibration_option_added_later_changes_the_fingerprint_without_being_listed() -> None:
    provenance = {"weights_sha256": "cd" * 32}
    one = calibration_fingerprint(provenance, _fingerprint_data(), _WithStride(stride=1))
    two = calibration_fingerprint(provenance, _fingerprint_data(), _WithStride(stride=2))
    assert one != two
