#!/usr/bin/env bash
# Runs the whole chaos matrix; writes OUT_DIR/chaos.json, OUT_DIR/report.md, one timeline PNG per scenario
# and the histories. Exit status: 0 only if every scenario passed. Usage: bash docs/chaos/run_all.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mkdir -p "${1:-chaos-results}" && cd "${1:-chaos-results}" && pwd)"
cd "$here/../.."  # the repository root: the Consul emulator lives in tests/
exec python3 -m services.cli.main chaos "$here"/*.yaml \
  --json "$out/chaos.json" --markdown "$out/report.md" --plot "$out/timeline.png" --history-dir "$out/history"
