"""Builders the engine's test modules share: windows, tiny models, a job's spec (a test module imports
these, never another test module)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorp.calibration import TokenWindows
from lorp.spec import CalibrationSpec, EvaluationSpec, ModelSpec, PruneSpec, TargetSpec

from .archs import ARCHS

VOCAB = 384
# Families whose MLP output passes a norm before the residual add: a heal map cannot fold.
REFUSED = {"gemma2", "gemma3_text", "olmo2", "olmo3", "glm4", "exaone4"}
# Mixtures of experts: a heal map folds into every expert's down projection.
EXPERTS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}
FOLDABLE = [name for name in ARCHS if name not in REFUSED]
# Families whose checkpoints store each expert apart while the model stacks them (transformers
# converts on load): sequential execution assembles the stacked weights from the pieces.
PER_EXPERT = {"mixtral", "olmoe", "qwen2_moe", "qwen3_moe"}


def windows(batch: int = 6, length: int = 12, seed: int = 3) -> TokenWindows:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 384, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # padding is masked out of the statistics
    return TokenWindows(input_ids=ids, attention_mask=mask)


def tiny_llama(layers: int = 5) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def windows_with_padding() -> TokenWindows:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (5, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding of different lengths
    mask[3, 5:] = 0
    ids[mask == 0] = 0
    return TokenWindows(input_ids=ids, attention_mask=mask)


def make_spec(model_dir: Path, files: tuple[Path, Path], **overrides) -> PruneSpec:
    cal_file, eval_file = files
    fields = {
        "model": ModelSpec(id=str(model_dir), device="cpu"),
        "method": "auto",
        "target": TargetSpec(num_layers=2),
        "calibration": CalibrationSpec(dataset=str(cal_file), num_samples=8, seq_len=32, batch_size=4),
        "evaluation": EvaluationSpec(
            dataset=f"{eval_file}#body", max_windows=6, speed_prompt_len=8, speed_new_tokens=4
        ),
    }
    fields.update(overrides)
    return PruneSpec(**fields)
