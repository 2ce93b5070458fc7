"""The ``lorp`` CLI: pure selection from saved analyses, errors, and prune end to end on the demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lorp.cli import main
from lorp.distill import CE_WEIGHT
from lorp.report import save_analysis
from lorp.selection import SelectionOptions, select

REPO = Path(__file__).resolve().parents[2]


def drifting_similarity(n_blocks: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """S and D of unit vectors that drift with depth, with two phases."""
    rng = np.random.default_rng(seed)
    dim = 64
    states = []
    v = rng.normal(size=dim)
    for i in range(n_blocks + 1):
        step = 0.15 if i != n_blocks // 2 else 1.5
        v = v + step * rng.normal(size=dim)
        states.append(v / np.linalg.norm(v))
    X = np.stack(states)
    S = X @ X.T
    np.fill_diagonal(S, 1.0)
    D = np.arccos(np.clip(S, -1, 1)) / np.pi
    np.fill_diagonal(D, 0.0)
    return S, D


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_select_json_from_npz_matches_the_library(tmp_path, capsys):
    S, D = drifting_similarity()
    path = save_analysis(tmp_path / "a.npz", S, D)
    for method in ("lorp", "shortgpt", "streamline", "angular", "reverse"):
        code, out, _ = run_cli(
            ["select", "--similarity", str(path), "--num-layers", "3", "--method", method, "--json"], capsys
        )
        assert code == 0
        payload = json.loads(out)
        assert set(payload) == {"method", "rls", "k", "clusters", "pruned_layers"}
        expected = select(method, S, D, 3, SelectionOptions())
        assert payload["pruned_layers"] == expected.pruned_layers
        assert payload["clusters"] == expected.structure.clusters and len(payload["clusters"]) == 12
        assert payload["method"] == method


def test_select_bare_npy_and_k_override(tmp_path, capsys):
    S, _ = drifting_similarity()
    path = tmp_path / "s.npy"
    np.save(path, S)
    code, out, _ = run_cli(
        ["select", "--similarity", str(path), "--num-layers", "2", "--num-clusters", "5", "--json"], capsys
    )
    assert code == 0
    payload = json.loads(out)
    assert payload["k"] == 5 and len(set(payload["clusters"])) == 5
    code, _, err = run_cli(["select", "--similarity", str(path), "--num-layers", "2", "--method", "angular"], capsys)
    assert code == 2
    assert "similarity" in err and "D" in err


def test_select_errors_name_the_field(tmp_path, capsys):
    S, D = drifting_similarity()
    path = save_analysis(tmp_path / "a.npz", S, D)
    code, _, err = run_cli(["select", "--similarity", str(path), "--num-layers", "11"], capsys)
    assert code == 2 and "[target.num_layers]" in err
    code, _, err = run_cli(["select", "--similarity", str(path), "--num-layers", "2", "--method", "nope"], capsys)
    assert code == 2 and "[method]" in err
    code, _, err = run_cli(["select", "--similarity", str(tmp_path / "missing.npz"), "--num-layers", "2"], capsys)
    assert code == 2 and "[similarity]" in err


@pytest.mark.slow
def test_prune_demo_model_end_to_end(tmp_path):
    """The README's main job, small: `lorp prune` on SmolLM2-135M and the built-in corpus."""
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "lorp", "prune", "--model", "demo", "--num-layers", "2",
        "--num-samples", "8", "--seq-len", "64", "--eval-windows", "4", "--no-speed",
        "--prompt", "The capital of France is", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed blocks" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["analysis"]["num_blocks"] == 30
    assert len(report["chosen"]["pruned_layers"]) == 2
    assert report["metrics"]["pruned"]["num_layers"] == 28
    # on a real model the chosen plan must keep perplexity sane: within 3x of dense at 2/30 blocks
    dense, pruned = report["metrics"]["dense"]["perplexity"], report["metrics"]["pruned"]["perplexity"]
    assert 1 < dense < pruned < 3 * dense
    assert report["provenance"]["model"]["kind"] == "demo"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 28

    npz = tmp_path / "a.npz"
    analyze = [
        sys.executable,
        "-m",
        "lorp",
        "analyze",
        "--model",
        "demo",
        "--num-samples",
        "4",
        "--seq-len",
        "32",
        "--out",
        str(npz),
    ]
    proc = subprocess.run(analyze, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(npz) as data:
        assert data["S"].shape == (31, 31) and data["D"].shape == (31, 31)


def test_prune_takes_heal_search_and_a_quality_target(trained_model_dir, structured_corpus, tmp_path, capsys):
    cal_file, eval_file = structured_corpus
    common = ["--model", str(trained_model_dir), "--device", "cpu", "--calibration", str(cal_file)]
    common += ["--num-samples", "8", "--seq-len", "32", "--eval", f"{eval_file}#body", "--eval-windows", "4"]
    common += ["--no-speed"]
    code, out, err = run_cli(
        ["prune", *common, "--method", "search", "--max-perplexity-ratio", "1.5", "--out", str(tmp_path / "q")], capsys
    )
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    quality = report["selection"]["quality_target"]
    assert f"quality target  {report['num_layers_removed']} blocks within 1.5x dense" in out
    assert quality["ratio"] <= 1.5 and report["method"] == "search"
    assert "plans scored" in out and "screened" in out
    # The search's own plans join the budget curve, scored in full, at each budget it reached.
    searched = {p["budget"]: p for p in report["budget_curve"]["points"] if p["method"] == "search"}
    path = {s["num_layers"]: s["pruned_layers"] for s in report["selection"]["search_path"]}
    assert searched and all(searched[n]["pruned_layers"] == path[n] for n in searched)
    assert "budget curve    (validation perplexity, healed," in out and "\n  search " in out

    code, out, err = run_cli(
        [
            "prune",
            *common,
            "--num-layers",
            "2",
            "--heal",
            "none",
            "--execution",
            "sequential",
            "--curve-budgets",
            "1",
            "3",
            "--out",
            str(tmp_path / "n"),
        ],
        capsys,
    )
    assert code == 0, err
    assert "healed          no (blocks removed as they are)" in out
    assert "execution       sequential on cpu, " in out and " block loads (requested)" in out
    assert "\nskipped         evaluation.prompts: greedy completions needs the model whole" in out
    report = json.loads((tmp_path / "n" / "report.json").read_text())
    assert report["heal"]["method"] == "none" and report["budget_curve"]["healed"] is False
    assert "  blocks removed          1         3\n  lorp " in out
    assert f"{tmp_path / 'n'}/budgets.png" in out

    kl_target = ["--selection-metric", "kl", "--max-kl", "0.1"]
    code, out, err = run_cli(["prune", *common, *kl_target, "--curve-budgets", "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert "budget curve" not in out and not (tmp_path / "c" / "budgets.png").exists()
    assert "execution       resident on cpu (" in out and "fit the budget" in out and "skipped" not in out
    # Ranked and bounded by the validation mean KL from the dense model.
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    quality, n = report["selection"]["quality_target"], report["num_layers_removed"]
    assert report["request"]["options"]["selection_metric"] == "kl" and quality["max_kl"] == 0.1
    assert quality["num_layers"] == n >= 1 and quality["kl"] <= 0.1
    assert report["plans"][report["chosen"]["candidate"]]["validation_kl"] == quality["kl"]
    assert f"quality target  {n} blocks within 0.1 nats validation mean KL from dense (KL {quality['kl']:.4f};" in out
    assert "candidates      (validation perplexity, mean KL from dense, healed, lower is better, ranked by KL)" in out

    # The curve drawn distilled: each budget's best plan distilled, a row of its own.
    distilled = ["--num-layers", "2", "--heal", "distill", "--heal-steps", "4", "--curve-distill"]
    code, out, err = run_cli(
        ["prune", *common, *distilled, "--curve-budgets", "1", "2", "--out", str(tmp_path / "d")], capsys
    )
    assert code == 0, err
    points = json.loads((tmp_path / "d" / "report.json").read_text())["budget_curve"]["points"]
    assert sorted(p["budget"] for p in points if p["distilled_perplexity"] is not None) == [1, 2]
    assert "\n  distilled  " in out
    assert f", loss KL + {CE_WEIGHT:g} x text CE, " in out  # the summary says what was learned
    code, out, err = run_cli(
        ["prune", *common, "--num-layers", "2", "--curve-distill", "--out", str(tmp_path / "e")], capsys
    )
    assert code != 0 and "evaluation.curve_distill" in err and "options.heal 'distill'" in err

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", *common, "--num-layers", "2", "--heal", "cubic", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "invalid choice: 'cubic'" in capsys.readouterr().err
