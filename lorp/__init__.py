"""LoRP: depth pruning of causal language models (Locality-Aware Redundancy Pruning and its baselines).

A library with its own command line (``python -m lorp prune|analyze|select``): torch, transformers,
numpy and scikit-learn, and nothing of the service (no web, SQL, queue or object-storage imports).
Importing ``lorp`` itself imports no torch: the service's API uses the torch-free modules (``spec``,
``selection``, ``errors``, ``depth``) without it.
"""
