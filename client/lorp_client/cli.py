"""``lorp jobs``: the service from the command line, on top of :class:`lorp_client.Client`.

    lorp jobs submit --model M --num-layers n [--method auto] [--dataset builtin | --dataset-file F]
                     [--body request.json] [--wait] [--download DIR] [--json]
    lorp jobs list [--status S] [--model M] [--limit N] [--json]
    lorp jobs status ID [--json]
    lorp jobs wait ID [--timeout S] [--json]
    lorp jobs cancel ID [--json]
    lorp jobs download ID DIR
    lorp jobs delete ID [--json]
    lorp jobs methods [--json]

The server and key come from ``--url`` / ``--api-key`` or ``LORP_URL`` / ``LORP_API_KEY``. ``wait`` and
``download`` draw a progress bar on stderr (stage and percent, bytes per file); ``--json`` prints the
job (or list) as JSON on stdout, for scripts. Exit status: 0 done, 1 the job failed or was
cancelled, 2 the service refused the request (its problem's code, field and detail on stderr).
Installed with the service as ``lorp jobs``; a client-only install has it as ``lorp-jobs``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from lorp_client._core import DEFAULT_URL
from lorp_client.client import Client
from lorp_client.errors import ApiError, LorpError
from lorp_client.models import JobListItem, JobOut, JobStatus

Handler = Callable[[argparse.Namespace], int]


def add_jobs_command(sub: Any, *, prog: str | None = None) -> dict[str, Handler]:
    """``jobs`` and its subcommands on ``sub`` (an argparse subparsers object); returns its handler.
    ``prog`` names the command in its help (default: the parent's name and ``jobs``)."""
    extra = {"prog": prog} if prog else {}
    jobs = sub.add_parser("jobs", help="submit, watch, cancel and download jobs of a running service", **extra)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"the service (default: $LORP_URL or {DEFAULT_URL})")
    common.add_argument("--api-key", default=None, help="an API key (default: $LORP_API_KEY)")
    cmds = jobs.add_subparsers(dest="jobs_command", required=True)

    submit = cmds.add_parser("submit", help="submit a job", parents=[common])
    submit.add_argument("--body", type=Path, help="a JSON file with the request of POST /v1/jobs")
    submit.add_argument("--model", help="model id: a hub id, a local path under LORP_MODEL_ROOTS, or demo")
    target = submit.add_mutually_exclusive_group()
    target.add_argument("--num-layers", type=int, help="blocks to remove")
    target.add_argument("--ratio", type=float, help="fraction of the blocks to remove")
    target.add_argument("--max-perplexity-ratio", type=float, help="remove as many as keep perplexity within this")
    target.add_argument(
        "--max-kl", type=float, help="remove as many as keep the mean KL from the dense model within this (nats)"
    )
    submit.add_argument(
        "--selection-metric", choices=["perplexity", "kl"], help="what ranks validated plans (default perplexity)"
    )
    submit.add_argument(
        "--heal",
        choices=["linear", "distill", "none"],
        help="how the cuts are healed: linear maps (default where the model allows), then a short distillation "
        "toward the dense model (distill), or not at all",
    )
    submit.add_argument("--heal-steps", type=int, help="distillation steps with --heal distill")
    submit.add_argument("--method", help="a pruning method (default auto); `methods` lists the service's")
    data = submit.add_mutually_exclusive_group()
    data.add_argument("--dataset", help="calibration: builtin, an uploaded dataset's reference, or a source")
    data.add_argument("--dataset-file", type=Path, help="upload this .txt or .jsonl and calibrate on it")
    submit.add_argument("--idempotency-key", help="default: generated")
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    submit.add_argument("--download", type=Path, metavar="DIR", help="then download its files (implies --wait)")
    submit.add_argument("--timeout", type=float, help="seconds to wait at most")
    submit.add_argument("--json", action="store_true", help="print the job as JSON")

    listing = cmds.add_parser("list", help="list jobs, newest first", parents=[common])
    listing.add_argument("--status", choices=[s.value for s in JobStatus])
    listing.add_argument("--model")
    listing.add_argument("--limit", type=int, default=20, help="at most this many (0: all)")
    listing.add_argument("--json", action="store_true")

    for name, what in (
        ("status", "show a job"),
        ("wait", "wait for a job to finish"),
        ("cancel", "cancel a job"),
        ("delete", "delete a job: cancel it if it runs, remove its files and results"),
    ):
        one = cmds.add_parser(name, help=what, parents=[common])
        one.add_argument("job_id")
        one.add_argument("--json", action="store_true")
        if name == "wait":
            one.add_argument("--timeout", type=float)

    methods = cmds.add_parser("methods", help="the pruning methods the service runs", parents=[common])
    methods.add_argument("--json", action="store_true")

    download = cmds.add_parser("download", help="download a succeeded job's files (sha256-checked)", parents=[common])
    download.add_argument("job_id")
    download.add_argument("dest", type=Path)
    return {"jobs": run}


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key)  # each else $LORP_URL, $LORP_API_KEY (lorp_client._core.connection)


class Bar:
    """A one-line progress bar on a terminal; plain lines (one per change of stage) elsewhere."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self._last: str | None = None

    def job(self, job: JobOut) -> None:
        if self.tty:
            filled = round(self.width * job.progress)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{job.status:<10} {job.stage or '':<18} [{bar}] {job.progress:6.1%}")
            self.stream.flush()
        elif (key := f"{job.status} {job.stage or ''}") != self._last:
            self._last = key
            print(f"{job.status:<10} {job.stage or '':<18} {job.progress:6.1%}", file=self.stream, flush=True)

    def file(self, name: str, done: int, total: int) -> None:
        if self.tty:
            share = done / total if total else 1.0
            self.stream.write(f"\r{name[-40:]:<40} {share:6.1%} of {total / 1e6:.1f} MB")
            self.stream.flush()
        elif done >= total:
            print(f"downloaded {name} ({total} bytes, sha256 checked)", file=self.stream, flush=True)

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _show_job(job: JobOut | JobListItem, as_json: bool) -> None:
    if as_json:
        print(job.model_dump_json())
        return
    line = f"{job.id}  {job.status:<9} {job.stage or '-':<16} {job.progress:6.1%}  {job.method:<10} {job.model}"
    print(line)
    if job.waiting_for:
        unseen = "never seen" if job.worker_unseen_s is None else f"last seen {job.worker_unseen_s:.0f} s ago"
        print(f"  waiting for a worker ({unseen})")
    if job.error is not None:
        print(f"  error {job.error.code}: {job.error.message}")
        if job.error.retryable:
            print("  (the service's condition, not the request: submitting it again may succeed)")
    summary = getattr(job, "summary", None)
    if summary is not None and summary.pruned_layers is not None:
        print(f"  removed {summary.pruned_layers} ({summary.chosen_method})")


# A failed job whose error is retryable (the service's condition, not the request): EX_TEMPFAIL, so a
# script may submit it again on this status alone.
RETRYABLE_EXIT = 75


def _outcome(job: JobListItem) -> int:
    if job.status == JobStatus.succeeded:
        return 0
    return RETRYABLE_EXIT if job.error is not None and job.error.retryable else 1


def _wait(client: Client, job_id: Any, timeout: float | None) -> JobOut:
    bar = Bar()
    try:
        return client.wait(job_id, timeout=timeout, on_progress=bar.job, poll_interval=0.5, max_interval=5.0)
    finally:
        bar.end()


def _download(client: Client, job_id: Any, dest: Path) -> None:
    bar = Bar()
    try:
        paths = client.download(job_id, dest, on_progress=bar.file)
    finally:
        bar.end()
    print(f"{len(paths)} files in {dest}/ (the model in {dest / 'model'})", file=sys.stderr)


def _submit(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = json.loads(args.body.read_text()) if args.body else {}
    dataset = args.dataset
    if args.dataset_file is not None:
        dataset = client.upload_dataset(args.dataset_file).reference
    job = client.submit(
        body,
        idempotency_key=args.idempotency_key,
        model=args.model,
        num_layers=args.num_layers,
        ratio=args.ratio,
        max_perplexity_ratio=args.max_perplexity_ratio,
        max_kl=args.max_kl,
        selection_metric=args.selection_metric,
        heal=args.heal,
        heal_steps=args.heal_steps,
        method=args.method,
        dataset=dataset,
    )
    if not (args.wait or args.download):
        _show_job(job, args.json)
        return 0
    print(f"submitted {job.id}", file=sys.stderr)
    job = _wait(client, job.id, args.timeout)
    if args.download and job.status == JobStatus.succeeded:
        _download(client, job.id, args.download)
    _show_job(job, args.json)
    return _outcome(job)


def _show_methods(client: Client, as_json: bool) -> None:
    listed = client.methods()
    if as_json:
        print(listed.model_dump_json())
        return
    for method in listed.methods:
        uses = [w for w, on in (("model", method.needs_model), ("auto", method.auto_candidate)) if on]
        uses += ["curve"] if method.on_curve else []
        default = " (default)" if method.name == listed.default else ""
        print(f"{method.name:<12}{','.join(uses):<18}{method.label}{default}")


def run(args: argparse.Namespace) -> int:
    """Run one ``jobs`` subcommand; the service's refusals print as ``lorp jobs: <status> <code> ...``."""
    try:
        with _client(args) as client:
            command = args.jobs_command
            if command == "submit":
                return _submit(client, args)
            if command == "list":
                items = client.list(status=args.status, model=args.model, page_size=min(args.limit or 100, 100))
                for shown, item in enumerate(items, start=1):
                    _show_job(item, args.json)
                    if args.limit and shown >= args.limit:
                        break
                return 0
            if command == "methods":
                _show_methods(client, args.json)
                return 0
            if command == "status":
                _show_job(client.get(args.job_id), args.json)
                return 0
            if command == "wait":
                job = _wait(client, args.job_id, args.timeout)
                _show_job(job, args.json)
                return _outcome(job)
            if command == "cancel":
                _show_job(client.cancel(args.job_id), args.json)
                return 0
            if command == "delete":
                gone = client.delete(args.job_id)
                when = "files and results removed" if gone.purged else "files removed once its worker stops it"
                print(gone.model_dump_json() if args.json else f"{gone.id}  deleted ({gone.status}; {when})")
                return 0
            _download(client, args.job_id, args.dest)
            return 0
    except ApiError as exc:
        print(f"lorp jobs: {exc}", file=sys.stderr)
        return 2
    except LorpError as exc:
        print(f"lorp jobs: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """``lorp-jobs ...``: the same commands for an install of the client alone."""
    parser = argparse.ArgumentParser(prog="lorp-jobs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_jobs_command(sub, prog="lorp-jobs")
    # ``lorp-jobs submit ...`` reads as ``lorp jobs submit ...``.
    args = parser.parse_args(["jobs", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
