"""LoRA adapters on decoder blocks (lorp.adapters): what gets them, and how they end.

- in a mixture of experts the experts' stacked weights get adapters beside the linear layers, each
  expert its own update; routers, norms and biases never;
- merged, the model computes what it computed with the adapters on, and exactly the targeted weights
  changed; dropped, it is bit for bit as before;
- only the blocks asked for are adapted, in every family (before 0.22, peft's wrapper of a whole
  transformers MoE model adapted every block's experts when a dense layer was named);
- on a dense model the adapters start as they did under peft's wrapper of the whole model (the same
  draws from the seed), and in every family as peft up to 0.21 drew them, under every peft: so
  distillation's figures are what they were.
"""

from __future__ import annotations

import pytest
import torch

from lorp.adapters import ALPHA, Adapters, pairs, targets
from lorp.blocks import block_layout, decoder_blocks

from .archs import probe, six_blocks
from .helpers import EXPERTS

FAMILIES = ["llama", "gpt2", *sorted(EXPERTS)]


def _blocks(model, indices):
    path, blocks = block_layout(model).path, decoder_blocks(model)
    return {f"{path}.{i}": (blocks[i], targets(blocks[i])) for i in indices}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(probe()).logits


@pytest.mark.parametrize("name", FAMILIES)
def test_experts_get_adapters_beside_the_linear_layers_and_nothing_else_does(name: str) -> None:
    model = six_blocks(name)
    wanted = targets(decoder_blocks(model)[1])  # block 1 has experts in every MoE family
    assert "self_attn.q_proj" in wanted.modules or "attn.c_attn" in wanted.modules
    if name in EXPERTS:
        assert sorted(wanted.parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    else:
        assert wanted.parameters == []
    assert not any("router" in n or "norm" in n or n.endswith("bias") for n in wanted.weights)


@pytest.mark.parametrize("name", FAMILIES)
def test_merged_adapters_compute_what_the_adapted_model_did_and_change_only_their_blocks(name: str) -> None:
    model = six_blocks(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dense = _logits(model)
    adapters = Adapters(_blocks(model, [1, 2]), rank=4, alpha=ALPHA, seed=0)
    with torch.no_grad():
        for parameter in adapters.parameters():  # as if trained: both factors away from their start
            parameter.normal_(0, 0.05)
    adapted = _logits(model)
    assert not torch.allclose(adapted, dense)

    merged = adapters.end(merge=True)

    torch.testing.assert_close(_logits(model), adapted, rtol=1e-5, atol=1e-5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(merged)
    path = block_layout(model).path
    assert changed and all(n.startswith((f"{path}.1.", f"{path}.2.")) for n in changed)
    expert_weights = {n for n in changed if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert bool(expert_weights) == (name in EXPERTS)
    for n in expert_weights:  # each expert its own update
        delta = model.get_parameter(n) - before[n]
        assert not torch.allclose(delta[0], delta[1])
    assert not any(p.requires_grad for b, _ in _blocks(model, [1, 2]).values() for p in b.parameters())
    assert adapters.end(merge=True) == {}  # ended once


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_dropped_adapters_leave_the_model_bit_for_bit(name: str) -> None:
    model = six_blocks(name)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = Adapters(_blocks(model, range(6)), rank=4, alpha=ALPHA, seed=0)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.normal_(0, 0.05)
    assert adapters.end(merge=False) == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())  # no wrapper left
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_a_dense_model_gets_the_adapters_peft_s_model_wrapper_gives() -> None:
    from peft import LoraConfig, get_peft_model

    ours, theirs = six_blocks("llama"), six_blocks("llama")
    adapters = Adapters(_blocks(ours, [1, 4]), rank=4, alpha=ALPHA, seed=7)
    names = [f"model.layers.{i}.{m}" for i in (1, 4) for m in targets(decoder_blocks(theirs)[i]).modules]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        wrapped = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names))
    mine = adapters.parameters()
    peft_s = [p for p in wrapped.parameters() if p.requires_grad]
    assert len(mine) == len(peft_s) and all(torch.equal(a, b) for a, b in zip(mine, peft_s, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_s_adapters_start_as_peft_up_to_0_21_drew_them_from_the_seed(name: str) -> None:
    # Drawn by the adapters, not by peft: 0.22 builds a block's adapters in another order than 0.21, and
    # the same seed gave a mixture of experts other adapters (checked here against 0.21.2 and 0.22.0).
    model = six_blocks(name)
    chosen = _blocks(model, [1, 4])
    Adapters(chosen, rank=4, alpha=ALPHA, seed=3)
    found = {k: pairs(block) for k, (block, _) in chosen.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for prefix, (_, wanted) in chosen.items():
            assert set(found[prefix]) == set(wanted.weights)
            for weight in wanted.weights:  # linear layers, then experts; an A, a B, then A's own draw
                a, b = found[prefix][weight]
                for shape in (a.shape, b.shape, a.shape):
                    drawn = torch.empty(shape)
                    torch.nn.init.kaiming_uniform_(drawn, a=5**0.5)
                assert torch.equal(a, drawn) and not b.any(), (prefix, weight)


def test_on_a_moe_model_with_a_dense_block_only_that_block_is_adapted() -> None:
    # Qwen3-MoE's block 3 has a dense MLP. Before 0.22, peft's wrapper of the whole model read block 3's
    # down_proj as a transformers v4 name and adapted every block's experts; from 0.22 it adapts what is
    # named. The adapters on the blocks adapt what is named under every peft the project admits.
    import peft
    from packaging.version import Version
    from peft import LoraConfig, get_peft_model

    ours = six_blocks("qwen3_moe")
    names = [f"model.layers.3.{m}" for m in targets(decoder_blocks(ours)[3]).modules]
    adapters = Adapters(_blocks(ours, [3]), rank=4, alpha=ALPHA, seed=0)
    lora = {n for n, _ in ours.named_parameters() if "lora" in n}
    assert {n.split(".lora_")[0] for n in lora} == set(names)  # block 3's layers, nothing else
    adapters.end(merge=False)

    model = six_blocks("qwen3_moe")
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=names))
    theirs = {n.removeprefix("base_model.model.") for n, p in wrapped.named_parameters() if p.requires_grad}
    outside = {n.split(".mlp.")[0] for n in theirs if ".experts." in n}
    if Version(peft.__version__) < Version("0.22"):
        assert outside and not any(".layers.3" in n for n in outside)
    else:
        assert not outside and theirs == lora
