#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (under 8 minutes on one H200):
#   1. the model suite through the engine's Hugging Face door, compressed on CUDA (scripts/gpu_check.py suite);
#   2. the torchvision/timm door end to end (scripts/gpu_named_check.py);
#   3. BERT-base and ViT-base through the same door, a short DNS run each (gpu_check.py large);
#   4. a ResNet-50 training step at bf16, batch 256: surgery against dense, and peak memory (gpu_check.py step);
#   5. the CUDA tests of the test suite (tests marked for CUDA; they skip without a GPU).
# It uses the Python that is there (torch, torchvision, timm, transformers, onnx already installed) and
# installs nothing. Rows go to $OUT/gpu-check.jsonl (or ./gpu-check.jsonl) and the log beside them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-.}/gpu-check.jsonl
: > "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(0), 'torch', torch.__version__)" || exit 2
status=0
run() {
    local start=$SECONDS
    echo "== $*"
    "$@" || status=1
    echo "== $(( SECONDS - start )) s"
}
run "$PY" scripts/gpu_check.py suite --out "$out"
run "$PY" scripts/gpu_named_check.py --out "$out"
run "$PY" scripts/gpu_check.py large --out "$out"
run "$PY" scripts/gpu_check.py step --out "$out"
# the tests that need CUDA or torchvision/timm (the rest of those files runs too: engine-only, no service)
run "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/dns_core/test_named.py tests/dns_core/test_hf.py \
    tests/dns_core/test_train.py -k "cuda or real or named or hf"
echo "rows in $out; exit $status"
exit $status
