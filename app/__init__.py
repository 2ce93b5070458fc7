"""The LoRP service: settings, errors, database, repositories, storage, enqueueing and the HTTP API.

It never imports torch, transformers or the worker (import-linter checks it).
"""
