"""warm_imports leaves nothing for a forked worker child to import: a whole job loads no new library code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lorp.blocks import supported_families
from tests.tiny import save_tiny_llama

pytestmark = pytest.mark.unit  # no server: it belongs with the service code it checks, not its suite

# Run in a fresh interpreter: this test process has imported everything already.
SCRIPT = """
import gc, json, sys
from pathlib import Path
import lorp.pipeline
from worker.warmup import warm_imports
steps = warm_imports()
frozen = gc.get_freeze_count()
before = set(sys.modules)
from lorp.spec import PruneSpec
spec = PruneSpec.model_validate({
    "model": {"id": sys.argv[1]},
    "method": "lorp",
    "target": {"num_layers": 1},
    "calibration": {"dataset": sys.argv[2], "num_samples": 4, "seq_len": 16, "batch_size": 2},
    "evaluation": {"max_windows": 2, "speed": False},
})
lorp.pipeline.run_prune(spec, Path(sys.argv[3]))
print(json.dumps({"steps": steps, "frozen": frozen, "new": sorted(set(sys.modules) - before),
                  "loaded": sorted(m for m in sys.modules if m.startswith("transformers.models."))}))
"""
LIBRARIES = ("transformers", "torch", "safetensors", "tokenizers", "huggingface_hub", "matplotlib", "numpy")


def test_a_job_after_warm_imports_imports_no_library_code(tmp_path: Path, tiny_tokenizer) -> None:
    model = save_tiny_llama(tmp_path, "tiny", tiny_tokenizer, num_hidden_layers=4)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"the model block {i} keeps the signal of layer {i % 7}." for i in range(400)))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model), str(corpus), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
        env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    late = [m for m in result["new"] if m.split(".")[0] in LIBRARIES]
    assert late == [], f"imported during the job, not by warm_imports: {late}"
    for family in supported_families():
        assert f"transformers.models.{family}.modeling_{family}" in result["loaded"], family
    assert set(result["steps"]) == {"transformers", "families", "matplotlib"}
    assert result["frozen"] > 10_000, "warm_imports must gc.freeze() what it imported"
