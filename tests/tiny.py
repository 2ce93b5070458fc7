"""Tiny random models saved the way users' checkpoints are (safetensors + tokenizer), for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def save_tiny_llama(root: Path, name: str, tokenizer: Any, *, seed: int = 0, **config: Any) -> Path:
    """A random Llama (6 blocks, hidden size 32 unless ``config`` says otherwise) saved under ``root/name``."""
    values: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    values.update(config)
    torch.manual_seed(seed)
    path = root / name
    LlamaForCausalLM(LlamaConfig(**values)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
