"""The engine's command line: ``python -m lorp`` (and the ``lorp`` command, which adds the service's).

lorp prune   --model M --num-layers n|--ratio r|--max-perplexity-ratio x|--max-kl x [--method auto]
             [--selection-metric perplexity|kl] [--heal linear|distill|none] [--heal-steps N]
             [--calibration SPEC] --out DIR
lorp analyze --model M [--calibration SPEC] --out FILE.npz
lorp select  --similarity FILE --num-layers n --method NAME [--num-clusters K] [--json]
lorp methods [--json]

Errors name the input at fault (``lorp: error [num_layers]: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, get_args

from pydantic import ValidationError

from lorp.errors import EngineError
from lorp.options import DEFAULT_HEAL_STEPS, DEFAULT_LOCAL_HEAL_STEPS, Heal
from lorp.selection import REGISTRY, all_methods, method_row, plan_methods

if TYPE_CHECKING:
    from lorp.result import PruneReport

Handler = Callable[[argparse.Namespace], int]
# Adds subcommands to the parser's subparsers and returns their handlers by name.
Extension = Callable[[Any], dict[str, Handler]]

CALIBRATION_HELP = (
    'calibration text: "builtin" (default: the built-in Wikipedia sample), FILE.txt, FILE.jsonl[#field], '
    'or "hf:DATASET[@REV][/CONFIG]:SPLIT#FIELD" (needs the hub)'
)


def _protected(value: str) -> tuple[int, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated block indices, got {value!r}") from exc


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help='"demo", a local HF directory, a .gguf file, or a hub id')
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights")


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default="builtin", help=CALIBRATION_HELP)
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows M (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window T (default 256)")
    p.add_argument("--seed", type=int, default=0, help="window sampling seed (default 0)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass (default 4)")
    p.add_argument("--chat-template", action="store_true", help="wrap windows in the tokenizer's chat template")


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-clusters", type=int, help="fix LoRP's K (2..N-2) instead of deriving it from RLS")
    p.add_argument(
        "--protect", type=_protected, help="comma-separated protected blocks (default 0,-1; 'none' for none)"
    )
    p.add_argument("--cluster-seed", type=int, default=0, help="spectral clustering random_state (default 0)")


def _add_target_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-layers", type=int, help="blocks to remove")
    target.add_argument("--ratio", type=float, help="fraction of blocks to remove (rounded down)")
    target.add_argument(
        "--max-perplexity-ratio",
        type=float,
        help="remove the most blocks whose best plan keeps validation perplexity within this multiple of dense",
    )
    target.add_argument(
        "--max-kl",
        type=float,
        help="remove the most blocks whose best plan keeps the validation mean KL from the dense model's "
        "next-token distributions within this many nats",
    )


def _add_heal_args(prune: argparse.ArgumentParser) -> None:
    """``--heal`` and ``--heal-steps``: ``options.heal`` and ``options.heal_steps``."""
    prune.add_argument(
        "--heal",
        choices=list(get_args(Heal)),
        help="linear: fold a fitted linear map into the block before each cut (default where the architecture "
        "allows); distill: then train low-rank adapters toward the dense model's predictions (sequential "
        "execution: each cut's anchor block toward the dense span's output), shipped where they score better on "
        "the validation windows; none: remove the blocks as they are",
    )
    prune.add_argument(
        "--heal-steps",
        type=int,
        help=f"distillation steps with --heal distill (default {DEFAULT_HEAL_STEPS}; in sequential execution "
        f"{DEFAULT_LOCAL_HEAL_STEPS} per anchor block; 0 ships the linear heal)",
    )


def add_engine_commands(sub: Any) -> dict[str, Handler]:
    """``prune``, ``analyze``, ``select`` and ``methods`` on ``sub`` (an argparse subparsers object)."""
    prune = sub.add_parser("prune", help="analyse, select, remove blocks, verify, evaluate, save")
    _add_model_args(prune)
    _add_target_args(prune)
    prune.add_argument(
        "--method",
        default="auto",
        help=f"{', '.join(all_methods())} (default auto); `lorp methods` says what each does",
    )
    prune.add_argument(
        "--selection-metric",
        choices=["perplexity", "kl"],
        default="perplexity",
        help="what ranks the plans auto and search validate: validation perplexity (default), or the mean KL "
        "from the dense model's predictions on the validation windows (kl)",
    )
    _add_heal_args(prune)
    prune.add_argument(
        "--execution",
        choices=["auto", "resident", "sequential"],
        default="auto",
        help="run the model whole (resident) or one block at a time from its safetensors files (sequential); "
        "auto (default): resident when it fits the device's memory (LORP_DEVICE_MEMORY_GB)",
    )
    _add_calibration_args(prune)
    _add_selection_args(prune)
    prune.add_argument("--eval", dest="eval_source", help="held-out text (default: built-in evaluation split)")
    prune.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (default 32)")
    prune.add_argument("--no-perplexity", action="store_true", help="skip held-out perplexity")
    prune.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    prune.add_argument(
        "--task",
        dest="tasks",
        action="append",
        default=[],
        metavar="NAME",
        help="an lm-eval task to run dense and pruned (repeatable; the built-in one is lorp_cloze)",
    )
    prune.add_argument("--task-limit", type=int, help="items per task (default: all)")
    prune.add_argument("--num-fewshot", type=int, help="few-shot examples per task (default: the task's own)")
    prune.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        metavar="TEXT",
        help="a prompt to complete greedily, dense and pruned (repeatable; default: three built-in prompts)",
    )
    prune.add_argument(
        "--curve-budgets",
        type=int,
        nargs="*",
        metavar="N",
        help="budgets the budget curve scores each method's plan at (default: up to 4 up to the job's; "
        "none given: no curve)",
    )
    prune.add_argument(
        "--curve-distill",
        action="store_true",
        help="with --heal distill: distil the best plan at each curve budget too (a distillation per budget)",
    )
    prune.add_argument("--out", required=True, help="output directory (missing or empty)")
    prune.add_argument("--json", action="store_true", help="print the report as JSON")

    analyze = sub.add_parser("analyze", help="capture S and D only")
    _add_model_args(analyze)
    _add_calibration_args(analyze)
    analyze.add_argument("--out", required=True, help="output .npz (S, D)")

    sel = sub.add_parser("select", help="pure selection from a saved analysis (.npz with S and D, or .npy S)")
    sel.add_argument("--similarity", required=True, help=".npz with S and D, or .npy with S")
    sel.add_argument("--num-layers", type=int, required=True, help="blocks to remove")
    sel.add_argument("--method", default="lorp", help=f"{', '.join(plan_methods())} (default lorp)")
    _add_selection_args(sel)
    sel.add_argument("--json", action="store_true", help="print one JSON object")

    methods = sub.add_parser("methods", help="the pruning methods: what each does, what auto and the curve use")
    methods.add_argument("--json", action="store_true", help="print a JSON list")

    return {"prune": _cmd_prune, "analyze": _cmd_analyze, "select": _cmd_select, "methods": _cmd_methods}


def build_parser(extend: Extension | None = None) -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """The parser and the handler of each command: the engine's, plus what ``extend`` adds."""
    parser = argparse.ArgumentParser(prog="lorp", description="Depth pruning of causal LMs with LoRP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = add_engine_commands(sub)
    if extend is not None:
        handlers.update(extend(sub))
    return parser, handlers


class _Bars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar: Any = None
        self._stage: str | None = None

    def __call__(self, stage: str, fraction: float) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = self._tqdm(total=100, desc=f"{stage:<18}", unit="%", file=sys.stderr, leave=True)
        pos = round(100 * min(max(fraction, 0.0), 1.0))
        if self._bar is not None and pos > self._bar.n:
            self._bar.update(pos - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _model_spec(args: argparse.Namespace) -> Any:
    from lorp.spec import ModelSpec

    return ModelSpec(
        id=args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )


def _calibration_spec(args: argparse.Namespace) -> Any:
    from lorp.spec import CalibrationSpec

    return CalibrationSpec(
        dataset=args.calibration,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
    )


def _cmd_prune(args: argparse.Namespace) -> int:
    from lorp.pipeline import run_prune
    from lorp.spec import EvaluationSpec, PruneSpec, SelectionOptions, TargetSpec, TaskSpec

    spec = PruneSpec(
        model=_model_spec(args),
        method=args.method,
        target=TargetSpec(
            num_layers=args.num_layers,
            ratio=args.ratio,
            max_perplexity_ratio=args.max_perplexity_ratio,
            max_kl=args.max_kl,
        ),
        calibration=_calibration_spec(args),
        options=SelectionOptions(
            num_clusters=args.num_clusters,
            protected_layers=args.protect,
            cluster_seed=args.cluster_seed,
            heal=args.heal,
            heal_steps=args.heal_steps,
            execution=args.execution,
            selection_metric=args.selection_metric,
        ),
        evaluation=EvaluationSpec(
            dataset=args.eval_source,
            max_windows=args.eval_windows,
            perplexity=not args.no_perplexity,
            speed=not args.no_speed,
            tasks=[TaskSpec(name=name, limit=args.task_limit, num_fewshot=args.num_fewshot) for name in args.tasks],
            **({"prompts": args.prompts} if args.prompts else {}),
            curve_budgets=args.curve_budgets,
            curve_distill=args.curve_distill,
        ),
    )
    bars = _Bars()
    try:
        result = run_prune(spec, args.out, progress=bars)
    finally:
        bars.close()
    report = result.report
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    print(_summary(report, str(result.out_dir)))
    return 0


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _summary(report: PruneReport, out_dir: str) -> str:
    structure, metrics = report.analysis, report.metrics
    lines = [
        f"model           {report.request['model']['id']} ({structure.num_blocks} blocks)",
        f"RLS / K         {_fmt(structure.rls, '.3f')} / {structure.k}",
        f"method          {report.method} -> {report.chosen.candidate}",
        f"removed blocks  {report.chosen.pruned_layers}",
    ]
    execution = report.execution
    if execution is not None:
        loads = f", {execution.block_loads} block loads" if execution.mode == "sequential" else ""
        lines.append(f"execution       {execution.mode} on {execution.device}{loads} ({execution.reason})")
        if execution.resumed_at_block is not None:
            at = execution.resumed_at_block
            lines.append(f"resumed         the capture went on from an earlier run's states at block {at}")
        lines.extend(f"skipped         {line}" for line in execution.skipped)
    lines.extend(_quality_lines(report))
    heal = report.heal
    if heal.distill is not None:
        lines.append(_distill_line(heal.distill))
    if heal.method != "none":
        for span in heal.spans:
            lines.append(
                f"healed span     [{span['start']}, {span['end']}) into block {span['anchor']}: residual "
                f"{span['residual_before']:.3f} -> {span['residual_after']:.3f}"
            )
    else:
        lines.append("healed          no (blocks removed as they are)")
    if report.selection is not None:
        lines.append(
            f"plans scored    {report.selection.evaluations} in full, {report.selection.screenings} screened "
            f"({report.selection.heal_fits} heal fits) "
            f"in {report.selection.cache_s + report.selection.scoring_s:.1f} s"
        )
    lines.extend(_candidate_lines(report))
    if "perplexity" in metrics.dense:
        lines.append(
            f"perplexity      dense {_fmt(metrics.dense['perplexity'])} -> pruned {_fmt(metrics.pruned['perplexity'])}"
        )
    if "kl_mean" in metrics.pruned:
        lines.append(
            f"vs dense        KL {metrics.pruned['kl_mean']:.4f} nats mean, {metrics.pruned['kl_p99']:.3f} p99; "
            f"same top token {metrics.pruned['top1_agreement']:.1%}"
        )
    pruned_tasks = {(t["task"], t["metric"]): t for t in metrics.pruned.get("tasks", [])}
    for score in metrics.dense.get("tasks", []):
        match = pruned_tasks.get((score["task"], score["metric"]))
        lines.append(
            f"task            {score['task']} {score['metric']}: dense {score['value']:.3f} -> pruned "
            f"{_fmt(match['value'] if match else None, '.3f')} ({score['num_samples']} items)"
        )
    lines.extend(_curve_lines(report))
    for generation in report.generations:
        lines.append(f"prompt          {generation.prompt!r}")
        lines.append(f"  dense         {generation.dense!r}")
        lines.append(f"  pruned        {generation.pruned!r}")
    if metrics.decode_speedup is not None:
        lines.append(f"decode speed    x{metrics.decode_speedup:.2f} (bound N/(N-n) = {metrics.speedup_bound:.2f})")
    lines.append(f"pruned model    {out_dir}/model")
    lines.append(f"report          {out_dir}/report.json")
    charts = [f"{out_dir}/{report.files[k]}" for k in ("heatmap", "plans", "budget_curve") if k in report.files]
    lines.append(f"charts          {', '.join(charts)}")
    return "\n".join(lines)


def _distill_line(distill: dict[str, Any]) -> str:
    """What distillation did and which heal shipped."""
    after = distill["distilled_perplexity"]
    scores = (
        f"validation ppl {distill['linear_perplexity']:.3f} linear -> {after:.3f} distilled, "
        f"KL {distill['linear_kl']:.4f} -> {distill['distilled_kl']:.4f}; "
        if after is not None
        else ""
    )
    warm = f" (each cut's anchor first {distill['warm_steps']} steps alone)" if distill.get("warm_steps") else ""
    losses = {"kl": "KL", "kl+ce": f"KL + {distill.get('ce_weight', 0):g} x text CE", "state": "block output"}
    loss = losses.get(distill["loss"], distill["loss"])
    return (
        f"distilled       {distill['steps']} steps{warm}, loss {loss}, {distill['tokens']} tokens, "
        f"{distill['seconds']:.1f} s: "
        f"{scores}"
        f"{distill['shipped']} shipped ({distill['reason']})"
    )


def _quality_lines(report: PruneReport) -> list[str]:
    """What a quality target chose (``selection.quality_target``), when the job had one."""
    quality = report.selection.quality_target if report.selection is not None else None
    if quality is None:
        return []
    n = report.num_layers_removed
    if "max_kl" in quality:
        after = _fmt(quality["next_kl"], ".4f")
        return [
            f"quality target  {n} blocks within {quality['max_kl']} nats validation mean KL from dense "
            f"(KL {quality['kl']:.4f}; one block more: {after})"
        ]
    after = _fmt(quality["next_ratio"], ".3f")
    return [
        f"quality target  {n} blocks within {quality['max_perplexity_ratio']}x dense "
        f"validation perplexity (ratio {quality['ratio']:.3f}; one block more: {after})"
    ]


def _candidate_lines(report: PruneReport) -> list[str]:
    """The candidates measured in full, best first by the job's selection metric: validation perplexity
    and, where measured, the mean KL from the dense model."""
    scored = {name: p for name, p in report.plans.items() if p.validation_perplexity is not None}
    if not scored:
        return []
    by_kl = report.request.get("options", {}).get("selection_metric") == "kl"
    with_kl = any(p.validation_kl is not None for p in scored.values())
    healed = " healed," if report.heal.method != "none" else ""
    columns = "validation perplexity, mean KL from dense" if with_kl else "validation perplexity"
    ranked = ", ranked by KL" if by_kl else ""
    lines = [f"candidates      ({columns},{healed} lower is better{ranked})"]
    for name, plan in sorted(
        scored.items(), key=lambda kv: (kv[1].validation_kl if by_kl else kv[1].validation_perplexity) or 0.0
    ):
        kl = f" {_fmt(plan.validation_kl, '.4f'):>10}" if with_kl else ""
        lines.append(f"  {name:<12} {plan.validation_perplexity:>10.2f}{kl}  {plan.pruned_layers}")
    return lines


def _curve_lines(report: PruneReport) -> list[str]:
    """The budget curve as a table: a row per method, a column per budget."""
    curve = report.budget_curve
    if curve is None or not curve.points:
        return []
    budgets = sorted({p.budget for p in curve.points})
    scores = {(p.method, p.budget): p.validation_perplexity for p in curve.points}
    healed = " healed," if curve.healed else ""
    lines = [
        f"budget curve    (validation perplexity,{healed} dense {curve.dense_validation_perplexity:.2f})",
        "  blocks removed " + "".join(f"{n:>10}" for n in budgets),
    ]
    for method in dict.fromkeys(p.method for p in curve.points):
        lines.append(f"  {method:<14} " + "".join(f"{_fmt(scores.get((method, n))):>10}" for n in budgets))
    distilled = {p.budget: p.distilled_perplexity for p in curve.points if p.distilled_perplexity is not None}
    if distilled:  # the best plan at each budget, distilled (--curve-distill)
        lines.append(f"  {'distilled':<14} " + "".join(f"{_fmt(distilled.get(n)):>10}" for n in budgets))
    return lines


def _cmd_analyze(args: argparse.Namespace) -> int:
    from lorp.pipeline import run_analysis
    from lorp.report import save_analysis

    bars = _Bars()
    try:
        stats, provenance = run_analysis(_model_spec(args), _calibration_spec(args), progress=bars)
    finally:
        bars.close()
    out = save_analysis(args.out, stats.S, stats.D, provenance=json.dumps(provenance))
    print(f"wrote {out}: S and D over {stats.num_blocks + 1} states from {stats.num_tokens} tokens")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from lorp.report import load_analysis
    from lorp.selection import SelectionOptions, select

    S, D = load_analysis(args.similarity)
    options = SelectionOptions(
        num_clusters=args.num_clusters, protected_layers=args.protect, cluster_seed=args.cluster_seed
    )
    result = select(args.method, S, D, args.num_layers, options)
    payload = {
        "method": result.method,
        "rls": result.structure.rls,
        "k": result.structure.k,
        "clusters": result.structure.clusters,
        "pruned_layers": result.pruned_layers,
    }
    if args.json:
        print(json.dumps(payload))
    else:
        for key, value in payload.items():
            print(f"{key:<14}{value}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    rows = [method_row(info) for info in REGISTRY.values()]
    if args.json:
        print(json.dumps(rows))
        return 0
    for row in rows:
        uses = [word for word, on in (("model", row["needs_model"]), ("auto", row["auto_candidate"])) if on]
        uses += ["curve"] if row["on_curve"] else []
        print(f"{row['name']:<12}{','.join(uses):<18}{row['label']}")
    return 0


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None, *, extend: Extension | None = None) -> int:
    """Run one command; input errors print ``lorp: error [field]: ...`` and return 2."""
    parser, handlers = build_parser(extend)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return handlers[args.command](args)
    except ValidationError as exc:
        print(f"lorp: error: {_describe_validation(exc)}", file=sys.stderr)
        return 2
    except EngineError as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"lorp: error{where}: {exc.message}", file=sys.stderr)
        return 2
