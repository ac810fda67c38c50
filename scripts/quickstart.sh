#!/usr/bin/env bash
# Set up, then run the main job on embedded defaults: target-driven DNS of LeNet-300-100 on
# Fashion-MNIST (40x, at most 0.5 pp accuracy drop). Extra arguments go to `netsurgery compress`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${NETSURGERY_FASHION_MNIST:-}" ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
    else
        sudo apt-get install -y dataset-fashion-mnist
    fi
fi
exec .venv/bin/netsurgery compress "$@"
