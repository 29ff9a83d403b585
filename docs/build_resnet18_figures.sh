#!/usr/bin/env bash
# Rebuilds the README's ResNet-18 pictures (section "Your own data and network") from a short real run:
# ResNet-18 (random init) on Fashion-MNIST, 2 epochs of 30 batches of 128, CPU, with the default callbacks plus
# representations and the atlas, every picture also written as PNG (save_png=true). The atlas's feature
# visualisation (about 12 minutes on 2 cores for 20 conv layers x 16 units) and the final test are switched off to
# keep the run short; the pictures do not use them. Top patches and the atlas read 2,000 test images (not all
# 10,000) for the same reason.
#   CNNFEAT_DATA=/path/to/data bash docs/build_resnet18_figures.sh [RUN_DIR]
set -euo pipefail
RUN=${1:-/tmp/b-resnet}
cd "$(dirname "$0")/.."

cnnfeat-train model=torchvision model.arch=resnet18 model.weights=none \
  'callbacks=[default,representations,atlas]' save_png=true test=false callbacks.atlas.featviz=false \
  callbacks.top_patches.probe_size=2000 callbacks.atlas.probe_size=2000 \
  trainer=cpu trainer.max_epochs=2 trainer.limit_train_batches=30 data.batch_size=128 \
  hydra.run.dir="$RUN"

# the README's pictures, after the second epoch (step 2)
I="$RUN/images"
mkdir -p docs/resnet18
cp "$I/feature_maps/net.conv1/relu/img22/step_002.png" docs/resnet18/feature_maps_conv1.png
cp "$I/top_patches/net.layer1.0.conv1/step_002.png" docs/resnet18/top_patches_layer1.png
cp "$I/umap/features/step_002.png" docs/resnet18/umap.png
cp "$I/cka/layers/step_002.png" docs/resnet18/cka_layers.png
cp "$I/cka/to_final/step_002.png" docs/resnet18/cka_to_final.png
cp "$I/filters/net.conv1/step_002.png" docs/resnet18/filters_conv1.png
cp "$I/top_patches/net.layer2.0.conv1/step_002.png" docs/resnet18/top_patches_layer2.png
