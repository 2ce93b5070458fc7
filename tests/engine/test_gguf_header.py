"""The GGUF header check: a real file's tensors add up to its size; broken files are refused at once."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from lorp import assets
from lorp.errors import ModelLoadError
from lorp.gguf_header import block_count, check_gguf, read_gguf_header
from lorp.loading import load_model


def _small_gguf(path: Path, *, blocks: int = 2) -> Path:
    """A small, valid GGUF: metadata of every kind (an array of strings too) and two f32 tensors."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_context_length(64)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(500)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(500)])
    writer.add_tensor("token_embd.weight", np.arange(500 * 8, dtype=np.float32).reshape(500, 8))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_demo_gguf_adds_up_to_its_size() -> None:
    """Every tensor of the real SmolLM2 file lies inside it, and the last one ends at its end."""
    path = assets.demo_gguf_path()
    started = time.monotonic()
    header = check_gguf(path)
    assert time.monotonic() - started < 5
    assert header.metadata["general.architecture"] == "llama" and block_count(header) == 30
    # The same table as the gguf package's own reader (which is what transformers uses).
    reader = GGUFReader(str(path))
    theirs = {t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in reader.tensors}
    ours = {t.name: (t.shape, t.ggml_type, header.data_start + t.offset) for t in header.tensors}
    assert ours == theirs
    last_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    assert last_end == path.stat().st_size


def test_a_written_gguf_reads_back(tmp_path: Path) -> None:
    header = check_gguf(_small_gguf(tmp_path / "small.gguf", blocks=2))
    assert block_count(header) == 2
    # GGUF stores dimensions innermost first: numpy's (500, 8) is (8, 500).
    shapes = [(t.name, t.shape) for t in header.tensors]
    assert shapes == [("token_embd.weight", (8, 500)), ("blk.0.attn_q.weight", (8, 8))]
    assert header.metadata["llama.context_length"] == 64
    assert "tokenizer.ggml.tokens" not in header.metadata  # arrays are skipped, not materialised


@pytest.mark.parametrize("cut", ["in the header", "in the string array", "in the tensor table", "in the data"])
def test_truncated_files_are_refused_at_once(cut: str, tmp_path: Path) -> None:
    whole = _small_gguf(tmp_path / "whole.gguf").read_bytes()
    header = read_gguf_header(tmp_path / "whole.gguf")
    tokens_at = whole.index(b"tok250")
    table_at = whole.index(b"blk.0.attn_q.weight")
    keep = {
        "in the header": 20,
        "in the string array": tokens_at,
        "in the tensor table": table_at + 4,
        "in the data": header.data_start + 100,
    }[cut]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(whole[:keep])
    with pytest.raises(ModelLoadError, match="truncated") as info:
        check_gguf(broken)
    assert info.value.field == "model.id" and "broken.gguf" in str(info.value)


def test_a_header_lying_about_a_shape_is_refused(tmp_path: Path) -> None:
    path = _small_gguf(tmp_path / "lying.gguf")
    raw = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    dims_at = raw.index(name) + len(name) + 4  # past the name and n_dims
    raw[dims_at : dims_at + 8] = (8 * 1024).to_bytes(8, "little")  # 8 x 8 claims to be 8192 x 8
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="lies about the shape"):
        check_gguf(path)


@pytest.mark.parametrize(
    ("data", "needle"), [(b"GGML" + b"\0" * 40, "magic"), (b"GGUF\x07\0\0\0" + b"\0" * 40, "version 7")]
)
def test_not_gguf_or_unknown_version(data: bytes, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match=needle):
        check_gguf(path)


def test_a_gguf_claiming_a_million_blocks_is_refused_before_loading(tmp_path: Path) -> None:
    path = _small_gguf(tmp_path / "deep.gguf", blocks=10**6)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="claims 1000000 decoder blocks"):
        load_model(str(path))
    assert time.monotonic() - started < 5
