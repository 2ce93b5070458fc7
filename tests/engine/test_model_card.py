"""The pruned folder's own card (README.md) and record (pruning.json), written by a whole job."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from lorp.assets.packaged import DEMO_BASE_MODEL
from lorp.model_card import CARD_FILE, RECORD_FILE, TAGS, card_text, pruning_record
from lorp.pipeline import PruneResult, run_prune

from .helpers import make_spec

SOURCE_CARD = """---
license: llama3.1
language:
- en
- de
pipeline_tag: text-generation
base_model: acme/grandparent
tags:
- acme
- lorp
model-index:
- name: tiny
  results:
  - task: {type: text-generation}
    metrics: [{type: accuracy, value: 0.99}]
---
# Tiny Llama

The source's own words.

```bash
# a comment in a fence, not a heading
```
"""


@pytest.fixture(scope="module")
def job(tiny_model_dir, corpus_files, tmp_path_factory) -> PruneResult:
    """A whole job on a copy of the tiny model whose folder holds a card of its own."""
    source = tmp_path_factory.mktemp("carded") / "tiny-carded"
    shutil.copytree(tiny_model_dir, source)
    (source / CARD_FILE).write_text(SOURCE_CARD)
    return run_prune(make_spec(source, corpus_files), tmp_path_factory.mktemp("card-job") / "run")


def test_the_pruned_folder_carries_a_card_for_itself_that_keeps_the_sources_terms(job: PruneResult) -> None:
    report = job.report
    card = ModelCard.load(job.model_dir / CARD_FILE)
    meta = card.data.to_dict()
    # the source's terms carry over; its evaluation results and its own base model do not
    assert (meta["license"], meta["language"], meta["pipeline_tag"]) == ("llama3.1", ["en", "de"], "text-generation")
    assert "model-index" not in meta and "base_model" not in meta  # a folder is no hub id
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == [*TAGS, "acme"]
    removed = report.chosen.pruned_layers
    assert f"| blocks removed (the source's indices, from 0) | {', '.join(map(str, sorted(removed)))} |" in card.text
    assert f"{len(removed)} of 8 blocks removed" in card.text
    assert f"| {report.metrics.pruned['kl_mean']:.4f} |" in card.text
    assert f"| {report.metrics.pruned['top1_agreement']:.1%} |" in card.text
    # the source's card follows, under a heading that says whose it is, its headings one level down
    ours, theirs = card.text.split("## The source model's card", 1)
    assert (
        "The source's own words." not in ours and "The source's own words." in theirs and "\n## Tiny Llama\n" in theirs
    )
    assert "# a comment in a fence, not a heading" in theirs  # a fenced line is not a heading
    assert "0.99" not in card.text
    assert report.files["model_card"] == "model/README.md"


def test_pruning_json_maps_each_block_of_the_pruned_model_to_the_sources(job: PruneResult, tiny_model_dir) -> None:
    record = json.loads((job.model_dir / RECORD_FILE).read_text())
    report = job.report
    assert record["removed"] == sorted(report.chosen.pruned_layers)
    assert sorted(record["kept"] + record["removed"]) == list(range(8))
    assert record["num_blocks"] == {"source": 8, "pruned": 6}
    assert record["source"]["weights_sha256"] == report.provenance["model"]["weights_sha256"]
    assert record["metrics"]["pruned"]["kl_mean"] == report.metrics.pruned["kl_mean"]
    # the record holds where each block came from: the attention weights (no heal folds into them) match
    pruned, source = load_file(job.model_dir / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    for k, original in enumerate(record["kept"]):
        name = "self_attn.q_proj.weight"
        assert pruned[f"model.layers.{k}.{name}"].equal(source[f"model.layers.{original}.{name}"]), (k, original)
    spans = record["heal"]["spans"]
    assert [(s["start"], s["end"]) for s in spans] and all(s["anchor"] == s["start"] - 1 for s in spans)


def test_a_hub_or_demo_source_is_named_as_the_base_model(job: PruneResult) -> None:
    def card_for(kind: str, model_id: str) -> ModelCard:
        report = dataclasses.replace(
            job.report,
            request={**job.report.request, "model": {**job.report.request["model"], "id": model_id}},
            provenance={**job.report.provenance, "model": {**job.report.provenance["model"], "kind": kind}},
        )
        return ModelCard(card_text(report, {}, ""))

    hub = card_for("hub", "acme/tiny-llama")
    assert hub.data.base_model == "acme/tiny-llama" and hub.text.lstrip().startswith(
        "# tiny-llama, 2 of 8 blocks removed"
    )
    demo = card_for("demo", "demo")
    assert demo.data.base_model == DEMO_BASE_MODEL and demo.text.lstrip().startswith("# SmolLM2-135M-Instruct, 2 of 8")
    assert "The source model's card" not in demo.text  # no source card, no section for one


def test_a_distilled_heal_says_which_blocks_were_trained(job: PruneResult) -> None:
    heal = dataclasses.replace(
        job.report.heal, method="distill", distill={"blocks": [2, 3], "steps": 16, "loss": "kl", "shipped": "distill"}
    )
    report = dataclasses.replace(job.report, heal=heal)
    text = ModelCard(card_text(report, {}, "")).text
    assert "this model's blocks 2, 3 trained toward its predictions (16 steps" in text
    assert pruning_record(report)["heal"]["trained_blocks"] == [2, 3]
    linear = pruning_record(job.report)["heal"]
    assert linear["method"] == "linear" and linear["trained_blocks"] == []


def test_a_source_card_whose_metadata_is_not_yaml_keeps_its_text(tiny_model_dir, corpus_files, tmp_path) -> None:
    source = tmp_path / "badly-carded"
    shutil.copytree(tiny_model_dir, source)
    (source / CARD_FILE).write_text("---\nlicense: [unclosed\n---\n# Theirs\n\nStill read.\n")
    spec = make_spec(
        source,
        corpus_files,
        evaluation=make_spec(source, corpus_files).evaluation.model_copy(update={"speed": False, "prompts": []}),
    )
    result = run_prune(spec, tmp_path / "run")
    card = ModelCard.load(Path(result.model_dir) / CARD_FILE)
    assert "license" not in card.data.to_dict() and card.data.tags == list(TAGS)
    assert "Still read." in card.text.split("## The source model's card", 1)[1]
