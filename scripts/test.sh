#!/usr/bin/env bash
# The whole test suite: lint, types, tests. Offline; no GPU needed (GPU tests skip cleanly).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/pytest "$@"
