#!/usr/bin/env bash
# Regenerates the figures of docs/experiments.md (docs/*.png) on the synthetic set with small settings: about
# 25-30 minutes on a 2-core CPU (measured 2026-11-23: 32 min with other work running; most of it is depth's
# 25-layer PlainNet). The full experiments are the same commands without the data and size options.
# Usage: bash docs/make_figures.sh [WORK_DIR]   (run from the repository root; WORK_DIR default runs/figures)
set -euo pipefail
work="${1:-runs/figures}"
small=(--dataset synthetic --image-size 16 --train-samples 1024 --test-samples 256 --no-progress --overwrite)

python train.py plain-vs-residual "${small[@]}" --epochs 8 --out "$work/plain-vs-residual"
python train.py depth "${small[@]}" --epochs 6 --out "$work/depth"
python train.py he-init --no-progress --out "$work/he-init"
python train.py ablation "${small[@]}" --image-size 8 --train-samples 512 --test-samples 128 --epochs 6 --no-augment --lr 0.05 \
  --out "$work/ablation"
python train.py landscape --dataset synthetic --image-size 16 --train-samples 1024 --test-samples 256 --no-progress \
  --relative --plain "$work/plain-vs-residual/runs/PlainDeepCNN" \
  --residual "$work/plain-vs-residual/runs/SimpleResNet" --out "$work/landscape"
python train.py compare "${small[@]}" --model SimpleResNet --n-blocks 2 --epochs 4 --out "$work/compare"

for name in plain-vs-residual depth he-init ablation landscape compare; do
  cp "$work/$name/${name//-/_}.png" docs/
done
echo "figures written to docs/"
