#!/usr/bin/env bash
# Issue 12 "students that pass DC": the same BinaryDM W1A4 QAT run (embedded teacher, 300 steps x batch 32,
# lr 1e-3, seed 0) with and without zero padding and the float DC bypass; then the pass-through diagnostic,
# 64-sample grids with and without x0 clipping, and FID of 256 DDIM-50 samples vs MNIST-5k.
# Usage: experiments/dc_fix.sh [OUT=runs/dc_fix] [STEPS=300]   (one thread per job; resumes)
set -euo pipefail
OUT=${1:-runs/dc_fix}; STEPS=${2:-300}
B=${BDMTOOL:-.venv/bin/bdmtool}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
declare -A ARMS=(
  [control]=""
  [zero_pad]="--set binarize.act_pad=zero"
  [bypass]="--set binarize.dc_bypass=timestep_gain"
  [zero_pad_bypass]="--set binarize.act_pad=zero --set binarize.dc_bypass=timestep_gain"
)
for arm in control zero_pad bypass zero_pad_bypass; do
  $B train --method binarydm --abits 4 --steps $STEPS --out $OUT/$arm ${ARMS[$arm]} \
    --set train.batch_size=32 --set train.lr=1e-3 --set train.seed=0 --set train.threads=1 \
    --set train.log_every=10 --set train.ckpt_every=100 2>/dev/null
done
$B diagnose $OUT/control/model.ckpt $OUT/zero_pad/model.ckpt $OUT/bypass/model.ckpt $OUT/zero_pad_bypass/model.ckpt \
  --out $OUT/diagnose
for arm in control zero_pad bypass zero_pad_bypass; do
  $B sample $OUT/$arm/model.ckpt --n 64 --out $OUT/$arm/grid_clip 2>/dev/null
  $B sample $OUT/$arm/model.ckpt --n 64 --no-clip-x0 --out $OUT/$arm/grid_noclip 2>/dev/null
  $B eval $OUT/$arm/model.ckpt --n 256 --ref mnist5k --out $OUT/$arm/eval 2>/dev/null | tail -1
done
