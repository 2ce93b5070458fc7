"""The runner: the passes the engine makes over a model, block by block.

A :class:`Batch` is a batch of windows made ready to run: its tokens, the state entering block 0 and
how the model's own forward calls each block (:mod:`lorp.execution.calls`). On it the runner offers

- :meth:`Runner.run`: from the state entering block ``start`` through the blocks before ``stop``
  (all: to the state leaving the last block), skipping removed blocks, with callbacks that see the
  state entering and leaving each block run: the dense states, a cut's target, an anchor's output;
- :meth:`Runner.states`: the N+1 dense states of a batch;
- :meth:`Runner.logits`: the logits of a state leaving the last block (:meth:`Runner.window_logits`
  a window at a time);
- :meth:`Runner.pruned`: a view of the model with blocks removed (the kept ones renumbered as the
  pruned model numbers them) and heal maps folded, in which the same passes run;
- :meth:`Runner.watch`: the output of a module inside a block (a block's MLP output) while it runs;
  :meth:`Runner.watch_mlp` each block's MLP output M, as it joins the residual stream (what a heal
  map acts on).

Each block runs on the state it is given with the arguments the dense forward gave it; with blocks
removed that is what the pruned model gives the same block (its masks and positions do not depend
on the blocks before it), so a pass from block ``i`` on a cached dense state is the pruned model's
computation from there on.

A resident runner runs the model where it lives (its device, or the devices ``device_map`` spread it
over). A sequential one (:meth:`Runner.sequential`) holds only the weights outside the blocks and
loads a block for the length of its turn: :meth:`Runner.run_all` runs each block on every batch of a
pass before the next block (block-major), :meth:`Runner.groups` gathers a pass's batches so that each
block loads once per pass, and states wait on the host between blocks. Both give the same states,
scores and fits (tests/engine/test_sequential.py).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorp.blocks import decoder_blocks, input_device, pruned_view
from lorp.calibration import TokenWindows
from lorp.errors import InvalidRequestError, JobCancelled
from lorp.execution.calls import BlockCall, OutputForm, head_logits, record_calls
from lorp.execution.healed import FoldedMap, fold, fold_weights, folded, mlp_output, put_weights, trained_weights
from lorp.execution.onload import Onloader, skeleton

StateCallback = Callable[[int, torch.Tensor], None]
GroupCallback = Callable[[int, int, torch.Tensor], None]


@dataclass
class Batch:
    """A batch of windows ready to run: tokens, the state entering block 0, each block's call, and
    what the blocks return (a tensor or a tuple).

    ``real_count`` (the real tokens) and ``padded`` (whether any position is padding) are read from
    the mask on the host when the batch is made: asked of the mask on a GPU, each would wait for the
    device, once per block of a pass."""

    ids: torch.Tensor
    mask: torch.Tensor
    entering: torch.Tensor
    calls: list[BlockCall]
    form: OutputForm
    real_count: int
    padded: bool

    @property
    def real(self) -> torch.Tensor:
        """Which positions hold real (unpadded) tokens, as booleans."""
        return self.mask.bool()

    @property
    def num_windows(self) -> int:
        return int(self.ids.shape[0])

    def real_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """:func:`real_tokens` of this batch."""
        return real_tokens(hidden, self.real)


def real_tokens(hidden: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The rows of the real (unpadded) tokens, ``[tokens, d]`` in window order, whether ``hidden`` is
    ``[B, T, d]`` or already flattened to ``[B*T, d]`` (OPT's MLP works on flattened tokens)."""
    return hidden.detach().reshape(-1, hidden.shape[-1])[real.reshape(-1).to(hidden.device)]


@dataclass
class PlanPass:
    """One plan's pass in :meth:`Runner.run_plans`: the blocks it removes, its heal maps by anchor, the
    block it starts at and, per batch, the state entering that block."""

    removed: frozenset[int]
    fits: dict[int, FoldedMap]
    start: int
    states: list[torch.Tensor]


class Runner:
    """Runs a model's passes block by block (see the module's docstring).

    Args:
        model: a causal LM whose decoder blocks ``lorp.blocks`` finds. A runner is for the model as it
            is; after blocks are removed for good, make a new one.
    """

    def __init__(self, model: Any, onloader: Onloader | None = None) -> None:
        self.model = model
        self.onloader = onloader
        self._live = decoder_blocks(model)
        self.blocks: list[torch.nn.Module] = list(self._live)
        self.num_blocks = len(self.blocks)
        self.device = input_device(model) if onloader is None else onloader.device
        self._form: OutputForm | None = None
        self._removed: frozenset[int] = frozenset()
        self._fits: dict[int, FoldedMap] = {}
        self.block_runs = 0

    @classmethod
    def sequential(
        cls, source: Path, config: Any, *, device: torch.device | str, dtype: torch.dtype, stage: bool | None = None
    ) -> Runner:
        """A runner that keeps the decoder blocks on disk and loads each one onto ``device`` only
        while a pass runs it (``lorp.execution.onload``; ``stage``: through pinned buffers, the next
        block read while one runs, by default on a GPU); everything else is loaded once."""
        model = skeleton(config, dtype)
        onloader = Onloader(model, source, device, dtype, stage=stage)
        onloader.load_outside()
        return cls(model, onloader)

    @property
    def mode(self) -> str:
        """``resident`` (the whole model where it lives) or ``sequential`` (one block at a time)."""
        return "resident" if self.onloader is None else "sequential"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model computes its states in. In sequential mode that is the run's, not the
        skeleton's ``model.dtype``: transformers reads that off the first weight, and a bfloat16
        checkpoint run in float32 keeps its token embeddings in bfloat16 (``Onloader.load_outside``)."""
        return self.model.dtype if self.onloader is None else self.onloader.dtype

    @property
    def state_device(self) -> torch.device:
        """Where states are kept between blocks: the device when resident, the host in sequential mode
        (the device holds one block and the batch it runs)."""
        return self.device if self.onloader is None else torch.device("cpu")

    @property
    def block_loads(self) -> int:
        """Blocks brought onto the device so far (sequential; 0 when resident)."""
        return 0 if self.onloader is None else self.onloader.block_loads

    @contextmanager
    def _block(self, index: int, then: int | None = None) -> Iterator[torch.nn.Module]:
        """Block ``index`` ready to run: where it lives, or loaded for the length of the block with
        its heal map (if the view has one) folded in, block ``then`` read from disk meanwhile."""
        if self.onloader is None:
            yield self.blocks[index]
            return
        with self.onloader.block(index, then) as block:
            fit = self._fits.get(index)
            if fit is not None:
                changed = fold(self.model, block, fit.T)
                self.onloader.round_to_stored(index, changed)  # as the written checkpoint holds it
                put_weights(block, trained_weights(fit))  # a distilled anchor's weights, as stored
            yield block

    def block(self, index: int, then: int | None = None) -> AbstractContextManager[torch.nn.Module]:
        """Block ``index`` open for a pass that does more with it than run it (a block-local training,
        ``lorp.local_distill``): where it lives, or loaded for the length of the ``with`` (block
        ``then`` read meanwhile). Counted as a load like any pass's."""
        return self._block(index, then)

    def stored_weights(self, index: int, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``weights`` of block ``index`` (by name inside it) in the dtypes the checkpoint stores them in
        (sequential: what is written, held until then in its bytes, half a float32 run's for a bfloat16
        checkpoint; put back into a block in the run's dtype, :func:`put_weights`). Resident models run
        as loaded: their weights are returned as given."""
        if self.onloader is None:
            return dict(weights)
        return {name: value.to(self.onloader.stored_dtype(index, name)) for name, value in weights.items()}

    def groups(self, batches: Iterable[Batch]) -> Iterator[list[Batch]]:
        """Batches gathered for block-major passes: one at a time when resident (a batch's states are
        all a pass holds), all of them in sequential mode (each block is loaded once per group)."""
        if self.onloader is None:
            for batch in batches:
                yield [batch]
        else:
            gathered = list(batches)
            if gathered:
                yield gathered

    def _check_current(self) -> None:
        if len(self._live) + len(self._removed) != self.num_blocks:
            raise RuntimeError("the model's blocks changed since this runner was made; make a new runner")

    def batch(self, ids: torch.Tensor, mask: torch.Tensor) -> Batch:
        """Make a batch of windows ready to run (one pass through the model's forward, no block run)."""
        self._check_current()
        if self._removed:
            raise RuntimeError("batches are made on the dense model, outside a pruned view")
        real_count, padded = int(mask.bool().sum()), not bool(mask.bool().all())  # on the host, before the move
        ids, mask = ids.to(self.device), mask.to(self.device)
        # The first batch learns what a block returns by running block 0 once.
        first = self._block(0) if self._form is None and self.onloader is not None else nullcontext()
        embeddings = self.onloader.input_embeddings() if self.onloader is not None else nullcontext()
        with torch.no_grad(), first, embeddings:
            entering, calls, self._form = record_calls(self.model, self._live, ids, mask, self._form)
        return Batch(
            ids=ids, mask=mask, entering=entering, calls=calls, form=self._form, real_count=real_count, padded=padded
        )

    def batches(
        self,
        windows: TokenWindows,
        batch_size: int,
        *,
        should_cancel: Callable[[], bool] | None = None,
        doing: str = "running the model",
    ) -> Iterator[Batch]:
        """The windows as batches of ``batch_size``, each made ready as it is needed; cancel is checked
        before each (``JobCancelled`` names ``doing``)."""
        if batch_size < 1:
            raise InvalidRequestError("batch_size must be at least 1", field="calibration.batch_size")
        for begin in range(0, windows.num_windows, batch_size):
            if should_cancel is not None and should_cancel():
                raise JobCancelled(f"the job was cancelled while {doing}")
            yield self.batch(
                windows.input_ids[begin : begin + batch_size], windows.attention_mask[begin : begin + batch_size]
            )

    def run(
        self,
        batch: Batch,
        *,
        start: int = 0,
        state: torch.Tensor | None = None,
        stop: int | None = None,
        on_input: StateCallback | None = None,
        on_output: StateCallback | None = None,
    ) -> torch.Tensor:
        """Run the blocks ``start .. stop-1`` that are not removed, from ``state`` (the state entering
        block ``start``; the embedded input when ``start`` is 0 and it is omitted).

        ``on_input(j, h)`` / ``on_output(j, h)`` see the state entering / leaving each block run.
        Returns the state leaving the last block run (``state`` itself when none runs).
        """
        (hidden,) = self.run_all(
            [batch],
            start=start,
            states=None if state is None else [state],
            stop=stop,
            on_input=None if on_input is None else lambda _i, j, h: on_input(j, h),
            on_output=None if on_output is None else lambda _i, j, h: on_output(j, h),
        )
        return hidden

    def run_all(
        self,
        batches: Sequence[Batch],
        *,
        start: int = 0,
        states: Sequence[torch.Tensor] | None = None,
        stop: int | None = None,
        on_input: GroupCallback | None = None,
        on_output: GroupCallback | None = None,
    ) -> list[torch.Tensor]:
        """:meth:`run` over several batches, block-major: each block runs on every batch before the
        next one (in sequential mode, one load per block). Callbacks get the batch's position first."""
        stop = self.num_blocks if stop is None else stop
        if states is None:
            if start != 0:
                raise ValueError("a pass that starts after block 0 needs the state entering its first block")
            states = [batch.entering for batch in batches]
        hidden = list(states)
        order = [j for j in range(start, stop) if j not in self._removed]
        with torch.no_grad():
            for j, then in zip(order, [*order[1:], None], strict=True):
                with self._block(j, then) as block:
                    for i, batch in enumerate(batches):
                        if on_input is not None:
                            on_input(i, j, hidden[i])
                        out = batch.calls[j](block, hidden[i].to(self.device))
                        hidden[i] = out.to(self.state_device)
                        self.block_runs += 1
                        if on_output is not None:
                            on_output(i, j, hidden[i])
        return hidden

    @contextmanager
    def folded_in(self, index: int, block: torch.nn.Module, fit: FoldedMap | None) -> Iterator[None]:
        """``fit`` folded into ``block`` (block ``index``, open) for the length of the ``with``, then
        the block's weights as they were (in sequential mode rounded as the checkpoint stores them)."""
        if fit is None:
            yield
            return
        with folded(self.model, [fit]):
            if self.onloader is not None:
                self.onloader.round_to_stored(index, list(fold_weights(self.model, block)))
            yield

    def run_plans(
        self,
        batches: Sequence[Batch],
        passes: Sequence[PlanPass],
        *,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Several plans' passes over the same batches, block-major across the plans: each block is
        brought to the device once (in sequential mode, one load) and runs, for every plan that keeps
        it and has started, on every batch, its heal map folded in for that plan alone.

        Returns, per plan, the states leaving the last block (per batch). Plans whose passes share a
        prefix still run it once each: they differ in what they removed before it.
        """
        if self._removed:
            raise RuntimeError("run_plans runs on the dense model, outside a pruned view")
        hidden = [list(p.states) for p in passes]
        users = {
            j: [k for k, p in enumerate(passes) if p.start <= j and j not in p.removed] for j in range(self.num_blocks)
        }
        order = [j for j in range(self.num_blocks) if users[j]]
        with torch.no_grad():
            for j, then in zip(order, [*order[1:], None], strict=True):
                if should_cancel is not None and should_cancel():
                    raise JobCancelled("the job was cancelled while scoring plans")
                with self._block(j, then) as block:
                    for k in users[j]:
                        with self.folded_in(j, block, passes[k].fits.get(j)):
                            for i, batch in enumerate(batches):
                                hidden[k][i] = batch.calls[j](block, hidden[k][i].to(self.device)).to(self.state_device)
                                self.block_runs += 1
        return hidden

    def states_all(self, batches: Sequence[Batch]) -> list[list[torch.Tensor]]:
        """:meth:`states` of several batches, block-major."""
        found: list[list[torch.Tensor]] = [[] for _ in batches]
        finals = self.run_all(batches, on_input=lambda i, _j, h: found[i].append(h))
        return [[*states, final] for states, final in zip(found, finals, strict=True)]

    def states(self, batch: Batch) -> list[torch.Tensor]:
        """The dense states of a batch: entering blocks 0..N-1, then leaving block N-1 (N + 1 of them)."""
        (states,) = self.states_all([batch])
        return states

    @contextmanager
    def head(self) -> Iterator[None]:
        """The head ready for the length of the ``with``: a caller taking several batches' logits
        holds it once for all of them (in sequential mode an untied head is otherwise loaded for each
        call of :meth:`logits` and :meth:`window_logits`, and freed after it)."""
        with self.onloader.head() if self.onloader is not None else nullcontext():
            yield

    def logits(
        self, batch: Batch, final: torch.Tensor, keep: torch.Tensor | None = None, rows: slice | None = None
    ) -> torch.Tensor:
        """The model's logits for ``final``, a state leaving its last block (its own norm and head), of the
        batch's windows ``rows`` where given; at the positions ``keep`` alone where given."""
        with torch.no_grad(), self.head():
            return self.head_with_grad(batch, final.to(self.device), rows=rows, keep=keep)

    def window_logits(self, batch: Batch, final: torch.Tensor) -> Generator[tuple[slice, torch.Tensor], None, None]:
        """:meth:`logits` a window at a time, with the windows' rows of the batch: a whole batch's
        logits are ``[windows, tokens, vocabulary]``, 0.2 GB in float32 for 4 x 256 tokens of a
        49,152-word vocabulary, and a measure that reduces them per window never needs them all."""
        with torch.no_grad(), self.head():
            for row in range(batch.num_windows):
                rows = slice(row, row + 1)
                yield (
                    rows,
                    head_logits(
                        self.model,
                        self._live,
                        batch.ids[rows],
                        batch.mask[rows],
                        final[rows].to(self.device),
                        batch.form,
                    ),
                )

    def logits_with_grad(
        self, batch: Batch, *, start: int = 0, state: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits of the model as it stands with gradients flowing to whatever requires them, from
        ``state`` entering block ``start`` (the embedded input when omitted); at the positions ``keep``
        alone where given: :meth:`run_with_grad`, then :meth:`head_with_grad`."""
        return self.head_with_grad(batch, self.run_with_grad(batch, start=start, state=state), keep=keep)

    def run_with_grad(self, batch: Batch, *, start: int = 0, state: torch.Tensor | None = None) -> torch.Tensor:
        """The state leaving the last block of the model as it stands, with gradients flowing to whatever
        requires them (a distillation step, ``lorp.distill``), from ``state`` entering block ``start``
        (the embedded input when omitted). Resident only: a backward pass needs every block it ran held,
        with its activations."""
        if self.onloader is not None:
            raise RuntimeError("a pass with gradients needs the model resident")
        if state is None and start != 0:
            raise ValueError("a pass that starts after block 0 needs the state entering its first block")
        hidden = batch.entering if state is None else state
        for j in range(start, self.num_blocks):
            if j not in self._removed:
                hidden = batch.calls[j](self.blocks[j], hidden)
                self.block_runs += 1
        return hidden

    def head_with_grad(
        self, batch: Batch, final: torch.Tensor, *, rows: slice | None = None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The logits for ``final`` (the state leaving the last block, of the batch's windows ``rows`` where
        given) with gradients flowing to it; at the positions ``keep`` alone where given. A step takes
        them a window at a time: a batch's logits over a large vocabulary dwarf its states."""
        ids, mask = (batch.ids, batch.mask) if rows is None else (batch.ids[rows], batch.mask[rows])
        return head_logits(self.model, self._live, ids, mask, final, batch.form, keep=keep)

    def forward_logits(self, batch: Batch) -> torch.Tensor:
        """The logits of the model as it stands (in a pruned view: the pruned model's)."""
        return self.logits(batch, self.run(batch))

    @contextmanager
    def pruned(self, removed: Sequence[int] = (), fits: Sequence[FoldedMap] = ()) -> Iterator[Runner]:
        """This runner with ``removed`` blocks skipped and ``fits`` folded in, for the block's length.

        The kept blocks carry the indices the pruned model gives them (a view, ``lorp.blocks``) and
        the model is restored on exit. Batches are made before entering (on the dense model).
        """
        removed_set = frozenset(int(b) for b in removed)
        if self._removed:
            raise RuntimeError("pruned views do not nest")
        view = pruned_view(self.model, sorted(removed_set)) if removed_set else nullcontext()
        # Resident: folded into the weights for the view's length. Sequential: folded into each
        # anchor block as it is loaded (its weights are on disk until then).
        fold_now = folded(self.model, fits) if self.onloader is None else nullcontext()
        with fold_now, view:
            self._removed = removed_set
            self._fits = {} if self.onloader is None else {fit.anchor: fit for fit in fits}
            try:
                yield self
            finally:
                self._removed = frozenset()
                self._fits = {}

    @contextmanager
    def watch(self, module: torch.nn.Module, scale: float = 1.0) -> Iterator[list[torch.Tensor]]:
        """A list holding the latest output of ``module`` (a part of a block; the first of what it
        returns when that is a tuple), times ``scale``, while the block is open.

        The output is copied: some blocks add into it in place afterwards (Falcon's parallel MLP).
        """
        latest: list[torch.Tensor] = []

        def keep(_module: Any, _args: Any, output: Any) -> None:
            value = output[0] if isinstance(output, tuple) else output
            latest[:] = [value.detach().clone() if scale == 1.0 else value.detach() * scale]

        handle = module.register_forward_hook(keep)
        try:
            yield latest
        finally:
            handle.remove()

    @contextmanager
    def watch_mlp(self, blocks: Iterable[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
        """The MLP output M of each of ``blocks`` as it joins the residual stream (``lorp.heal``; a
        mixture of experts' whole routed sum, Granite's scaled): by block, a list holding its latest."""
        with ExitStack() as stack:
            yield {j: stack.enter_context(self.watch(*mlp_output(self.model, self.blocks[j]))) for j in blocks}


def as_runner(model: Any) -> Runner:
    """``model`` itself when it is a runner, else a runner for it."""
    return model if isinstance(model, Runner) else Runner(model)
