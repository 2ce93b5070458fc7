"""Shared fixtures (a tiny tokenizer trained in memory, so tiny-model tests need no hub) and the
markers each folder's tests carry: tests/engine/ are ``unit``, tests/service/ ``integration`` (unless
a module says ``unit``), tests/reliability/ ``reliability``. Select with ``-m``, e.g. ``make test-fast``
runs ``-m "unit and not slow"``."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 384

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Depth pruning removes whole decoder blocks from a language model.",
    "Similarity between hidden states decays with depth distance.",
    "Representational phases group neighbouring blocks together.",
] * 8


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template, trained on a few sentences (under a second)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


_TESTS = Path(__file__).resolve().parent
_FOLDER_MARKERS = {"engine": "unit", "service": "integration", "reliability": "reliability"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.path)).resolve().relative_to(_TESTS).parts[0]
        marker = _FOLDER_MARKERS.get(folder)
        if marker is None or any(item.get_closest_marker(m) for m in ("unit", "integration", "reliability")):
            continue
        item.add_marker(marker)
