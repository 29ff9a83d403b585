#!/usr/bin/env bash
# The GPU check, ready to run on one CUDA device in under 8 minutes (see benchmarks/gpu_check.py):
#   1. the gpu-marked tests (they assert that training runs on CUDA at the configured precision)
#   2. the timed 15-epoch experiment=seed run with every picture (trainer=gpu: 16-mixed)
# Results: $OUT (default benchmarks/results/gpu): gpu_check.json, gpu_check.md, the test log, the run's log.
# On a bare machine first run benchmarks/gpu_check_prepare.sh here and carry .gpu-data and .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import hydra, umap" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/cnnfeat-site .whl/*.whl
  export PYTHONPATH=/tmp/cnnfeat-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -z "${CNNFEAT_DATA:-}" ]; then
  if [ -d .gpu-data ]; then export CNNFEAT_DATA=$PWD/.gpu-data; else export CNNFEAT_DATA=$(cd .. && pwd)/shared/data; fi
fi
export CNNFEAT_CACHE=${CNNFEAT_CACHE:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
python3 benchmarks/gpu_check.py --out "$OUT" "$@"
