"""The built-in downstream task: a 4-way next-sentence cloze built from the corpus' held-out articles.

Each item is a passage of one to three consecutive sentences from a held-out (evaluation) article
and four candidate continuations: the sentence that really follows it, and three sentences of a
similar length drawn from other held-out articles. A model that follows the text prefers the true
one; chance is 1/4. Items are seeded, so the task is the same on every machine for the same corpus.

The task is written at first use as an ordinary lm-evaluation-harness task (a YAML that points at a
JSONL file) in ``cache_dir()/tasks/``, keyed by the corpus' sha256 and this builder's version, so
lm-eval runs it like any other task and it needs no hub.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from lorp.assets.cache import cache_dir, file_lock, texts_sha256
from lorp.assets.corpus import builtin_corpus
from lorp.atomic import write_atomically

TASK_NAME = "lorp_cloze"
# Bump whenever items change for the same corpus: the cache is keyed by it.
_BUILDER_VERSION = 1
MAX_ITEMS = 400
CHOICES = 4
_SEED = 0
_MIN_WORDS, _MAX_WORDS = 6, 40  # a candidate sentence's length in words
_MAX_CONTEXT_WORDS = 80
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


@dataclass(frozen=True)
class ClozeItem:
    context: str
    choices: list[str]
    label: int


def _sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(paragraph.split())) if s.strip()]


def _paragraphs(article: str) -> list[list[str]]:
    """Each paragraph of prose (headings and lists left out) as its sentences."""
    out = []
    for block in article.split("\n\n"):
        sentences = _sentences(block)
        if len(sentences) >= 2:
            out.append(sentences)
    return out


def _usable(sentence: str) -> bool:
    return _MIN_WORDS <= len(sentence.split()) <= _MAX_WORDS


def build_items(articles: list[str], *, max_items: int = MAX_ITEMS, seed: int = _SEED) -> list[ClozeItem]:
    """Cloze items from ``articles`` (each item's distractors come from the other articles)."""
    rng = random.Random(seed)
    by_article = [_paragraphs(text) for text in articles]
    pool = [
        (a, sentence)
        for a, paragraphs in enumerate(by_article)
        for sentences in paragraphs
        for sentence in sentences
        if _usable(sentence)
    ]
    slots = []
    for a, paragraphs in enumerate(by_article):
        for sentences in paragraphs:
            for i in range(1, len(sentences)):
                if _usable(sentences[i]):
                    before = sentences[max(0, i - 3) : i]
                    while len(before) > 1 and len(" ".join(before).split()) > _MAX_CONTEXT_WORDS:
                        before = before[1:]
                    slots.append((a, " ".join(before), sentences[i]))
    rng.shuffle(slots)
    items: list[ClozeItem] = []
    for a, context, truth in slots:
        if len(items) == max_items:
            break
        words = len(truth.split())
        similar = [s for b, s in pool if b != a and 0.67 * words <= len(s.split()) <= 1.5 * words and s != truth]
        if len(similar) < CHOICES - 1:
            continue
        choices = [truth, *rng.sample(similar, CHOICES - 1)]
        rng.shuffle(choices)
        items.append(ClozeItem(context=context, choices=choices, label=choices.index(truth)))
    return items


def _task_yaml(data_file: Path) -> str:
    # json.dumps gives a quoted scalar YAML reads as the same string (YAML is a superset of JSON).
    return "\n".join(
        [
            f"task: {TASK_NAME}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data_file))}",
            "test_split: test",
            "output_type: multiple_choice",
            'doc_to_text: "{{context}}"',
            "doc_to_choice: choices",
            "doc_to_target: label",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "  - metric: acc_norm",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {_BUILDER_VERSION}.0",
            "  description: built-in 4-way next-sentence cloze from the held-out built-in corpus",
            "",
        ]
    )


def builtin_task_dir() -> Path:
    """The folder holding the built-in task's YAML and JSONL, written on first use."""
    corpus = builtin_corpus()
    digest = texts_sha256([corpus.sha256, str(_BUILDER_VERSION), str(MAX_ITEMS)])[:16]
    folder = cache_dir() / "tasks" / f"{TASK_NAME}-{digest}"
    config = folder / f"{TASK_NAME}.yaml"
    with file_lock(cache_dir() / "tasks" / ".lock"):
        if not config.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            data = folder / f"{TASK_NAME}.jsonl"
            items = build_items(corpus.evaluation)
            write_atomically(data, "".join(json.dumps(item.__dict__, ensure_ascii=False) + "\n" for item in items))
            write_atomically(config, _task_yaml(data))  # last: its presence says the folder is complete
    return folder
