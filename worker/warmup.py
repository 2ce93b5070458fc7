"""Import, ahead of time, what a job would otherwise import lazily on its first model load.

transformers resolves most of itself on first use: ``AutoModelForCausalLM.from_pretrained`` imports
the core loading machinery, generation, masking, ``torch.distributed.tensor`` and the family's
modeling file; the heatmap imports matplotlib. In a process that runs one job that is seconds spent
once. A Celery worker forks a fresh child for every job, so whatever the parent did not import, every
job imports again (measured on 2 CPU cores: ~8 s of a ~10 s tiny-model job). Calling
:func:`warm_imports` in the parent before it forks makes those children start warm.

Only imports: nothing here touches CUDA, which a forked child could not use.
"""

from __future__ import annotations

import gc
import importlib
import logging
import time

from lorp.blocks import supported_families

log = logging.getLogger(__name__)


def warm_imports() -> dict[str, float]:
    """Import the libraries and every supported family's modules, then freeze the collector's view of
    them (``gc.freeze``); returns seconds per step.

    A family whose modules do not import (an older transformers) is logged and skipped: the job that
    needs it fails then with the loader's own message.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    import safetensors.torch  # noqa: F401
    import transformers.generation.utils
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    try:
        # The table of checkpoint key renamings, built with ~1k regexes on the first load of any model
        # (transformers 5.x; an internal helper, hence the guard).
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        get_checkpoint_conversion_mapping("llama")
    except (ImportError, AttributeError) as exc:  # pragma: no cover - other transformers versions
        log.info("no checkpoint conversion table to preload: %s", exc)
    timings["transformers"] = time.perf_counter() - started

    started = time.perf_counter()
    for family in supported_families():
        for kind in ("configuration", "modeling"):
            name = f"transformers.models.{family}.{kind}_{family}"
            try:
                importlib.import_module(name)
            except ImportError as exc:
                log.warning("could not preload %s: %s", name, exc)
    timings["families"] = time.perf_counter() - started

    started = time.perf_counter()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.backends.backend_agg
    import matplotlib.pyplot

    timings["matplotlib"] = time.perf_counter() - started

    # Everything imported so far lives as long as the process: move it out of the collector's
    # generations, so that a collection in a forked child (verify_reload runs one) neither scans
    # those objects nor copies their pages.
    gc.freeze()
    return timings
