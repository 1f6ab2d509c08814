#!/usr/bin/env bash
# Offline quickstart: real images shipped by scikit-image -> train a small GradResNet jointly for a few
# minutes on the CPU -> evaluate accuracy and PSNR and draw a denoising figure. Nothing is downloaded.
# Re-running resumes (or reuses) runs/quickstart and writes a new evaluation folder; nothing is overwritten.
# CPU threads: training and evaluation use as many as there are idle cores and say how many in one line
# (a thread on a busy core stalls the others: 10x slower steps on a shared 2-core machine); OMP_NUM_THREADS=N
# sets the count. The console shows progress, one line per validation and the summary; the rest goes to
# runs/quickstart/log.txt.
set -euo pipefail
cd "$(dirname "$0")"
python -m timm_joint.data quickstart --root data/quickstart
python train_joint.py -c configs/quickstart.yaml "$@"
eval_dir="runs/quickstart/eval-$(date +%Y%m%d-%H%M%S)"
python -m timm_joint.evaluate --model local-dir:runs/quickstart/export/best \
    --dataset "" --data-dir data/quickstart --split validation \
    --sigmas 0 25 50 --psnr-sigmas 15 25 50 --out "$eval_dir"
echo "Quickstart done: weights in runs/quickstart/export, results and figures in $eval_dir"
