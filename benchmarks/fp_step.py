"""FP training-step and sampling cost per U-Net preset on this machine.

    python benchmarks/fp_step.py [--presets tiny,cifar10] [--batch 64] [--repeats 5] [--threads 0]

Prints a Markdown table: parameters, median seconds per AdamW training step (forward + backward + update)
at the given batch, median seconds per denoiser evaluation at the same batch, and images/s for DDIM-50.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bdmtool.trainer.spec import UNetConfig
from bdmtool.trainer.unet import UNet, count_parameters


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(preset: str, batch: int, repeats: int) -> dict:
    cfg = UNetConfig.from_name(preset)
    model = UNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.randint(0, 1000, (batch,))

    def step():
        loss = (model(x, t) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def evaluate():
        with torch.no_grad():
            model(x, t)

    model.train()
    s_train = _median_time(step, repeats)
    model.eval()
    s_eval = _median_time(evaluate, repeats)
    return {"preset": preset, "params_M": count_parameters(model) / 1e6, "train_s": s_train, "eval_s": s_eval,
            "ddim50_img_per_s": batch / (50 * s_eval)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,cifar10")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [bench(p, a.batch, a.repeats) for p in a.presets.split(",")]
    print(f"\nbatch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| preset | params (M) | train step (s) | denoiser eval (s) | DDIM-50 images/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['preset']} | {r['params_M']:.2f} | {r['train_s']:.3f} | {r['eval_s']:.3f} | {r['ddim50_img_per_s']:.2f} |")


if __name__ == "__main__":
    main()
