#!/usr/bin/env bash
# Rebuilds the committed assets in bdmtool/assets/ (run from the repo root, inside .venv: ./run bdmtool ... works too).
# 1. the embedded FP model (about 55 min on 2 cores), 2. its DDIM-50 grid, 3. short QAT runs + their grids.
set -euo pipefail
B=${BDMTOOL:-.venv/bin/bdmtool}
A=bdmtool/assets
$B train --preset tiny --data mnist5k --steps 6000 --out runs/tiny_mnist_fp \
   --set train.seed=0 --set train.lr=3e-4 --set train.batch_size=64 --set train.ckpt_every=500 --set train.log_every=25
cp runs/tiny_mnist_fp/model.ckpt $A/tiny_mnist_fp.ckpt
$B sample $A/tiny_mnist_fp.ckpt --steps 50 --eta 0 --n 64 --seed 0 --out $A/tiny_mnist_fp.png
for spec in "binarydm 4" "bidm 1"; do
  set -- $spec
  $B train --method $1 --abits $2 --teacher $A/tiny_mnist_fp.ckpt --steps 400 --out runs/qat_$1_w1a$2 \
     --set train.batch_size=32 --set train.log_every=10 --set train.ckpt_every=100
  $B sample runs/qat_$1_w1a$2/model.ckpt --steps 50 --eta 0 --n 64 --seed 0 --out $A/tiny_mnist_$1_w1a$2.png
  cp runs/qat_$1_w1a$2/loss.png $A/tiny_mnist_$1_w1a$2_loss.png
done
