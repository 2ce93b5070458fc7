"""The ``lorp`` command line: a few lines around the engine's entry points.

lorp prune   --model M --num-layers n|--ratio r [--method auto] [--calibration SPEC] --out DIR
lorp analyze --model M [--calibration SPEC] --out FILE.npz
lorp select  --similarity FILE --num-layers n --method NAME [--num-clusters K] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from worker.engine.errors import EngineError, InvalidRequestError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorp", description="Depth pruning of causal LMs with LoRP.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine details")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="analyse, select, remove blocks, verify, evaluate, save")
    _add_model_args(prune)
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--num-layers", type=int, help="blocks to remove")
    target.add_argument("--ratio", type=float, help="fraction of blocks to remove (rounded down)")
    prune.add_argument("--method", default="auto", help="auto (default), lorp, shortgpt, streamline, angular, reverse")
    _add_calibration_args(prune)
    _add_selection_args(prune)
    prune.add_argument("--eval", dest="eval_source", help="held-out text (default: built-in evaluation split)")
    prune.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (default 32)")
    prune.add_argument("--no-perplexity", action="store_true", help="skip held-out perplexity")
    prune.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    prune.add_argument("--out", required=True, help="output directory (missing or empty)")
    prune.add_argument("--json", action="store_true", help="print the report as JSON")

    analyze = sub.add_parser("analyze", help="capture S and D only")
    _add_model_args(analyze)
    _add_calibration_args(analyze)
    analyze.add_argument("--out", required=True, help="output .npz (S, D)")

    sel = sub.add_parser("select", help="pure selection from a saved analysis (.npz with S and D, or .npy S)")
    sel.add_argument("--similarity", required=True, help=".npz with S and D, or .npy with S")
    sel.add_argument("--num-layers", type=int, required=True, help="blocks to remove")
    sel.add_argument("--method", default="lorp", help="lorp (default), shortgpt, streamline, angular, reverse")
    _add_selection_args(sel)
    sel.add_argument("--json", action="store_true", help="print one JSON object")

    serve = sub.add_parser("serve", help="run the API and a worker together (embedded mode by default)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (API keys are required off loopback)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")

    worker = sub.add_parser("worker", help="run a Celery worker on the job queue")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once (one per GPU)")
    worker.add_argument("--loglevel", default="info")

    recon = sub.add_parser("reconciler", help="periodically re-enqueue lost jobs and retry or fail dead ones")
    recon.add_argument("--once", action="store_true", help="one pass, then exit")

    sub.add_parser("migrate", help="create or upgrade the database schema (alembic upgrade head)")

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="the key sees every job and dataset")
    keys_sub.add_parser("list", help="list keys (never their secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    return parser


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
    from worker.engine.spec import ModelSpec

    return ModelSpec(
        source=args.model,
        revision=args.revision,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )


def _calibration_spec(args: argparse.Namespace) -> Any:
    from worker.engine.spec import CalibrationSpec

    return CalibrationSpec(
        source=args.calibration,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        batch_size=args.batch_size,
        chat_template=args.chat_template,
    )


def _cmd_prune(args: argparse.Namespace) -> int:
    from worker.engine.pipeline import run_prune
    from worker.engine.spec import EvaluationSpec, PruneSpec, SelectionOptionsSpec, TargetSpec

    spec = PruneSpec(
        model=_model_spec(args),
        method=args.method,
        target=TargetSpec(num_layers=args.num_layers, ratio=args.ratio),
        calibration=_calibration_spec(args),
        options=SelectionOptionsSpec(
            num_clusters=args.num_clusters, protected_layers=args.protect, cluster_seed=args.cluster_seed
        ),
        evaluation=EvaluationSpec(
            source=args.eval_source,
            max_windows=args.eval_windows,
            perplexity=not args.no_perplexity,
            speed=not args.no_speed,
        ),
    )
    bars = _Bars()
    try:
        result = run_prune(spec, args.out, progress=bars)
    finally:
        bars.close()
    report = result.report
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(_summary(report, str(result.out_dir)))
    return 0


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _summary(report: dict[str, Any], out_dir: str) -> str:
    analysis, metrics = report["analysis"], report["metrics"]
    dense, pruned = metrics["dense"], metrics["pruned"]
    lines = [
        f"model           {report['request']['model']['source']} ({analysis['num_blocks']} blocks)",
        f"RLS / K         {_fmt(analysis['rls'], '.3f')} / {analysis['k']}",
        f"method          {report['method']} -> {report['chosen']['candidate']}",
        f"removed blocks  {report['chosen']['pruned_layers']}",
    ]
    scored = {k: v for k, v in report["plans"].items() if v["validation_perplexity"] is not None}
    if scored:
        lines.append("candidates      (validation perplexity, lower is better)")
        for name, plan in sorted(scored.items(), key=lambda kv: kv[1]["validation_perplexity"]):
            lines.append(f"  {name:<12} {plan['validation_perplexity']:>10.2f}  {plan['pruned_layers']}")
    if "perplexity" in dense:
        lines.append(f"perplexity      dense {_fmt(dense['perplexity'])} -> pruned {_fmt(pruned['perplexity'])}")
    if "decode_speedup" in metrics:
        lines.append(
            f"decode speed    x{metrics['decode_speedup']:.2f} (bound N/(N-n) = {metrics['speedup_bound']:.2f})"
        )
    lines.append(f"pruned model    {out_dir}/model")
    lines.append(f"report          {out_dir}/report.json, heatmap {out_dir}/heatmap.png")
    return "\n".join(lines)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from worker.engine.pipeline import run_analysis
    from worker.engine.report import save_analysis

    bars = _Bars()
    try:
        stats, provenance = run_analysis(_model_spec(args), _calibration_spec(args), progress=bars)
    finally:
        bars.close()
    out = save_analysis(args.out, stats.S, stats.D, provenance=json.dumps(provenance))
    print(f"wrote {out}: S and D over {stats.num_blocks + 1} states from {stats.num_tokens} tokens")
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from worker.engine.report import load_analysis
    from worker.engine.selection import SelectionOptions, select

    S, D = load_analysis(args.similarity)
    options = SelectionOptions(num_clusters=args.num_clusters, protected=args.protect, seed=args.cluster_seed)
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


def _service_settings(**overrides: Any) -> Any:
    from app.core.config import Settings

    return Settings(**overrides)


def _announce(server: Any, host: str, port: int) -> None:
    """Print the address once uvicorn has bound it (its own start-up lines are below the log level)."""
    import time

    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        shown = f"[{host}]" if ":" in host else host
        print(f"lorp serve: listening on http://{shown}:{port} (API docs at /docs)", flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import uvicorn

    from app.db.migrate import upgrade_head
    from app.main import create_app
    from worker.service_cli import run_reconciler, start_worker

    settings = _service_settings(host=args.host, port=args.port)
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.sqlalchemy_url)
    mode = "embedded" if settings.embedded else "full stack"
    auth = "API keys required" if settings.auth_enabled() else "open on loopback, no keys"
    print(
        f"lorp serve: {mode}, database {settings.sqlalchemy_url}, artifacts {settings.artifact_storage_url}, {auth}",
        flush=True,
    )
    worker = None if args.no_worker else start_worker(settings, loglevel="warning", banner=False)
    stop = threading.Event()
    reconciler = threading.Thread(target=run_reconciler, args=(settings,), kwargs={"stop": stop}, daemon=True)
    reconciler.start()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="warning"))
    threading.Thread(target=_announce, args=(server, args.host, args.port), daemon=True).start()
    try:
        server.run()
    finally:
        stop.set()
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except Exception:
                worker.kill()
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.service_cli import run_worker

    run_worker(_service_settings(), concurrency=args.concurrency, loglevel=args.loglevel)


def _cmd_reconciler(args: argparse.Namespace) -> int:
    from worker.service_cli import run_reconciler

    logging.getLogger("worker").setLevel(logging.INFO)
    run_reconciler(_service_settings(), once=args.once)
    return 0


def _cmd_migrate(_args: argparse.Namespace) -> int:
    from app.db.migrate import upgrade_head

    settings = _service_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_head(settings.sqlalchemy_url)
    print(f"database at head: {settings.sqlalchemy_url}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    import uuid

    from app.core.security import create_api_key, revoke_api_key
    from app.db.session import session_factory, session_scope
    from app.repositories.keys import list_keys

    settings = _service_settings()
    factory = session_factory(settings.sqlalchemy_url)
    with session_scope(factory) as session:
        if args.keys_command == "create":
            plaintext, key = create_api_key(session, args.name, admin=args.admin)
            session.flush()
            print(f"id     {key.id}\nname   {key.name}\nadmin  {key.is_admin}")
            print(f"key    {plaintext}\n(shown once: store it now)")
        elif args.keys_command == "list":
            for key in list_keys(session):
                state = "revoked" if key.revoked_at else "active"
                print(f"{key.id}  {key.prefix}...  {key.name:<24} admin={key.is_admin!s:<5} {state}")
        else:
            try:
                key_id = uuid.UUID(args.key_id)
            except ValueError:
                raise InvalidRequestError(f"not a key id: {args.key_id!r}", field="key_id") from None
            if not revoke_api_key(session, key_id):
                raise InvalidRequestError(f"no active key with id {key_id}", field="key_id")
            print(f"revoked {key_id}")
    return 0


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    commands = {
        "prune": _cmd_prune,
        "analyze": _cmd_analyze,
        "select": _cmd_select,
        "serve": _cmd_serve,
        "worker": _cmd_worker,
        "reconciler": _cmd_reconciler,
        "migrate": _cmd_migrate,
        "keys": _cmd_keys,
    }
    try:
        return commands[args.command](args)
    except ValidationError as exc:
        print(f"lorp: error: {_describe_validation(exc)}", file=sys.stderr)
        return 2
    except EngineError as exc:
        where = f" [{exc.field}]" if exc.field else ""
        print(f"lorp: error{where}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
