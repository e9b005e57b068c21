"""A QAT training step alone and next to a second CPU-bound process, per thread setting (issue 14).

    python benchmarks/contention.py [--method binarydm] [--abits 4] [--batch 32] [--steps 8]

Each setting runs in a fresh interpreter (OpenMP reads its environment once, at load), first alone, then while a
second interpreter runs the same QAT step in a loop with the same setting (the situation a user creates by
starting two trainings). Columns: median seconds per step alone, next to the busy process, and their ratio.
Settings: torch threads (1 or all cores) x OpenMP wait policy (libgomp's default spins before sleeping;
PASSIVE sleeps at once), and bdmtool's own choice (trainer/runtime/threads.py: the competitor, started first on the
idle machine, keeps torch's defaults; the measured process sees a busy core and takes the other). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

STEP = r"""
import json, os, statistics, sys, time
import bdmtool
if sys.argv[5] == "0":  # bdmtool's own choice, made before torch loads (what the CLI does)
    from bdmtool.trainer.runtime.threads import choose_threads
    choose_threads()
import torch
from bdmtool.trainer.diffusion import Diffusion
from bdmtool.trainer.objective import TrainingObjective
from bdmtool.trainer.spec import build_train_spec
from bdmtool.trainer.train import build_student
method, abits, batch, steps, threads, forever = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
if threads:
    torch.set_num_threads(threads)
spec = build_train_spec(method=method, abits=abits, steps=1000, overrides=[f"train.batch_size={batch}"],
                        teacher=os.path.join(bdmtool.ASSETS, "tiny_mnist_fp.ckpt"))
model, teacher = build_student(spec)
obj = TrainingObjective(spec, Diffusion(spec.diffusion), model, teacher)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator().manual_seed(0)
x0 = torch.rand(batch, 1, 32, 32, generator=g) * 2 - 1
noise = torch.randn(batch, 1, 32, 32, generator=g)
t = torch.randint(0, 999, (batch,), generator=g)
obj.prepare(x0, t, noise)
def step(i):
    loss = obj(model, x0, t, noise, 100 + i)["loss"]
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
step(0)
times, i = [], 0
while forever or i < steps:
    t0 = time.perf_counter(); step(i); times.append(time.perf_counter() - t0); i += 1
print(json.dumps({"median_s": statistics.median(times)}))
"""


def run(env_extra: dict, args, threads: int, forever: bool = False):
    env = {**os.environ, **env_extra}
    env.pop("BDMTOOL_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        env.pop("OMP_NUM_THREADS", None)
    cmd = [sys.executable, "-c", STEP, args.method, str(args.abits), str(args.batch), str(args.steps), str(threads),
           "1" if forever else "0"]
    if forever:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["median_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="binarydm")
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--settings", default="", help="comma-separated row indices (0-3) [default: all]")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    settings = [(f"{cores} threads, OpenMP default wait", cores, {}),
                (f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", cores, {"OMP_WAIT_POLICY": "PASSIVE"}),
                ("1 thread", 1, {}),
                ("bdmtool's choice (the CLI's default: no setting)", 0, {})]
    print(f"{args.method} W1A{args.abits} QAT step, batch {args.batch}, median of {args.steps}; {cores} cores\n")
    if a_settings := [x for x in args.settings.split(",") if x]:
        settings = [settings[int(i)] for i in a_settings]
    print("| setting | alone (s) | next to a busy process (s) | ratio |\n|---|---:|---:|---:|")
    for label, threads, env in settings:
        alone = run(env, args, threads)
        busy = run(env, args, threads, forever=True)
        time.sleep(5)  # let the competitor reach its loop
        try:
            shared = run(env, args, threads)
        finally:
            busy.kill()
            busy.wait()
        print(f"| {label} | {alone:.3f} | {shared:.3f} | {shared / alone:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
