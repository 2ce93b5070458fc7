"""The pruned model folder describes itself: ``README.md``, a model card the Hugging Face hub reads,
and ``pruning.json``, the same facts for programs.

The checkpoint writer copies the source folder's other files as they are (``lorp.surgery``), its card
among them. That card describes the dense model: its evaluation results (``model-index``) and figures
do not hold for the pruned one, and a folder uploaded as it is would claim them. The card written here
says what the folder is: which blocks of which model were removed, how the cuts were healed, and how
close it stays to the source on the job's evaluation text (perplexity, the KL from the source's
next-token distributions, top-1 agreement, tasks, speed), all from the job's own report. The source
card's licence, language and pipeline tag carry over (a pruned model is still under its source's
licence); its text follows below a heading that says whose it is.

``pruning.json`` holds the source (reference, revision, weights' hash), the blocks removed and kept
(block ``k`` of the pruned model is ``kept[k]`` of the source), the plan, the heal (each cut's span and
anchor in the source's indices; ``trained_blocks``, where distillation shipped, in the pruned model's)
and the metrics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lorp.assets.packaged import DEMO_BASE_MODEL
from lorp.atomic import write_atomically
from lorp.jsonable import json_safe
from lorp.result import METRICS, PruneReport

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
RECORD_FILE = "pruning.json"
RECORD_FORMAT = 1
"""``pruning.json``'s layout; raised when a field changes meaning or goes."""
TAGS = ("lorp", "depth-pruning", "pruned")
CARRIED = ("license", "license_name", "license_link", "language", "pipeline_tag")
"""What the source card's metadata passes on: the terms the weights come under and what the model is for."""

_KINDS = {"hub": "from the Hugging Face hub", "demo": "the demo model", "local": "a model folder"}


def base_model(report: PruneReport) -> str | None:
    """The hub id the pruned model derives from, for the card's ``base_model``: the source's id when it
    came from the hub, the demo model's origin for the demo; None for a folder or an object store path
    (the hub takes only its own ids there)."""
    kind = report.provenance.get("model", {}).get("kind")
    if kind == "hub":
        return str(report.request["model"]["id"])
    if kind == "demo":
        return DEMO_BASE_MODEL
    return None


def write_model_card(model_dir: str | Path, report: PruneReport) -> None:
    """Write ``README.md`` (replacing the source's card, whose text it keeps at its end) and
    ``pruning.json`` into the pruned model's folder."""
    model_dir = Path(model_dir)
    metadata, source_text = _source_card(model_dir / CARD_FILE)
    write_atomically(model_dir / RECORD_FILE, json.dumps(json_safe(pruning_record(report)), indent=2) + "\n")
    write_atomically(model_dir / CARD_FILE, card_text(report, metadata, source_text))


_RECORDED = (*(name for name in METRICS if name != "peak_memory_bytes"), "tasks")
"""The measurements ``pruning.json`` keeps (``lorp.result.METRICS``'s, less memory, and the tasks)."""


def pruning_record(report: PruneReport) -> dict[str, Any]:
    """``pruning.json``: what a program needs to know of how this folder was made from its source."""
    n_blocks = report.analysis.num_blocks
    removed = sorted(report.chosen.pruned_layers)
    model = report.provenance.get("model", {})
    request = report.request
    dense, pruned = report.metrics.dense, report.metrics.pruned
    return {
        "format": RECORD_FORMAT,
        "made_by": {"name": "lorp-service", "version": report.provenance.get("libraries", {}).get("lorp-service")},
        "source": {
            "id": request["model"]["id"],
            "kind": model.get("kind"),
            "revision": request["model"].get("revision"),
            "commit": model.get("commit"),
            "weights_sha256": model.get("weights_sha256"),
            "base_model": base_model(report),
        },
        "num_blocks": {"source": n_blocks, "pruned": n_blocks - len(removed)},
        "removed": removed,
        "kept": sorted(set(range(n_blocks)) - set(removed)),
        "method": report.method,
        "plan": report.chosen.candidate,
        "heal": {
            "method": report.heal.method,
            "spans": [{k: span[k] for k in ("start", "end", "anchor")} for span in report.heal.spans],
            "trained_blocks": list(report.heal.distill["blocks"])
            if report.heal.method == "distill" and report.heal.distill
            else [],
        },
        "calibration": {k: request["calibration"].get(k) for k in ("dataset", "num_samples", "seq_len", "seed")}
        | {"text_sha256": report.provenance.get("calibration", {}).get("text_sha256")},
        "evaluation_dataset": request["evaluation"].get("dataset"),
        "metrics": {
            "source": {k: v for k, v in dense.items() if k in _RECORDED},
            "pruned": {k: v for k, v in pruned.items() if k in _RECORDED},
        },
    }


def card_text(report: PruneReport, source_metadata: dict[str, Any], source_text: str) -> str:
    """The card: the hub's metadata block, then what was done and measured, then the source's own card."""
    from huggingface_hub import ModelCardData

    carried = {k: source_metadata[k] for k in CARRIED if source_metadata.get(k) is not None}
    tags = [*TAGS, *(t for t in _as_list(source_metadata.get("tags")) if t not in TAGS)]
    data = ModelCardData(base_model=base_model(report), library_name="transformers", tags=tags, **carried)
    sections = [
        f"---\n{data.to_yaml()}\n---",
        _summary(report),
        _removed_section(report),
        _quality_section(report),
        _method_section(report),
        _use_section(),
    ]
    if source_text.strip():
        sections.append(
            "## The source model's card\n\n"
            "What follows is the source model's own card, as its folder held it (its metadata left out but "
            "for the licence, language and pipeline tag). Its figures describe the source, not this model.\n\n"
            + _demoted(source_text.strip())
        )
    return "\n\n".join(sections) + "\n"


def _source_card(path: Path) -> tuple[dict[str, Any], str]:
    """The source card's metadata and text (empty when the folder had none); a card whose metadata is
    not valid YAML keeps its text and loses its metadata."""
    from huggingface_hub import ModelCard

    if not path.is_file():
        return {}, ""
    content = path.read_text(encoding="utf-8", errors="replace")
    try:
        card = ModelCard(content, ignore_metadata_errors=True)
    except Exception as exc:  # the hub's parser raises YAML's errors and its own for a bad block
        log.warning("the source model's card has metadata that cannot be read (%s); its text is kept", exc)
        return {}, _without_front_matter(content)
    return card.data.to_dict(), card.text


def _without_front_matter(content: str) -> str:
    if content.startswith("---"):
        end = content.find("\n---", 3)
        if end != -1:
            return content[end + 4 :].lstrip("\n")
    return content


def _demoted(text: str) -> str:
    """The source card's headings one level down, under this card's heading for it."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        out.append("#" + line if not fenced and line.startswith("#") else line)
    return "\n".join(out)


def _summary(report: PruneReport) -> str:
    n_blocks, removed = report.analysis.num_blocks, report.chosen.pruned_layers
    source = report.request["model"]["id"]
    kind = report.provenance.get("model", {}).get("kind")
    name = _short_name(DEMO_BASE_MODEL if kind == "demo" else source)
    return (
        f"# {name}, {len(removed)} of {n_blocks} blocks removed\n\n"
        f"`{source}` ({_KINDS.get(kind, 'a model')}) with {len(removed)} of its {n_blocks} decoder blocks removed "
        "by depth pruning "
        f"({report.method}, plan `{report.chosen.candidate}`), {_heal_phrase(report)}. "
        f"Made by lorp-service {_version(report)}; it loads with plain transformers, no extra code."
    )


def _short_name(source: str) -> str:
    return source.rstrip("/").rsplit("/", 1)[-1] or source


def _version(report: PruneReport) -> str:
    return str(report.provenance.get("libraries", {}).get("lorp-service") or "(version unknown)")


def _heal_phrase(report: PruneReport) -> str:
    heal = report.heal
    if heal.method == "none":
        return "the cuts left as they are (no heal)"
    anchors = ", ".join(str(span["anchor"]) for span in heal.spans)
    folded = f"each cut healed by a linear map fitted to it and folded into the block before it (block {anchors})"
    if len(heal.spans) > 1:
        folded = folded.replace("(block ", "(blocks ")
    if heal.method == "distill" and heal.distill:
        distill = heal.distill
        toward = "the states leaving each cut in the source" if distill.get("loss") == "state" else "its predictions"
        return (
            f"{folded}, then this model's blocks {', '.join(map(str, distill['blocks']))} trained toward {toward} "
            f"({distill['steps']} steps; their weights differ from the source's)"
        )
    return folded


def _removed_section(report: PruneReport) -> str:
    n_blocks, removed = report.analysis.num_blocks, sorted(report.chosen.pruned_layers)
    dense, pruned = report.metrics.dense, report.metrics.pruned
    rows = [
        ("blocks removed (the source's indices, from 0)", ", ".join(map(str, removed))),
        ("blocks kept", f"{n_blocks - len(removed)} of {n_blocks}"),
    ]
    if "num_parameters" in dense and "num_parameters" in pruned:
        rows.append(
            (
                "parameters",
                f"{int(dense['num_parameters']):,} -> {int(pruned['num_parameters']):,} "
                f"({pruned['num_parameters'] / dense['num_parameters']:.1%})",
            )
        )
    if "weights_bytes" in dense and "weights_bytes" in pruned:
        rows.append(("weights", f"{_size(dense['weights_bytes'])} -> {_size(pruned['weights_bytes'])}"))
    for span in report.heal.spans if report.heal.method != "none" else []:
        rows.append((f"cut [{span['start']}, {span['end']})", f"healed into block {span['anchor']}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        "## What was removed\n\n| | |\n|---|---|\n"
        + table
        + "\n\nBlock k of this model is the source's block `kept[k]` in `pruning.json`, which also records the "
        "source's revision and weights' hash, the plan, the heal and these figures."
    )


def _quality_section(report: PruneReport) -> str:
    dense, pruned = report.metrics.dense, report.metrics.pruned
    rows: list[tuple[str, str, str]] = []
    if "perplexity" in pruned:
        rows.append(("perplexity", _num(dense.get("perplexity")), _num(pruned["perplexity"])))
    if "kl_mean" in pruned:
        rows.append(("mean KL(source ‖ this model) per token, nats", "0", f"{pruned['kl_mean']:.4f}"))
        rows.append(("99th percentile of that KL, nats", "0", f"{pruned['kl_p99']:.4f}"))
        rows.append(("same most likely next token as the source", "100%", f"{pruned['top1_agreement']:.1%}"))
    pruned_tasks = {(t["task"], t["metric"]): t["value"] for t in pruned.get("tasks", [])}
    for task in dense.get("tasks", []):
        value = pruned_tasks.get((task["task"], task["metric"]))
        rows.append(
            (f"{task['task']} {task['metric']} ({task['num_samples']} items)", _num(task["value"]), _num(value))
        )
    for key, name in (("prefill_tokens_per_s", "prefill"), ("decode_tokens_per_s", "decode")):
        if key in dense and key in pruned:
            rows.append((f"{name} tokens/s on {_device(report)}", _num(dense[key]), _num(pruned[key])))
    if not rows:
        return "## How close it stays to the source\n\nThe job measured neither model."
    evaluated = report.request["evaluation"].get("dataset") or "the built-in evaluation text"
    table = "\n".join(f"| {name} | {d} | {p} |" for name, d, p in rows)
    return (
        "## How close it stays to the source\n\n"
        f"Measured by the job that made it, on held-out text ({evaluated}), never on its calibration text. "
        "The KL compares the two models' next-token distributions position by position: 0 would be the "
        "source's predictions exactly.\n\n| | source | this model |\n|---|---:|---:|\n" + table
    )


def _method_section(report: PruneReport) -> str:
    calibration = report.request["calibration"]
    dataset = calibration.get("dataset") or "the built-in corpus"
    scored = f"; {len(report.plans)} candidate plans compared" if len(report.plans) > 1 else ""
    return (
        "## How it was made\n\n"
        f"The blocks were chosen by `{report.method}` from one pass over {calibration['num_samples']} windows of "
        f"{calibration['seq_len']} tokens of calibration text ({dataset}, seed {calibration['seed']}){scored}."
        + _reload_sentence(report)
    )


def _reload_sentence(report: PruneReport) -> str:
    diff = report.reload_check.get("max_abs_logit_diff")
    if diff is None:
        return ""
    differ = "equal" if diff == 0 else f"differ by at most {diff:.2g} from"
    return (
        f" The folder was reloaded after it was written: its logits on the check windows {differ} the job's "
        "own pruned computation's."
    )


def _use_section() -> str:
    return (
        "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n```'
    )


def _device(report: PruneReport) -> str:
    execution = report.execution
    if execution is None:
        return "the job's device"
    return f"{execution.device} ({execution.device_name})" if execution.device_name else execution.device


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _size(nbytes: float) -> str:
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]
