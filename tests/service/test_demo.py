"""`make demo`'s script end to end on a tiny model: what it prints, and that it names the files it made.

The real demo (SmolLM2-135M, about 9 minutes) runs the same code; here a 6-block Llama under a model
root keeps it to seconds. Checked: no Celery banner or warning in the progress output (the service
logs to a file), numbers rounded, the local folder listed with each file, why `auto` did not keep
LoRP's own plan when it did not, and no link to the service it has already stopped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tiny import save_tiny_llama

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("models")
    model = save_tiny_llama(root, "tiny", tiny_tokenizer, num_hidden_layers=6, max_position_embeddings=256)
    data_dir = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORP_")}
    env["LORP_MODEL_ROOTS"] = json.dumps([str(root)])
    argv = [sys.executable, str(REPO / "scripts" / "demo.py"), "--model", str(model), "--data-dir", str(data_dir)]
    argv += ["--num-layers", "2", "--num-samples", "8", "--seq-len", "32", "--task-limit", "6"]
    # Bytes, decoded here: text mode would turn the progress line's carriage returns into newlines.
    raw = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, timeout=300, check=False)
    result = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(), raw.stderr.decode())
    return {"result": result, "data_dir": data_dir}


def test_the_demo_succeeds_and_keeps_the_service_log_out_of_its_output(demo_run: dict[str, Any]) -> None:
    result = demo_run["result"]
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    for noise in ("SecurityWarning", "celery@", "[queues]", "superuser", "Traceback"):
        assert noise not in output, output
    log = demo_run["data_dir"] / "service.log"
    assert "listening on http://127.0.0.1:" in log.read_text()
    # The progress line holds the status, the stage, a bar and a percentage, nothing else.
    progress = [part for part in result.stdout.split("\r") if part.startswith(("queued", "running", "succeeded"))]
    assert progress, result.stdout
    for part in progress:
        line = part.splitlines()[0]
        assert re.fullmatch(r"(queued|running|succeeded) +[a-z_]* +\[[#-]{30}\] +\d+\.\d%", line), line


def test_the_demo_prints_its_local_files_and_rounded_numbers(demo_run: dict[str, Any]) -> None:
    out = demo_run["result"].stdout
    folders = re.findall(r"^outputs in +(\S+)/$", out, flags=re.M)
    assert len(folders) == 1, out
    folder = Path(folders[0])
    assert folder.is_relative_to(demo_run["data_dir"])
    for name in ("model/", "report.json", "heatmap.png", "analysis.npz"):
        assert re.search(rf"^  {re.escape(name)} ", out, flags=re.M), (name, out)
        assert (folder / name.rstrip("/")).exists()
    assert f"from_pretrained('{folder / 'model'}')" in out
    # The service is gone once this prints: no links into it.
    after_start = out.split("\n", 1)[1]
    assert "http://" not in after_start and "/v1/jobs/" not in after_start, out

    report = json.loads((folder / "report.json").read_text())
    rls, k = report["analysis"]["rls"], report["analysis"]["k"]
    assert f"RLS / K          {rls:.3f} / {k}\n" in out
    for name, plan in report["plans"].items():
        if plan["validation_perplexity"] is not None:
            assert re.search(rf"{name} +{plan['validation_perplexity']:.2f}  ", out), (name, out)
    pruned = report["metrics"]["pruned"]  # the divergence from the dense predictions, as the report has it
    assert (
        f"vs dense         KL {pruned['kl_mean']:.4f} nats mean, {pruned['kl_p99']:.3f} p99; "
        f"same top token {pruned['top1_agreement']:.1%}" in out
    )
    heal = report["heal"]  # the demo model folds maps and the demo's 8,192 tokens are enough to fit them
    if heal["method"] == "linear":
        assert heal["spans"] and "candidates       validation perplexity (healed, " in out
        for span in heal["spans"]:
            assert f"healed           blocks [{span['start']}, {span['end']}) by a map folded into block" in out
    else:
        assert f"healed           no: {heal['reason']}" in out
    chosen = report["chosen"]["candidate"]
    winner = report["plans"][chosen]["validation_perplexity"]
    if chosen == "lorp":
        assert f"auto kept LoRP's own plan: the lowest validation perplexity ({winner:.2f})" in out
    else:
        lorp = report["plans"]["lorp"]["validation_perplexity"]
        if lorp is None:  # screened only: not among auto's finalists
            assert f"auto chose {chosen} (validation perplexity {winner:.2f}); LoRP's own plan screened worse" in out
        else:
            assert (
                f"auto chose {chosen} over LoRP's own plan: validation perplexity {winner:.2f} vs LoRP's {lorp:.2f}"
                in out
            )


def test_the_demo_shows_the_task_the_budget_curve_and_the_completions(demo_run: dict[str, Any]) -> None:
    out = demo_run["result"].stdout
    folder = Path(re.findall(r"^outputs in +(\S+)/$", out, flags=re.M)[0])
    report = json.loads((folder / "report.json").read_text())
    dense = {t["metric"]: t for t in report["metrics"]["dense"]["tasks"]}
    pruned = {t["metric"]: t for t in report["metrics"]["pruned"]["tasks"]}
    d, p = dense["acc"]["value"], pruned["acc"]["value"]
    acc = f"task             lorp_cloze acc: dense {d:.3f} -> pruned {p:.3f} (6 items)"
    assert acc in out, out
    curve = report["budget_curve"]
    assert f"(dense {curve['dense_validation_perplexity']:.2f})" in out
    assert "  blocks removed        1        2\n" in out
    for point in curve["points"]:
        assert re.search(rf"^  {point['method']} .*{point['validation_perplexity']:.2f}", out, flags=re.M), point
    for generation in report["generations"]:
        assert f"prompt           {generation['prompt']!r}\n  dense          {generation['dense']!r}\n" in out
    for name in ("plans.png", "budgets.png"):
        assert re.search(rf"^  {re.escape(name)} ", out, flags=re.M), (name, out)
