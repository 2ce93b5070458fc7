"""Where calibration and evaluation text comes from: the built-in corpus, a text file, a JSONL file
(one document per line) or a hub dataset, parsed from one source string and loaded as documents.

A hub dataset is fetched through the hub into an explicit cache folder (``huggingface_hub``'s
``snapshot_download``: the card first, then the files of the configuration asked for) and read from that
absolute snapshot folder; its id is never handed to ``datasets.load_dataset``, which would take a
folder or file of that name relative to the working directory first.
"""

from __future__ import annotations

import errno
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lorp.assets import builtin_corpus, cache_dir
from lorp.errors import CalibrationError

SourceKind = Literal["builtin", "text", "jsonl", "hub"]
Role = Literal["calibration", "evaluation"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_BUILTIN_SPECS = ("builtin", "builtin:enwiki-sample")
# A hub dataset id: "name" or "owner/name" (what the hub itself accepts, and never a path).
_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


@dataclass(frozen=True)
class TextSource:
    """Where calibration or evaluation text comes from.

    Attributes:
        kind: ``"builtin"`` (the built-in Wikipedia sample), ``"text"`` (one UTF-8 file, one
            document), ``"jsonl"`` (one JSON object per line) or ``"hub"`` (a Hugging Face dataset).
        path: the file, for ``text`` and ``jsonl``.
        text_field: the JSONL field or the hub dataset column holding the text.
        dataset: the hub dataset id, for ``hub``.
        config: the hub dataset's configuration, if any.
        split: the hub dataset's split (slicing syntax such as ``train[:1000]`` allowed).
        revision: the hub dataset's revision, if pinned.
    """

    kind: SourceKind
    path: str | None = None
    text_field: str = "text"
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None


def _bad_spec(spec: str, why: str) -> CalibrationError:
    return CalibrationError(f"invalid calibration source {spec!r}: {why}", field="calibration.dataset")


def _parse_hub(spec: str) -> TextSource:
    rest = spec[len("hf:") :]
    rest, hash_sign, text_field = rest.partition("#")
    if hash_sign and not text_field.strip():
        raise _bad_spec(spec, "empty text field after '#'")
    # Dataset ids, revisions and configs never hold ':', so the first one starts the split, which
    # may itself hold ':' in slicing syntax (train[:1000]).
    ref, colon, split = rest.partition(":")
    if colon and not split.strip():
        raise _bad_spec(spec, "empty split after ':'")
    revision: str | None = None
    config: str | None = None
    if "@" in ref:
        dataset, _, after = ref.partition("@")
        revision, slash, config_part = after.partition("/")
        if not revision or (slash and not config_part):
            raise _bad_spec(spec, "expected 'dataset@revision' or 'dataset@revision/config'")
        config = config_part or None
    else:
        parts = ref.split("/")
        if len(parts) > 3:
            raise _bad_spec(spec, "too many '/' (expected 'name', 'owner/name' or 'owner/name/config')")
        if len(parts) == 3:
            dataset, config = f"{parts[0]}/{parts[1]}", parts[2]
        else:
            dataset = ref
    if not dataset or any(not piece for piece in dataset.split("/")) or dataset.count("/") > 1:
        raise _bad_spec(spec, "missing or malformed dataset id")
    if config is not None and not config:
        raise _bad_spec(spec, "empty config")
    return TextSource(
        kind="hub",
        dataset=dataset,
        config=config,
        split=split.strip() or "train",
        revision=revision,
        text_field=text_field.strip() or "text",
    )


def parse_source(spec: str | None) -> TextSource:
    """Parse a calibration-source string as the CLI and the API take it.

    Grammar::

        None | "builtin" | "builtin:enwiki-sample"   the built-in corpus
        PATH.jsonl | PATH.ndjson                      JSONL, text in the field "text"
        PATH.jsonl#FIELD                              JSONL, text in FIELD
        PATH                                          any other existing file: one UTF-8 text document
        hf:DATASET[@REVISION][/CONFIG][:SPLIT][#FIELD]
                                                      a Hugging Face dataset (needs `datasets` and
                                                      the hub); SPLIT defaults to "train", FIELD to
                                                      "text"

    ``DATASET`` is ``name`` or ``owner/name``. Without ``@REVISION``, a config follows a
    namespaced id as a third part (``hf:Salesforce/wikitext/wikitext-2-raw-v1:test``); a
    non-namespaced id takes its config after a revision (``hf:wikitext@main/wikitext-2-raw-v1:test``),
    since ``hf:name/x`` means the dataset ``name/x``. ``~`` in paths is expanded.

    Args:
        spec: the source string, or ``None`` for the built-in corpus.

    Returns:
        The parsed :class:`TextSource`.

    Raises:
        CalibrationError: (field ``calibration.dataset``) on a malformed string or a file that does not
            exist.
    """
    if spec is None:
        return TextSource(kind="builtin")
    spec = spec.strip()
    if not spec:
        raise _bad_spec(spec, "empty")
    if spec in _BUILTIN_SPECS:
        return TextSource(kind="builtin")
    if spec.startswith("hf:"):
        return _parse_hub(spec)

    path_str, text_field = spec, "text"
    base, hash_sign, after = spec.rpartition("#")
    if hash_sign and base.lower().endswith(_JSONL_SUFFIXES):
        if not after.strip():
            raise _bad_spec(spec, "empty JSONL field after '#'")
        path_str, text_field = base, after.strip()
    path = Path(path_str).expanduser()
    if not path.is_file():
        why = "is a directory, not a file" if path.is_dir() else "no such file"
        raise CalibrationError(f"calibration source {path_str!r}: {why}", field="calibration.dataset")
    if path.suffix.lower() in _JSONL_SUFFIXES:
        return TextSource(kind="jsonl", path=str(path), text_field=text_field)
    return TextSource(kind="text", path=str(path))


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror}", field="calibration.dataset") from exc
    # Text never holds NUL bytes; many binary formats happen to decode as UTF-8 in places.
    if b"\x00" in data:
        raise CalibrationError(f"{path} looks like a binary file, not UTF-8 text", field="calibration.dataset")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"{path} is not valid UTF-8 text (byte offset {exc.start})", field="calibration.dataset"
        ) from exc


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    texts: list[str] = []
    for number, line in enumerate(_read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(
                f"{path} line {number}: invalid JSON ({exc.msg})", field="calibration.dataset"
            ) from exc
        except RecursionError:
            # Python's parser recurses once per level: a line of 100,000 "[" ends here, not in a crash.
            raise CalibrationError(
                f"{path} line {number}: the JSON nests too deeply", field="calibration.dataset"
            ) from None
        if not isinstance(record, dict):
            raise CalibrationError(f"{path} line {number}: expected a JSON object", field="calibration.dataset")
        if text_field not in record:
            raise CalibrationError(
                f"{path} line {number}: no field {text_field!r} (fields: {', '.join(map(str, record))})",
                field="calibration.dataset",
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise CalibrationError(
                f"{path} line {number}: field {text_field!r} is {type(value).__name__}, not a string",
                field="calibration.dataset",
            )
        texts.append(value)
    return texts


def hub_cache_dir(cache: Path | None = None) -> Path:
    """Where hub datasets are cached: ``cache`` when the caller names one (the service: under its data
    folder), else ``hub/`` in the engine's cache (``$LORP_CACHE_DIR``)."""
    return cache if cache is not None else cache_dir() / "hub"


def _hub_failure(source: TextSource, why: str) -> CalibrationError:
    return CalibrationError(f"hub dataset {source.dataset!r}: {why}", field="calibration.dataset")


def _hub_fetch(source: TextSource, cache: Path, patterns: list[str] | None) -> Path:
    """The absolute snapshot folder of the dataset in ``cache``, holding the files ``patterns`` match
    (all of them for None) and never code; from the hub, or the cache when offline or unreachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert source.dataset is not None
    try:
        folder = snapshot_download(
            source.dataset,
            repo_type="dataset",
            revision=source.revision,
            cache_dir=cache / "hub",
            allow_patterns=patterns,
            ignore_patterns=["*.py", "*.pyc"],
        )
    except HFValidationError:
        raise _hub_failure(source, "not a valid hub dataset id") from None
    except GatedRepoError:
        raise _hub_failure(source, "gated on the hub; this machine has no access to it") from None
    except RevisionNotFoundError:
        raise _hub_failure(source, f"no revision {source.revision!r} on the hub") from None
    except RepositoryNotFoundError:
        raise _hub_failure(source, "no such dataset on the hub (or it is private)") from None
    except LocalEntryNotFoundError:
        raise _hub_failure(
            source, "the Hugging Face hub is unreachable from here (or offline mode is on) and it is not in the cache"
        ) from None
    except Exception as exc:  # a hub error page, an unwritable cache: named, without local paths
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise  # a full disk is the machine's condition, not the dataset's fault
        raise _hub_failure(
            source, f"could not fetch it: {getattr(exc, 'strerror', None) or type(exc).__name__}"
        ) from None
    return Path(folder).resolve()


def _files_of(entry: Any) -> list[str]:
    """The path patterns of a card's ``data_files`` (a pattern, a list of them, or per-split entries)."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, dict):
        return _files_of(entry.get("path"))
    if isinstance(entry, list):
        return [pattern for item in entry for pattern in _files_of(item)]
    return []


def _config_patterns(card: Path, source: TextSource) -> list[str] | None:
    """The files the card says make up the configuration asked for (its default one when none is);
    None when the card lists no configurations (then every data file is the default one)."""
    from huggingface_hub import DatasetCard

    try:
        data = DatasetCard.load(card).data.to_dict() if card.is_file() else {}
    except Exception:  # an unreadable card: datasets reads the files as they are laid out
        data = {}
    configs = [c for c in data.get("configs") or [] if isinstance(c, dict)]
    if not configs:
        return None
    by_name = {str(c.get("config_name", "default")): c for c in configs}
    names = ", ".join(sorted(by_name))
    if source.config is not None:
        chosen = by_name.get(source.config)
        if chosen is None:
            raise _hub_failure(source, f"no configuration {source.config!r} (it has: {names})")
    else:
        chosen = next((c for c in configs if c.get("default")), None) or by_name.get("default")
        if chosen is None and len(configs) == 1:
            chosen = configs[0]
        if chosen is None:
            raise _hub_failure(source, f"it has several configurations ({names}); name one in calibration.dataset")
    data_dir = str(chosen.get("data_dir") or "").strip("/")
    patterns = _files_of(chosen.get("data_files"))
    if data_dir:
        patterns = [f"{data_dir}/{p.lstrip('/')}" for p in patterns] or [f"{data_dir}/*"]
    return patterns or None


def _load_hub(source: TextSource, cache: Path | None = None) -> list[str]:
    if source.dataset is None or not _HUB_DATASET_ID.match(source.dataset):
        raise CalibrationError(
            f"not a hub dataset id: {source.dataset!r} (expected 'name' or 'owner/name')", field="calibration.dataset"
        )
    try:
        import datasets  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CalibrationError(
            "hub datasets need the `datasets` package: `pip install datasets` (or the `hub` extra), "
            "and a machine that reaches the Hugging Face hub",
            field="calibration.dataset",
        ) from None
    cache = hub_cache_dir(cache)
    card = _hub_fetch(source, cache, ["README.md"]) / "README.md"
    patterns = _config_patterns(card, source)
    folder = _hub_fetch(source, cache, None if patterns is None else [*patterns, "README.md"])
    try:
        data = datasets.load_dataset(str(folder), source.config, split=source.split, cache_dir=str(cache / "datasets"))
    except Exception as exc:  # an unknown split, no data files: the caller needs one error
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        for local, public in ((str(folder), source.dataset), (str(cache), "<cache>")):
            first = first.replace(local, public)
        raise _hub_failure(
            source, f"could not read config {source.config!r}, split {source.split!r}: {type(exc).__name__}: {first}"
        ) from exc
    columns = list(getattr(data, "column_names", None) or [])
    if source.text_field not in columns:
        raise CalibrationError(
            f"hub dataset {source.dataset!r} has no column {source.text_field!r} (columns: {', '.join(columns)})",
            field="calibration.dataset",
        )
    return [str(text) for text in data[source.text_field] if text is not None]


def load_texts(source: TextSource, role: Role = "calibration", *, hub_cache: Path | None = None) -> list[str]:
    """Load the documents of a text source.

    Args:
        source: where the text comes from (see :func:`parse_source`).
        role: for the built-in corpus, which split: ``"calibration"`` or the held-out
            ``"evaluation"`` articles. Other sources return the same documents for both roles (the
            caller holds out part of them, e.g. :func:`build_calibration`'s validation slice).
        hub_cache: where a hub dataset is cached (default :func:`hub_cache_dir`).

    Returns:
        The non-empty documents, in source order: one per built-in article, the whole file for a
        text file, one per JSONL line, one per hub dataset row.

    Raises:
        CalibrationError: (field ``calibration.dataset``) on a missing or unreadable file, a binary or
            non-UTF-8 file, a JSONL line without the field, a hub failure, or no text at all.
    """
    if source.kind == "builtin":
        corpus = builtin_corpus()
        texts = corpus.evaluation if role == "evaluation" else corpus.calibration
        texts = list(texts)
    elif source.kind in ("text", "jsonl"):
        if not source.path:
            raise CalibrationError(f"a {source.kind} source needs a path", field="calibration.dataset")
        path = Path(source.path)
        if not path.is_file():
            raise CalibrationError(f"calibration source {source.path!r}: no such file", field="calibration.dataset")
        texts = [_read_text_file(path)] if source.kind == "text" else _read_jsonl(path, source.text_field)
    elif source.kind == "hub":
        if not source.dataset:
            raise CalibrationError("a hub source needs a dataset id", field="calibration.dataset")
        texts = _load_hub(source, hub_cache)
    else:
        raise CalibrationError(f"unknown calibration source kind {source.kind!r}", field="calibration.dataset")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise CalibrationError(f"the {source.kind} calibration source holds no text", field="calibration.dataset")
    return texts
