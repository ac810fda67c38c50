#!/usr/bin/env bash
# Create .venv and install netsurgery with its test tools. Safe to run again: once installed, it
# touches no network until pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.netsurgery-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
pip=(.venv/bin/pip install --quiet --disable-pip-version-check)
# The CPU wheel of torch (from local disk on these machines). For a CUDA build, install torch from
# the PyTorch index into .venv before running this script; it is then left alone.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" "torch==2.13.0"
fi
# Keep the torch that is there (the CPU wheel above, or a CUDA build installed first): without this
# constraint the resolver may swap it for the index's newest CUDA build while it places the rest.
keep=$(mktemp)
trap 'rm -f "$keep"' EXIT
.venv/bin/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$keep"
"${pip[@]}" --constraint "$keep" -e ".[dev]"
echo "$want" > "$stamp"
