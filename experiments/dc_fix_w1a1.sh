#!/usr/bin/env bash
# Issue 12, W1A1: BiDM and XNOR with and without the float DC bypass (embedded teacher, 300 steps x batch 32,
# lr 1e-3, seed 0); pass-through diagnostic, grids with and without clipping, FID of 256 samples vs MNIST-5k.
# Usage: experiments/dc_fix_w1a1.sh [OUT=runs/dc_fix_w1a1] [STEPS=300]   (one thread per job; resumes)
set -euo pipefail
OUT=${1:-runs/dc_fix_w1a1}; STEPS=${2:-300}
B=${BDMTOOL:-.venv/bin/bdmtool}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for m in bidm xnor; do
  for bp in none timestep_gain; do
    $B train --method $m --steps $STEPS --out $OUT/${m}_$bp --set binarize.dc_bypass=$bp \
      --set train.batch_size=32 --set train.lr=1e-3 --set train.seed=0 --set train.threads=1 \
      --set train.log_every=10 --set train.ckpt_every=100 2>/dev/null
  done
done
$B diagnose $OUT/bidm_none/model.ckpt $OUT/bidm_timestep_gain/model.ckpt $OUT/xnor_none/model.ckpt \
  $OUT/xnor_timestep_gain/model.ckpt --out $OUT/diagnose
for arm in bidm_none bidm_timestep_gain xnor_none xnor_timestep_gain; do
  $B sample $OUT/$arm/model.ckpt --n 64 --out $OUT/$arm/grid_clip 2>/dev/null
  $B sample $OUT/$arm/model.ckpt --n 64 --no-clip-x0 --out $OUT/$arm/grid_noclip 2>/dev/null
  $B eval $OUT/$arm/model.ckpt --n 256 --ref mnist5k --out $OUT/$arm/eval 2>/dev/null | tail -1
done
