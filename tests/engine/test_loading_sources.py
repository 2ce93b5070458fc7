"""What a model or dataset reference may read: hub ids only through the hub's cache (never a folder of that
name in the working directory), local folders only where every file resolves inside the caller's roots,
hub datasets only from the hub into an explicit cache, never from the working directory or the home folder.

Real folders, links and a real Hugging Face cache layout (snapshots linking into blobs); the hub
itself is unreachable here, which is one of the cases.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from lorp.calibration.sources import TextSource, load_texts, parse_source
from lorp.confine import confinement_problem
from lorp.errors import CalibrationError, ModelLoadError
from lorp.loading import load_model, source_kind

REPO = Path(__file__).resolve().parents[2]
COMMIT = "c0ffee" * 6 + "abcd"
SECRET = "top secret line from outside the roots"


@pytest.fixture()
def model_root(tmp_path: Path, tiny_tokenizer: Any) -> Path:
    """A model root holding one tiny Llama with a chat template file (``chat_template.jinja``)."""
    root = tmp_path / "root"
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    LlamaForCausalLM(cfg).save_pretrained(root / "tiny")
    tiny_tokenizer.save_pretrained(root / "tiny")
    assert (root / "tiny" / "chat_template.jinja").is_file()
    return root


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.jinja").write_text(SECRET)
    return folder


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache of this test's own."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_repo(cache: Path, kind: str, repo_id: str, files: dict[str, bytes]) -> Path:
    """``repo_id`` laid out as huggingface_hub caches it: blobs, a snapshot of links to them, refs/main."""
    repo = cache / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- local folders confined to roots -------------------------------------------------------------------


def test_a_confined_local_folder_loads(model_root: Path) -> None:
    loaded = load_model(str(model_root / "tiny"), kind="local", roots=[model_root], name="my-model", device="cpu")
    assert loaded.provenance["source"] == "my-model" and loaded.provenance["kind"] == "local"


@pytest.mark.parametrize("where", ["chat_template.jinja", "extra/deeper/chat.jinja", "linked-folder"])
def test_a_link_leading_outside_the_roots_is_refused(where: str, model_root: Path, outside: Path) -> None:
    model = model_root / "tiny"
    if where == "chat_template.jinja":
        (model / where).unlink()
        (model / where).symlink_to(outside / "secret.jinja")
    elif where == "linked-folder":
        (model / where).symlink_to(outside, target_is_directory=True)
    else:
        (model / "extra" / "deeper").mkdir(parents=True)
        (model / where).symlink_to(outside / "secret.jinja")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(model), kind="local", roots=[model_root], name="my-model", device="cpu")
    assert err.value.field == "model.id"
    assert f"{where} is a link to a place outside the allowed roots" in err.value.message
    assert str(outside) not in err.value.message and str(model_root) not in err.value.message


def test_links_inside_the_roots_are_followed(model_root: Path) -> None:
    """A folder whose weights link to a sibling folder under the same root (shared blobs) loads."""
    shared = model_root / "shared"
    shutil.move(model_root / "tiny", shared)
    (model_root / "tiny").mkdir()
    for path in shared.iterdir():
        (model_root / "tiny" / path.name).symlink_to(path)
    loaded = load_model(str(model_root / "tiny"), kind="local", roots=[model_root], device="cpu")
    assert loaded.model.config.num_hidden_layers == 3


def test_a_fifo_and_a_link_loop_in_the_folder(model_root: Path) -> None:
    model = model_root / "tiny"
    (model / "loop").symlink_to(model, target_is_directory=True)
    assert confinement_problem(model, [model_root]) is None  # a loop inside the roots is walked once
    os.mkfifo(model / "pipe.json")
    assert confinement_problem(model, [model_root]) == "pipe.json is not a regular file or folder"


def test_the_cli_stays_unconfined(model_root: Path, outside: Path) -> None:
    """Without roots (the engine's CLI, a person's own files) a link to anywhere is theirs to follow."""
    (model_root / "tiny" / "chat_template.jinja").unlink()
    (model_root / "tiny" / "chat_template.jinja").symlink_to(outside / "secret.jinja")
    loaded = load_model(str(model_root / "tiny"), device="cpu")
    assert loaded.tokenizer.chat_template == SECRET


# -- hub ids: only ever through the hub's cache ---------------------------------------------------------


def test_a_hub_id_never_reads_a_folder_of_that_name_in_the_working_directory(
    model_root: Path, hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    shutil.copytree(model_root / "tiny", cwd / "acme" / "tiny-model")
    monkeypatch.chdir(cwd)
    assert Path("acme/tiny-model/config.json").is_file()
    with pytest.raises(ModelLoadError) as err:
        load_model("acme/tiny-model", kind="hub", device="cpu")
    assert "hub is unreachable" in err.value.message and "not in its cache" in err.value.message
    assert str(cwd) not in err.value.message
    # The CLI, asked to guess, still takes a folder it is pointed at.
    assert source_kind("acme/tiny-model") == "local" and source_kind("./acme/tiny-model") == "local"


def test_a_hub_model_loads_from_its_cache_snapshot(model_root: Path, hub_cache: Path) -> None:
    """Offline (the hub is unreachable here), a revision in the cache is used, read from the snapshot."""
    _cache_repo(hub_cache, "model", "acme/tiny-model", _folder_files(model_root / "tiny"))
    loaded = load_model("acme/tiny-model", kind="hub", device="cpu")
    assert loaded.provenance["kind"] == "hub" and loaded.provenance["commit"] == COMMIT
    assert loaded.provenance["source"] == "acme/tiny-model" and loaded.model.config.num_hidden_layers == 3


def test_a_hub_snapshot_linking_outside_its_repository_is_refused(
    model_root: Path, hub_cache: Path, outside: Path
) -> None:
    snapshot = _cache_repo(hub_cache, "model", "acme/tiny-model", _folder_files(model_root / "tiny"))
    (snapshot / "chat_template.jinja").unlink()
    (snapshot / "chat_template.jinja").symlink_to(outside / "secret.jinja")
    with pytest.raises(ModelLoadError, match=r"chat_template\.jinja is a link to a place outside"):
        load_model("acme/tiny-model", kind="hub", device="cpu")


# -- hub datasets: only from the hub, cached where the caller says -----------------------------------------


def test_a_hub_dataset_never_reads_the_working_directory_nor_writes_home(tmp_path: Path) -> None:
    """``datasets.load_dataset("acme/corpus")`` would read ./acme/corpus/*.csv; this must not, must not
    quote it, and must leave nothing under $HOME. A fresh interpreter with HOME set before anything is
    imported (the hub libraries read it once, at import)."""
    home, cwd, cache = tmp_path / "home", tmp_path / "cwd", tmp_path / "cache"
    home.mkdir()
    (cwd / "acme" / "corpus").mkdir(parents=True)
    (cwd / "acme" / "corpus" / "data.csv").write_text("secret_column,other\nsecret value,1\n")
    script = (
        "import sys, pathlib\n"
        "from lorp.calibration.sources import load_texts, parse_source\n"
        "from lorp.errors import CalibrationError\n"
        "source, cache = parse_source('hf:acme/corpus:train#secret_column'), pathlib.Path(sys.argv[1])\n"
        "try:\n"
        "    print('LOADED', load_texts(source, hub_cache=cache))\n"
        "except CalibrationError as exc:\n"
        "    print('REFUSED', exc.message)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", script, str(cache)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    output = done.stdout.strip()
    assert output.startswith("REFUSED"), done.stdout + done.stderr
    assert "hub is unreachable" in output and "not in the cache" in output
    assert "secret" not in output.replace("#secret_column", "") and str(cwd) not in output
    assert list(home.rglob("*")) == [], "nothing may be written under the home folder"


def test_a_hub_dataset_config_is_read_from_the_cache(tmp_path: Path) -> None:
    """The card's configurations pick the files; the texts come from the cached snapshot."""
    cache = tmp_path / "cache"
    card = (
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: small/train-*.jsonl\n"
        "- config_name: big\n  data_files: big/*.jsonl\n---\n# a card\n"
    )
    _cache_repo(
        cache / "hub",
        "dataset",
        "acme/corpus",
        {
            "README.md": card.encode(),
            "small/train-0.jsonl": b'{"text": "first document"}\n{"text": "second document"}\n',
            "big/all.jsonl": b'{"text": "big"}\n',
        },
    )
    assert load_texts(parse_source("hf:acme/corpus/small:train"), hub_cache=cache) == [
        "first document",
        "second document",
    ]
    with pytest.raises(CalibrationError, match=r"several configurations \(big, small\)"):
        load_texts(parse_source("hf:acme/corpus:train"), hub_cache=cache)
    with pytest.raises(CalibrationError, match="no configuration 'medium'"):
        load_texts(parse_source("hf:acme/corpus/medium:train"), hub_cache=cache)


@pytest.mark.parametrize("dataset", ["../etc", "acme/../x", "/abs", "csv/../.."])
def test_a_hub_dataset_id_that_is_a_path_is_refused(dataset: str, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="not a hub dataset id"):
        load_texts(TextSource(kind="hub", dataset=dataset), hub_cache=tmp_path)
