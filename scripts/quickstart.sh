#!/usr/bin/env bash
# Set up, then run the main job on embedded defaults through the service: start the embedded
# service (SQLite, local broker folder, local files, one worker), upload a converged LeNet-300-100,
# run target-driven DNS on Fashion-MNIST (40x, at most 0.5 pp accuracy drop) as a job, download its
# artifacts into out/ (sha256-checked), stop. Extra arguments go to `netsurgery demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${NETSURGERY_FASHION_MNIST:-}" ]; then
    scripts/apt.sh dataset-fashion-mnist
fi
exec .venv/bin/netsurgery demo "$@"
