#!/usr/bin/env bash
# Rebuilds the committed assets in bdmtool/assets/ (run from the repo root; ./run bdmtool ... works too).
# Every step resumes: re-run the script after an interruption and finished runs are reused.
#   1. the FP teacher: 6,000 steps from scratch (v1), then 8,000 more steps from v1's weights with a cosine
#      learning rate (v2, the embedded tiny_mnist_fp.ckpt);  2. its grid and FID (1,000 samples vs MNIST-5k);
#   3. the shipped students from it (1 h 13 min to 2 h 38 min each on one thread, two side by side), packed to sign bits (bdmtool pack),
#      with their grids, loss curves and pass-through diagnostics.
# STAGE=teacher|students|all (default all). THREADS (default 2) sets torch's threads for the trainings.
# ONLY=<student name> (e.g. ONLY=bidm_w1a1) builds one student and skips the shared diagnostic, so that two
# students can train side by side at THREADS=1 each (2 cores: never two 2-thread jobs at once).
set -euo pipefail
B=${BDMTOOL:-.venv/bin/bdmtool}
A=bdmtool/assets
STAGE=${STAGE:-all}
T=train.threads=${THREADS:-2}

if [ "$STAGE" = teacher ] || [ "$STAGE" = all ]; then
  $B train --preset tiny --data mnist5k --steps 6000 --out runs/tiny_mnist_fp \
     --set train.seed=0 --set train.lr=3e-4 --set train.batch_size=64 --set train.ckpt_every=500 --set train.log_every=25 --set $T
  $B train --init runs/tiny_mnist_fp/model.ckpt --steps 8000 --out runs/tiny_mnist_fp_v2 \
     --set train.seed=1 --set train.lr=2e-4 --set train.lr_decay=cosine --set train.lr_final_ratio=0.1 \
     --set train.warmup_steps=200 --set train.batch_size=64 --set train.ckpt_every=250 --set train.log_every=25 --set $T
  cp runs/tiny_mnist_fp_v2/model.ckpt $A/tiny_mnist_fp.ckpt
  cp runs/tiny_mnist_fp_v2/loss.png $A/tiny_mnist_fp_loss.png
  $B sample $A/tiny_mnist_fp.ckpt --steps 50 --eta 0 --n 64 --seed 0 --out $A/tiny_mnist_fp.png
  $B eval $A/tiny_mnist_fp.ckpt --ref mnist5k --n 1000 --out runs/eval/tiny_mnist_fp
fi

if [ "$STAGE" = students ] || [ "$STAGE" = all ]; then
  # name  method  abits  steps  [one extra --set]  (equal steps for the two W1A1 methods: BiDM vs its XNOR baseline;
  # W1A8 and W1A4 distil the teacher's ε, docs/methods.md "Output distillation")
  for spec in "binarydm_w1a8 binarydm 8 7000 distill.kd_weight=1.0" "binarydm_w1a4 binarydm 4 4500 distill.kd_weight=1.0" "bidm_w1a1 bidm 1 7000" \
              "xnor_w1a1 xnor 1 7000"; do
    set -- $spec
    if [ -n "${ONLY:-}" ] && [ "$ONLY" != "$1" ]; then continue; fi
    $B train --method $2 --abits $3 --teacher $A/tiny_mnist_fp.ckpt --steps $4 --out runs/student_$1 \
       --set train.seed=0 --set train.batch_size=32 --set train.lr=1e-3 --set train.lr_decay=cosine \
       --set train.warmup_steps=100 --set train.log_every=25 --set train.ckpt_every=250 --set $T ${5:+--set $5}
    $B pack runs/student_$1/model.ckpt --out $A/tiny_mnist_$1.ckpt
    cp runs/student_$1/loss.png $A/tiny_mnist_$1_loss.png
    $B sample $A/tiny_mnist_$1.ckpt --steps 50 --eta 0 --n 64 --seed 0 --out $A/tiny_mnist_$1.png
    rm -f $A/tiny_mnist_$1.npz  # the grid and its .json are the asset; the arrays are not shipped
    $B eval $A/tiny_mnist_$1.ckpt --ref mnist5k --n 1000 --out runs/eval/tiny_mnist_$1
  done
  if [ -n "${ONLY:-}" ]; then exit 0; fi
  $B diagnose $A/tiny_mnist_binarydm_w1a8.ckpt $A/tiny_mnist_binarydm_w1a4.ckpt $A/tiny_mnist_bidm_w1a1.ckpt \
     $A/tiny_mnist_xnor_w1a1.ckpt --teacher $A/tiny_mnist_fp.ckpt --n 2048 --out runs/eval/diagnose_students
  cp runs/eval/diagnose_students/diagnose.png $A/students_diagnose.png
fi
