"""Fixtures the engine tests share: a tiny local Llama, a word corpus, and the same model trained on it.

The models and corpora are built once for the whole session (training the Llama takes seconds) and
only read by the tests; building them draws from a forked RNG, so they leave the tests' own random
state as they found it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorp.shards import Checkpoint

WORDS = [
    "the",
    "model",
    "block",
    "layer",
    "state",
    "token",
    "depth",
    "phase",
    "cluster",
    "prune",
    "remove",
    "keep",
    "similar",
    "distant",
    "early",
    "late",
    "middle",
    "signal",
    "noise",
    "river",
    "mountain",
    "city",
    "history",
    "music",
    "science",
    "language",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer)


def _save_tiny_llama(out: Path, tiny_tokenizer) -> Path:
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> tuple[Path, Path]:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("text")
    cal_file, eval_file = root / "cal.txt", root / "eval.jsonl"
    cal_file.write_text(" ".join(rng.choice(WORDS) for _ in range(6000)))
    eval_file.write_text(
        "\n".join(json.dumps({"body": " ".join(rng.choice(WORDS) for _ in range(400))}) for _ in range(10)) + "\n"
    )
    return cal_file, eval_file


@pytest.fixture(scope="session")
def structured_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Text a model must read context for: each word mostly follows from the one before it."""
    rng = random.Random(1)

    def text(words: int) -> str:
        out, word = [], 0
        for _ in range(words):
            word = (word * 7 + 3) % len(WORDS) if rng.random() < 0.9 else rng.randrange(len(WORDS))
            out.append(WORDS[word])
        return " ".join(out)

    root = tmp_path_factory.mktemp("structured")
    cal_file, eval_file = root / "cal.txt", root / "eval.jsonl"
    cal_file.write_text(text(6000))
    eval_file.write_text("\n".join(json.dumps({"body": text(400)}) for _ in range(10)) + "\n")
    return cal_file, eval_file


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory, tiny_model_dir, structured_corpus, tiny_tokenizer) -> Path:
    """``tiny_model_dir`` after 400 Adam steps on ``structured_corpus``: its blocks now matter, so
    removing them raises perplexity (a random model's perplexity barely moves)."""
    out = tmp_path_factory.mktemp("trained-llama")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _train(out, tiny_model_dir, structured_corpus, tiny_tokenizer)
    return out


def _train(out: Path, tiny_model_dir: Path, structured_corpus: tuple[Path, Path], tiny_tokenizer) -> None:
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    ids = tiny_tokenizer(structured_corpus[0].read_text(), return_tensors="pt").input_ids[0]
    windows = ids[: (len(ids) // 64) * 64].view(-1, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(400):
        batch = windows[(step * 8) % len(windows) :][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)


@pytest.fixture
def mixed_checkpoint(tmp_path: Path) -> Checkpoint:
    """A safetensors checkpoint of tensors of every kind: dtypes, a scalar, an empty one."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(40, 30, generator=g).to(torch.bfloat16),  # 2,400 bytes: split at capacity 1,000
        "b.bias": torch.randn(7, generator=g),
        "c.index": torch.arange(11, dtype=torch.int64),
        "d.flag": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5, dtype=torch.float16),
        "f.empty": torch.zeros(0, 4),
        "g.weight": torch.randn(9, 13, generator=g),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return Checkpoint(tmp_path)
