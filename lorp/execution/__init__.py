"""The one place that runs the model (docs/architecture.md, "The execution layer").

Every pass the engine makes goes through a :class:`Runner`: the similarity capture, the dense state
caches, the heal fits, plan scoring (and so auto, the search and the budget curve) and perplexity.
A runner turns a batch of windows into the state entering block 0, runs any block on any state with
the arguments the model's own forward gives that block, and turns a state leaving the last block into
logits with the model's own final norm and head. Everything a pass needs (the states entering each
block, a block's MLP output, the blocks removed or healed) is asked of it, so no pass registers
hooks on the model or stops its forward by raising.

- :mod:`lorp.execution.calls`: how each block is called, recorded from the model's own forward.
- :mod:`lorp.execution.runner`: the runner and its passes.
- :mod:`lorp.execution.healed`: heal maps folded into a block's MLP output projection.
- :mod:`lorp.execution.onload`: a model kept on disk, its blocks loaded one at a time
  (``Runner.sequential``).

Two ways to run, one result: a resident runner runs the model where it lives; a sequential one keeps
the model's skeleton on the meta device, loads the embeddings, final norm and head once, and loads
each decoder block from the safetensors shards only while a pass runs it on every batch of the pass
(block-major), keeping the states between blocks on the host.
"""

from lorp.execution.calls import BlockCall
from lorp.execution.healed import folded, mlp_output
from lorp.execution.runner import Batch, PlanPass, Runner, as_runner

__all__ = ["Batch", "BlockCall", "PlanPass", "Runner", "as_runner", "folded", "mlp_output"]
