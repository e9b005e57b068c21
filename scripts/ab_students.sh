#!/usr/bin/env bash
# A/B of student-recipe switches at equal budget and seed (docs/methods.md, "LSQ steps and the DC path").
# Each arm: BinaryDM W1A${ABITS:-4} from the embedded teacher, STEPS (default 600) x batch 32, lr 1e-3 cosine, warm-up 50,
# seed 0, one thread; then 256 DDIM-50 samples (seed 0) scored against MNIST-5k and the pass-through diagnostic.
# ARMS="name:set1,set2 ..." (default: the three below). Run two arms side by side with ARMS=... each.
# Resumes: re-run the same command and finished runs are reused.
set -euo pipefail
B=${BDMTOOL:-.venv/bin/bdmtool}
A=bdmtool/assets
STEPS=${STEPS:-600}
ABITS=${ABITS:-4}
OUT=${OUT:-runs/ab}  # arms land in OUT/<name>
ARMS=${ARMS:-"learned_gain:binarize.lsq_step=learned,binarize.dc_bypass=timestep_gain \
log_gain:binarize.lsq_step=log,binarize.dc_bypass=timestep_gain \
log_affine:binarize.lsq_step=log,binarize.dc_bypass=timestep_affine"}
for arm in $ARMS; do
  name=${arm%%:*}; sets=${arm#*:}; out=$OUT/$name
  extra=(); IFS=, read -ra kv <<< "$sets"; for s in "${kv[@]}"; do extra+=(--set "$s"); done
  $B train --method binarydm --abits $ABITS --teacher $A/tiny_mnist_fp.ckpt --steps $STEPS --out $out \
     --set train.seed=0 --set train.batch_size=32 --set train.lr=1e-3 --set train.lr_decay=cosine \
     --set train.warmup_steps=50 --set train.log_every=25 --set train.ckpt_every=100 --set train.threads=1 "${extra[@]}"
  $B eval $out/model.ckpt --ref mnist5k --n 256 --seed 0 --out $out/eval
  $B diagnose $out/model.ckpt --teacher $A/tiny_mnist_fp.ckpt --out $out/diagnose
done
