#!/usr/bin/env bash
# The whole test suite: lint, types, tests. Offline; no GPU needed (GPU tests skip cleanly).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# the dashboard test drives Debian's Chromium (Playwright's own browser download does not work offline)
scripts/apt.sh chromium chromium-driver
# the same checks run as git hooks: .venv/bin/pre-commit install (.pre-commit-config.yaml)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
