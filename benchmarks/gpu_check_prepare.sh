#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/gpu_check.sh needs on a bare GPU machine that has PyTorch,
# Lightning, TensorBoard and scikit-learn but no network: the Fashion-MNIST files (../shared does not travel)
# and wheels of the pure-Python packages it lacks. Both go to git-ignored folders that the device run carries:
#   bash benchmarks/gpu_check_prepare.sh
#   device run: command="bash benchmarks/gpu_check.sh", carry=[".gpu-data", ".whl"], timeout_s=540
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu-data/" .git/info/exclude 2>/dev/null || echo "/.gpu-data/" >> .git/info/exclude
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .gpu-data/FashionMNIST/raw .whl
cp "${CNNFEAT_DATA:-../shared/data}"/FashionMNIST/raw/*.gz .gpu-data/FashionMNIST/raw/
# the versions installed here (the ones the test suite passes with)
pins=$(python3 -c "from importlib.metadata import version as v; print(' '.join(f'{p}=={v(p)}' for p in
  ('hydra-core', 'omegaconf', 'umap-learn', 'pynndescent')))")
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl $pins
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 needs) is published as a source archive only: build its wheel
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .gpu-data .whl
