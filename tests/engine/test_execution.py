"""The execution layer (lorp.execution): the one place that runs the model, pinned on every architecture.

- the runner's blocks and head give the model's own forward's logits, bit for bit, padding included;
- a pass from any block on a cached dense state, with blocks removed, gives the pruned model's logits;
- a relay pass runs no block and leaves the model as it was (modules, hooks);
- healed views fold and restore; a runner refuses a model whose blocks changed under it;
- no other engine module registers hooks on a model or stops a forward by raising.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

import lorp
from lorp.blocks import decoder_blocks, remove_blocks
from lorp.execution import Runner

from .archs import ARCHS, build, probe


def padded_probe() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([probe(), probe().flip(1)])
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    return ids, mask


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_the_runner_computes_the_models_own_forward_bit_for_bit(name: str) -> None:
    model = build(name)
    ids, mask = padded_probe()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    runner = Runner(model)
    batch = runner.batch(ids, mask)
    assert torch.equal(runner.forward_logits(batch), expected)
    assert runner.block_runs == runner.num_blocks


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_a_pass_from_a_cached_state_with_blocks_removed_is_the_pruned_models_forward(name: str) -> None:
    model = build(name)
    n = len(decoder_blocks(model))
    removed = [1, n - 1] if n > 3 else [1]
    ids, mask = padded_probe()
    pruned = copy.deepcopy(model)
    remove_blocks(pruned, removed)
    with torch.no_grad():
        expected = pruned(input_ids=ids, attention_mask=mask, use_cache=False).logits
    runner = Runner(model)
    batch = runner.batch(ids, mask)
    states = runner.states(batch)
    assert len(states) == n + 1
    with runner.pruned(removed) as view:
        from_cache = view.logits(batch, view.run(batch, start=1, state=states[1]))
        from_start = view.forward_logits(batch)
    real = mask.bool()
    torch.testing.assert_close(from_cache[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_start[real], expected[real], rtol=1e-5, atol=1e-5)
    assert len(decoder_blocks(model)) == n  # the view is closed: the model is whole again


@pytest.mark.parametrize("name", ["llama", "gemma3_text", "falcon", "gpt2"])
def test_a_relay_pass_runs_no_block_and_leaves_the_model_as_it_was(name: str) -> None:
    model = build(name)
    blocks = decoder_blocks(model)
    before = list(blocks)
    ran: list[int] = []
    handles = [b.register_forward_pre_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    runner = Runner(model)
    ids, mask = padded_probe()
    runner.batch(ids, mask)  # the first batch learns what a block returns: block 0 runs once
    assert ran == [0]
    ran.clear()
    batch = runner.batch(ids, mask)
    runner.logits(batch, batch.entering)
    assert ran == []
    assert list(decoder_blocks(model)) == before
    for handle in handles:
        handle.remove()
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.modules())


def test_per_layer_calls_differ_where_the_architecture_makes_them_differ() -> None:
    # Gemma 3 gives sliding and full layers different masks and rotary embeddings: each block's
    # recorded call is its own, and running block 1 (full) with block 0's call (sliding) differs.
    model = build("gemma3_text")
    runner = Runner(model)
    batch = runner.batch(*padded_probe())
    states = runner.states(batch)
    own = batch.calls[1](runner.blocks[1], states[1])
    borrowed = batch.calls[0](runner.blocks[1], states[1])
    assert torch.equal(own, states[2])
    assert not torch.allclose(own, borrowed)


def test_a_healed_view_folds_its_maps_and_restores_the_weights() -> None:
    model = build("llama")
    projection = decoder_blocks(model)[1].mlp.down_proj
    weight = projection.weight.detach().clone()
    width = weight.shape[0]

    class Fit:
        anchor = 1
        T = 2 * torch.eye(width, dtype=torch.float64)

    runner = Runner(model)
    batch = runner.batch(*padded_probe())
    dense = runner.forward_logits(batch)
    with runner.pruned([2], [Fit()]) as view:
        torch.testing.assert_close(projection.weight, 2 * weight)
        healed = view.forward_logits(batch)
    assert torch.equal(projection.weight, weight)
    assert not torch.allclose(healed, dense)
    assert torch.equal(runner.forward_logits(batch), dense)


def test_a_runner_refuses_a_model_whose_blocks_changed() -> None:
    model = build("llama")
    runner = Runner(model)
    remove_blocks(model, [0])
    with pytest.raises(RuntimeError, match="make a new runner"):
        runner.batch(*padded_probe())


def test_no_other_engine_module_hooks_the_model_or_stops_a_forward() -> None:
    root = Path(lorp.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name == "execution":
            continue
        text = path.read_text()
        if re.search(r"register_forward(_pre)?_hook|class \w*Stop\w*\(Exception\)", text):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []
