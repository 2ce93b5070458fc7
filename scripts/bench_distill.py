"""Healing by distillation on the demo model: held-out perplexity, divergence from the dense model and the
built-in task, for heal none / linear / distill, side by side in one run.

At each budget, for ``auto`` and ``search`` (each choice made as a job makes it, ``choose_plan``): the
plan chosen unhealed and shipped as it is, the plan chosen with the linear heal and shipped with its
maps, and that plan distilled (``lorp.distill``, as a job runs it: the dense model's final states on the
calibration and validation windows, the adapters trained on the calibration windows, the validation
guard), and distilled block-locally as a sequential job does (``lorp.local_distill``, each cut's anchor
toward the dense span's output, same steps per anchor and learning rate, same guard). On the same
held-out windows of the built-in evaluation text: perplexity, mean KL(dense || pruned) and top-1
agreement; on ``lorp_cloze`` (first ``--limit`` items) the accuracy, for each method at the
``--task-budgets``. Costs are wall time relative to one capture of the same calibration windows: each
budget's runs come right after a capture of their own, and the unit is the median of the run's captures
(the same work each time, whose time still varies by a tenth or more between budgets on this machine).
Each method's plans get a section of docs/benchmarks.md of their own (``benchdoc.distill_heading``), so
``--methods search`` alone records search's plans and leaves auto's section as it was.

    python scripts/bench_distill.py [--budgets 4 6 8 10] [--limit 200] [--steps 64] [--ce-weight 0.3]

``--explore STEPS:LR:SCOPE[:RANK[:POSITIONS]] ...`` distils auto's healed plan (``--explore-method``
names another method's, ``--explore-metric kl`` has it chosen and guarded by the validation KL) at the
first budget once per setting and prints held-out figures only (how the defaults in lorp.options /
lorp.distill / lorp.local_distill were chosen), and ``lorp_cloze``'s accuracy where ``--limit`` is not
0; nothing is written. SCOPE: ``all``, ``tail`` or ``cuts`` (resident
distillation's adapters, ``lorp.distill.SCOPES``), ``local`` (block-local, STEPS per anchor),
``local+all`` (block-local at its defaults, then resident distillation of STEPS from there).
``--seed`` seeds the distillations (adapters, window order). ``--context-weight BETA ...`` runs each
setting once per BETA with each prediction's KL weighted by how much the dense model's prediction depends
on distant context (``context_dependence``, ``--context-chunk`` tokens; 0: unweighted).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import itertools
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchdemo import demo_calibration, demo_model, held_out_windows, timed_capture  # noqa: E402
from benchdoc import distill_heading, replace_section  # noqa: E402

from lorp.anchor_training import LOCAL_LEARNING_RATE  # noqa: E402
from lorp.assets.cloze import TASK_NAME  # noqa: E402
from lorp.blocks import decoder_blocks, pruned_view, remove_blocks  # noqa: E402
from lorp.distill import (  # noqa: E402
    CE_WEIGHT,
    DEFAULT_SCOPE,
    LEARNING_RATE,
    RANK,
    SCOPES,
    WARM_STEPS,
    WARM_WINDOWS,
    dense_finals,
    distill,
    plan_teacher,
    pruned_anchors,
    training_autocast,
    windows_to_read,
)
from lorp.divergence import DenseFinals, Divergence  # noqa: E402
from lorp.downstream import run_tasks  # noqa: E402
from lorp.evaluation import mean_to_perplexity, negative_log_likelihood  # noqa: E402
from lorp.execution import Runner, folded  # noqa: E402
from lorp.execution.healed import put_weights, trained_weights  # noqa: E402
from lorp.local_distill import distill_locally  # noqa: E402
from lorp.options import DEFAULT_HEAL_STEPS, DEFAULT_LOCAL_HEAL_STEPS  # noqa: E402
from lorp.planner import choose_plan  # noqa: E402
from lorp.scoring import apply_fits  # noqa: E402
from lorp.spec import CalibrationSpec, ModelSpec, PruneSpec, SelectionOptions, TargetSpec, TaskSpec  # noqa: E402

HEALS = ("none", "linear", "distill")
QUANTILES = torch.tensor([0.1, 0.5, 0.9, 0.99])


class Measure:
    """Held-out perplexity, KL and top-1 agreement against the dense model, and the task's accuracy."""

    def __init__(self, model, tokenizer, windows, batch_size: int, limit: int) -> None:
        self.model, self.tokenizer, self.windows, self.batch_size = model, tokenizer, windows, batch_size
        self.task = [TaskSpec(name=TASK_NAME, limit=limit)] if limit else []
        self.dense = DenseFinals()
        self.dense_ppl = mean_to_perplexity(
            *negative_log_likelihood(model, windows, batch_size=batch_size, keep=self.dense)
        )

    def held_out(self, model, plan=(), fits=()) -> dict[str, float]:
        divergence = Divergence()
        nll, tokens = negative_log_likelihood(
            model, self.windows, batch_size=self.batch_size, removed=plan, fits=fits, against=self.dense,
            divergence=divergence,
        )  # fmt: skip
        return {"ppl": mean_to_perplexity(nll, tokens), **divergence.summary()}

    def accuracy(self, model, plan=(), fits=()) -> float | None:
        if not self.task:
            return None
        with folded(model, fits), pruned_view(model, plan):
            scores, _ = run_tasks(model, self.tokenizer, self.task, batch_size=8)
        return next(s.value for s in scores if s.metric == "acc")


def context_dependence(model, windows, chunk: int, batch_size: int) -> list[torch.Tensor]:
    """Each training window's per-prediction context dependence: the KL between the dense model's
    prediction with the whole window before it and with only its last ``chunk / 2`` to ``chunk`` tokens
    (from two chunkings offset by half a chunk; the first ``chunk`` positions see all there is, 0)."""
    half = chunk // 2
    length = windows.input_ids.shape[1]
    positions = torch.arange(length)
    first_better = (positions % chunk) >= torch.where(positions < half, positions, (positions - half) % chunk)
    autocast = training_autocast(model)
    depend: list[torch.Tensor] = []

    def chunked(ids, mask, start):
        bounds = [0, *range(start, length, chunk), length] if start else [*range(0, length, chunk), length]
        outs = []
        for a, b in itertools.pairwise(bounds):
            outs.append(model(input_ids=ids[:, a:b], attention_mask=mask[:, a:b]).logits.float().log_softmax(-1))
        return torch.cat(outs, dim=1)

    with torch.inference_mode(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        for at in range(0, windows.num_windows, batch_size):
            ids = windows.input_ids[at : at + batch_size]
            mask = windows.attention_mask[at : at + batch_size]
            full = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            short = torch.where(first_better[None, :, None], chunked(ids, mask, 0), chunked(ids, mask, half))
            kl = (full.exp() * (full - short)).sum(-1) * mask
            depend += list(kl[:, :-1])
    return depend


def context_weights(depend: list[torch.Tensor], beta: float) -> list[torch.Tensor]:
    """Per-prediction loss weights of mean 1: ``1 + beta x`` the context dependence over its mean on
    all the windows, divided by ``1 + beta``."""
    mean = float(torch.stack(depend).mean())
    return [(1 + beta * d / mean) / (1 + beta) for d in depend]


def distilled_copy(
    model, fits, removed, data, validation_teacher, *, steps, learning_rate, batch_size, autocast,
    scope=DEFAULT_SCOPE, rank=RANK, positions=None, position_weights=None, metric="perplexity", ce_weight=CE_WEIGHT,
    seed=0, warm_steps=WARM_STEPS,
):  # fmt: skip
    """A copy of ``model`` with ``fits`` folded (a trained anchor's weights put in after its fold), the
    ``removed`` blocks cut, then distilled as a job distils it (``autocast``: the training passes' dtype,
    None for float32). Returns the copy, the summary and the seconds, which count the teacher's pass over
    the training windows (``validation_teacher``: the dense final states on the validation windows)."""
    pruned = copy.deepcopy(model)
    apply_fits(pruned, fits)
    for fit in fits:
        put_weights(decoder_blocks(pruned)[fit.anchor], trained_weights(fit))
    removed = sorted(removed)
    anchors = [fit.anchor for fit in fits]
    # The teacher on the training windows, as a job runs it for its plan: timed with the distillation.
    started = time.perf_counter()
    train_teacher = plan_teacher(
        model, data.training_windows, batch_size, removed, anchors, scope=scope, autocast=autocast
    )
    print(f"teacher: {data.training_windows.num_windows} training windows, {time.perf_counter() - started:.1f} s")
    remove_blocks(pruned, removed)
    summary = distill(
        pruned, data.training_windows, train_teacher, data.validation, validation_teacher,
        anchors=pruned_anchors(anchors, removed), steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        scope=scope, rank=rank, positions=positions, autocast=autocast, ce_weight=ce_weight, seed=seed,
        warm_steps=warm_steps, position_weights=position_weights, metric=metric,
    )  # fmt: skip
    return pruned, summary, time.perf_counter() - started


def copy_settings(args, model) -> dict:
    """``distilled_copy``'s settings from this script's arguments."""
    return {
        "batch_size": args.batch_size, "ce_weight": args.ce_weight, "seed": args.seed, "warm_steps": args.warm_steps,
        "autocast": training_autocast(model) if args.precision == "auto" else None,
    }  # fmt: skip


def distilled_locally(model, choice, data, args, steps, learning_rate):
    """The choice's fits with its anchors distilled block-locally (``lorp.local_distill``, what a sequential
    job runs; run here through the resident runner, which gives the same weights)."""
    started = time.perf_counter()
    summary, shipped = distill_locally(
        Runner(model), data.capture, data.validation, removed=choice.chosen.pruned_layers, fits=choice.fits,
        steps=steps, batch_size=args.batch_size, learning_rate=learning_rate, seed=args.seed,
    )  # fmt: skip
    return shipped, summary, time.perf_counter() - started


def in_median_captures(rows: list) -> None:
    """Each cost in ``rows`` (budget, capture seconds, cells by method), measured against its own
    budget's capture, restated in place against the median capture of the run."""
    unit = statistics.median(capture_s for _, capture_s, _ in rows)
    for _, capture_s, row in rows:
        for cells in row.values():
            for cell in cells.values():
                for key in ("cost", "distill_cost"):
                    if key in cell:
                        cell[key] *= capture_s / unit


def method_section(method, rows, args, started_at, n_blocks, data, measure, dense_acc, captures) -> list[str]:
    """docs/benchmarks.md's section for ``method``: its plans at each budget, none / linear / distill /
    block-local side by side, then the issue's targets against its own plan chosen unhealed."""
    autocast = training_autocast(measure.model) if args.precision == "auto" else None
    precision = "float32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast"
    task = ""
    flags = f" --ce-weight {args.ce_weight:g}" if args.ce_weight != CE_WEIGHT else ""
    flags += f" --seed {args.seed}" if args.seed else ""
    flags += f" --warm-steps {args.warm_steps}" if args.warm_steps != WARM_STEPS else ""
    loss = f", loss KL + {args.ce_weight:g} x cross-entropy on the training text" if args.ce_weight else ""
    if args.limit and dense_acc is not None:
        task = f"; `{TASK_NAME}` accuracy on its first {args.limit} items (dense {dense_acc:.3f})"
    heading = (
        f"Recorded {started_at} by `python scripts/bench_distill.py --budgets {' '.join(map(str, args.budgets))} "
        f"--methods {' '.join(args.methods)} --limit {args.limit} "
        f"--task-budgets {' '.join(map(str, args.task_budgets))} --steps {args.steps} "
        f"--local-steps {args.local_steps}{flags}` ({platform.machine()}, CPU float32, torch {torch.__version__}; "
        f"distillation's training passes in {precision}). "
        f"Demo model ({n_blocks} blocks); calibration {args.num_samples} x {args.seq_len} built-in tokens "
        f"(distillation trains on {data.training_windows.num_windows} windows of the same text, these and more, "
        f"as a job draws them; block-local on these; {data.validation.num_windows} validation windows decide "
        "what ships); held-out: "
        f"{args.eval_windows} x {args.eval_len} tokens of the built-in evaluation text (dense perplexity "
        f"{measure.dense_ppl:.2f}){task}. Distillation: "
        f"{args.steps} steps of {args.batch_size} windows, learning rate {args.learning_rate:g}, adapters on "
        f"{args.scope} kept blocks{loss}, each healed cut's anchor first trained {args.warm_steps} steps toward "
        f"the dense span's output on the first {WARM_WINDOWS} training windows; block-local: {args.local_steps} "
        "steps per anchor, learning rate "
        f"{args.local_learning_rate:g}."
    )
    section = [
        distill_heading(method),
        "",
        heading,
        "",
        f"Each cell: held-out perplexity / mean KL (nats) / top-1 agreement of {method}'s plan: chosen unhealed "
        "(none), chosen with the linear heal and shipped with its maps (linear), that plan distilled (distill) "
        "and distilled block-locally (block-local); the model that shipped in brackets. Cost: choosing (and, "
        "for distill, the teacher passes and the distillation) relative to one capture of the calibration "
        f"windows: the median of the run's {len(captures)} captures, {statistics.median(captures):.1f} s "
        f"({min(captures):.1f}-{max(captures):.1f} s).",
        "",
        "| blocks | none | linear | distill (shipped) | block-local (shipped) "
        "| cost none / linear / distill / block-local |",
        "|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(c: dict) -> str:
        return f"{c['ppl']:.2f} / {c['kl_mean']:.3f} / {c['top1_agreement']:.3f}"

    for n, cells in rows:
        section.append(
            f"| {n} | {cell(cells['none'])} | {cell(cells['linear'])} | {cell(cells['distill'])} "
            f"({cells['distill']['shipped']}) | {cell(cells['local'])} ({cells['local']['shipped']}) | "
            f"{cells['none']['cost']:.1f} / {cells['linear']['cost']:.1f} / {cells['distill']['cost']:.1f} / "
            f"{cells['local']['cost']:.1f} |"
        )
    section += [
        "",
        f"Targets, against {method}'s plan chosen unhealed: distill's held-out perplexity <= 0.70 of it at 6 "
        "blocks and <= 0.50 at 8 and 10; mean KL lower with distill than linear at every budget; distillation "
        "<= 20 captures at 8 blocks; task accuracy >= 95% of dense at 4, >= 85% at 8.",
        "",
        "| blocks | unhealed ppl | linear ratio | distill ratio | block-local ratio "
        "| KL linear -> distill / block-local | distillation / block-local x capture "
        "| acc none / linear / distill (of dense) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for n, cells in rows:
        best = cells["none"]["ppl"]
        accs = "n/a"
        if "acc" in cells["none"] and dense_acc:
            accs = " / ".join(f"{cells[h]['acc']:.3f} ({cells[h]['acc'] / dense_acc:.0%})" for h in HEALS)
        section.append(
            f"| {n} | {best:.2f} | {cells['linear']['ppl'] / best:.3f} | {cells['distill']['ppl'] / best:.3f} | "
            f"{cells['local']['ppl'] / best:.3f} | {cells['linear']['kl_mean']:.3f} -> "
            f"{cells['distill']['kl_mean']:.3f} / {cells['local']['kl_mean']:.3f} | "
            f"{cells['distill']['distill_cost']:.1f} / {cells['local']['distill_cost']:.1f} | {accs} |"
        )
    return section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 6, 8, 10])
    parser.add_argument("--methods", nargs="+", default=["auto", "search"])
    parser.add_argument("--task-budgets", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--limit", type=int, default=200, help="items of the built-in task (0: skip it)")
    parser.add_argument("--steps", type=int, default=DEFAULT_HEAL_STEPS)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--local-steps", type=int, default=DEFAULT_LOCAL_HEAL_STEPS, help="block-local, per anchor")
    parser.add_argument("--local-learning-rate", type=float, default=LOCAL_LEARNING_RATE)
    parser.add_argument("--scope", default=DEFAULT_SCOPE, choices=list(SCOPES))
    parser.add_argument("--seed", type=int, default=0, help="the distillations' seed (adapters, window order)")
    parser.add_argument(
        "--warm-steps", type=int, default=WARM_STEPS,
        help="steps each cut's anchor trains toward the dense span's output first (lorp.distill.WARM_STEPS)",
    )  # fmt: skip
    parser.add_argument(
        "--ce-weight", type=float, default=CE_WEIGHT,
        help="the student's cross-entropy on the training text beside the KL (lorp.distill.CE_WEIGHT)",
    )  # fmt: skip
    parser.add_argument("--num-samples", type=int, default=CalibrationSpec().num_samples)  # a job's default
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=CalibrationSpec().batch_size)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=512)
    parser.add_argument(
        "--precision", choices=["auto", "float32"], default="auto",
        help="distillation's training passes: as a job runs them (auto: lorp.distill.training_autocast), or float32",
    )  # fmt: skip
    parser.add_argument("--explore", nargs="*", default=None, metavar="STEPS:LR:SCOPE[:RANK[:POSITIONS]]")
    parser.add_argument("--explore-method", default="auto", help="whose plan --explore distils (chosen healed)")
    parser.add_argument(
        "--explore-metric", choices=["perplexity", "kl"], default="perplexity",
        help="--explore: what chooses the plan and guards the distillation (options.selection_metric)",
    )  # fmt: skip
    parser.add_argument(
        "--context-weight",
        type=float,
        nargs="*",
        default=[0.0],
        help="--explore, SCOPE all / tail / cuts: each prediction's KL weighted by its context dependence",
    )
    parser.add_argument("--context-chunk", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    if any(args.context_weight) and any(setting.split(":")[2].startswith("local") for setting in args.explore or []):
        parser.error("--context-weight weights resident distillation's loss: no local SCOPE with it")
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")

    loaded = demo_model()
    model, tokenizer = loaded.model, loaded.tokenizer
    n_blocks = len(decoder_blocks(model))
    calibration = CalibrationSpec(num_samples=args.num_samples, seq_len=args.seq_len, batch_size=args.batch_size)
    # What distillation trains on, as a job draws it (for the longest run asked for).
    most_steps = max([args.steps, *(int(setting.split(":")[0]) for setting in args.explore or [])])
    data = demo_calibration(tokenizer, calibration, num_training=windows_to_read(most_steps, args.batch_size))
    measure = Measure(
        model, tokenizer, held_out_windows(tokenizer, args.eval_len, args.eval_windows), args.batch_size, args.limit
    )
    started = time.perf_counter()
    teacher = dense_finals(model, data.validation, args.batch_size, None)  # its pass on the training windows: per plan
    teacher_s = time.perf_counter() - started  # part of what distilling costs
    settings = copy_settings(args, model)

    def capture():
        return timed_capture(model, data.capture, args.batch_size)

    def job(stats, heal_cache, method: str, heal: str, n: int, metric: str = "perplexity"):
        spec = PruneSpec(
            model=ModelSpec(id="demo"),
            method=method,
            target=TargetSpec(num_layers=n),
            calibration=calibration,
            options=SelectionOptions(heal=heal, selection_metric=metric),  # type: ignore[arg-type]
        )
        started = time.perf_counter()
        choice = choose_plan(model, stats.S, stats.D, data, spec, n_blocks, heal_cache=heal_cache)
        return choice, time.perf_counter() - started

    if args.explore is not None:
        n = args.budgets[0]
        stats, heal_cache, capture_s = capture()
        choice, _ = job(stats, heal_cache, args.explore_method, "linear", n, args.explore_metric)
        linear = measure.held_out(model, choice.chosen.pruned_layers, choice.fits)
        print(f"n={n} plan {choice.chosen.pruned_layers}, capture {capture_s:.1f} s, linear {linear}", flush=True)
        if args.limit:
            print(f"{TASK_NAME} accuracy: dense {measure.accuracy(model)}", flush=True)
        weights_by_beta = {}
        if any(args.context_weight):
            started = time.perf_counter()
            depend = context_dependence(model, data.training_windows, args.context_chunk, args.batch_size)
            print(f"context dependence: {time.perf_counter() - started:.0f} s", flush=True)
        for beta in args.context_weight:
            if beta:
                weights_by_beta[beta] = context_weights(depend, beta)
                spread = torch.stack(weights_by_beta[beta]).flatten().quantile(QUANTILES)
                print(f"context weights beta {beta}: quantiles {[round(float(q), 3) for q in spread]}", flush=True)
        for beta, setting in itertools.product(args.context_weight, args.explore):
            steps, lr, scope, *rest = setting.split(":")
            # What is measured: the dense model with the plan cut and its fits folded, or a distilled copy.
            if scope == "local":
                shipped, summary, seconds = distilled_locally(model, choice, data, args, int(steps), float(lr))
                measured = (model, choice.chosen.pruned_layers, shipped)
            elif scope == "local+all":  # block-local at its defaults first, then the whole model from there
                shipped, _, first_s = distilled_locally(
                    model, choice, data, args, args.local_steps, args.local_learning_rate
                )
                pruned, summary, seconds = distilled_copy(
                    model, shipped, choice.chosen.pruned_layers, data, teacher, steps=int(steps),
                    learning_rate=float(lr), scope="all", **settings,
                )  # fmt: skip
                seconds += first_s
                measured, pruned = (pruned, (), ()), None  # the copy held once, by measured
            else:
                rank = int(rest[0]) if rest else RANK
                positions = int(rest[1]) if len(rest) > 1 else None
                pruned, summary, seconds = distilled_copy(
                    model, choice.fits, choice.chosen.pruned_layers, data, teacher, steps=int(steps),
                    learning_rate=float(lr), scope=scope, rank=rank, positions=positions,
                    position_weights=weights_by_beta.get(beta), metric=args.explore_metric, **settings,
                )  # fmt: skip
                measured, pruned = (pruned, (), ()), None  # the copy held once, by measured
            got = measure.held_out(*measured)
            accuracy = measure.accuracy(*measured)
            del measured
            print(
                f"{setting} context weight {beta}: held-out {got}, validation ppl {summary.linear_perplexity:.3f} -> "
                f"{summary.distilled_perplexity:.3f}, KL {summary.linear_kl:.4f} -> {summary.distilled_kl:.4f}, "
                f"loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}, {seconds:.0f} s = "
                f"{seconds / capture_s:.1f} x capture, shipped {summary.shipped}"
                + (f", {TASK_NAME} accuracy {accuracy}" if accuracy is not None else ""),
                flush=True,
            )
        return 0

    dense_acc = measure.accuracy(model)
    rows = []
    for n in args.budgets:
        stats, heal_cache, capture_s = capture()
        row: dict[str, dict] = {}
        distilled_by_plan: dict[tuple, tuple] = {}
        for method in args.methods:
            plain, plain_s = job(stats, heal_cache, method, "none", n)
            healed, healed_s = job(stats, heal_cache, method, "linear", n)
            cells = {
                "none": {**measure.held_out(model, plain.chosen.pruned_layers), "plan": plain.chosen.pruned_layers,
                         "cost": plain_s / capture_s},
                "linear": {**measure.held_out(model, healed.chosen.pruned_layers, healed.fits),
                           "plan": healed.chosen.pruned_layers, "cost": healed_s / capture_s},
            }  # fmt: skip
            key = tuple(healed.chosen.pruned_layers)
            if key not in distilled_by_plan:
                pruned, summary, seconds = distilled_copy(
                    model, healed.fits, healed.chosen.pruned_layers, data, teacher, steps=args.steps,
                    learning_rate=args.learning_rate, scope=args.scope, **settings,
                )  # fmt: skip
                shipped = pruned if summary.shipped == "distill" else None
                figures = measure.held_out(pruned) if shipped is not None else cells["linear"]
                accuracy = measure.accuracy(pruned) if n in args.task_budgets else None
                fits, local, local_s = distilled_locally(
                    model, healed, data, args, args.local_steps, args.local_learning_rate
                )
                local_figures = measure.held_out(model, healed.chosen.pruned_layers, fits)
                distilled_by_plan[key] = (figures, summary, seconds, accuracy, (local_figures, local, local_s))
                del pruned
            figures, summary, seconds, accuracy, (local_figures, local, local_s) = distilled_by_plan[key]
            cells["distill"] = {
                **{k: figures[k] for k in ("ppl", "kl_mean", "kl_p99", "top1_agreement")},
                "plan": healed.chosen.pruned_layers,
                "cost": (healed_s + teacher_s + seconds) / capture_s,
                "shipped": summary.shipped,
                "distill_cost": (teacher_s + seconds) / capture_s,
            }
            cells["local"] = {
                **{k: local_figures[k] for k in ("ppl", "kl_mean", "kl_p99", "top1_agreement")},
                "plan": healed.chosen.pruned_layers,
                "cost": (healed_s + local_s) / capture_s,
                "shipped": local.shipped,
                "distill_cost": local_s / capture_s,
            }
            if n in args.task_budgets:
                cells["none"]["acc"] = measure.accuracy(model, plain.chosen.pruned_layers)
                cells["linear"]["acc"] = measure.accuracy(model, healed.chosen.pruned_layers, healed.fits)
                cells["distill"]["acc"] = accuracy if accuracy is not None else cells["linear"]["acc"]
            row[method] = cells
            print(n, method, f"capture {capture_s:.1f} s", {h: dict(c) for h, c in cells.items()}, flush=True)
        rows.append((n, capture_s, row))

    in_median_captures(rows)
    captures = [capture_s for _, capture_s, _ in rows]
    for method in args.methods:
        section = method_section(method, [(n, row[method]) for n, _, row in rows], args, started_at, n_blocks,
                                 data, measure, dense_acc, captures)  # fmt: skip
        print("\n".join(section))
        replace_section(args.out, distill_heading(method), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
