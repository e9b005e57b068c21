"""FP training-step and sampling cost per U-Net preset and arithmetic mode, side by side with eager fp32.

    python benchmarks/fp_step.py [--presets tiny,cifar10] [--batch 32] [--repeats 5] [--threads 0]
                                 [--modes fp32,bf16,channels_last,compile]

Prints a Markdown table: per preset and mode, median seconds per AdamW training step (forward + backward +
update) at the given batch, median seconds per denoiser evaluation, DDIM-50 images/s, and the speed-up of the
training step over eager fp32 measured in the same run. Modes: ``fp32`` (eager, the reference), ``bf16``
(``torch.autocast`` to bfloat16, what ``bdmtool train --bf16`` does), ``channels_last`` (NHWC memory format)
and ``compile`` (``torch.compile`` of the U-Net; its compile time is printed separately, not in the step).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bdmtool.trainer.spec import UNetConfig
from bdmtool.trainer.unet import UNet, count_parameters

MODES = ("fp32", "bf16", "channels_last", "compile")


def _median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(preset: str, batch: int, repeats: int, mode: str) -> dict:
    if mode not in MODES:
        raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    torch.manual_seed(0)
    cfg = UNetConfig.from_name(preset)
    model = UNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_channels, cfg.resolution, cfg.resolution)
    t = torch.randint(0, 1000, (batch,))
    xin = x
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        xin = x.contiguous(memory_format=torch.channels_last)
    net = model
    compile_s = 0.0
    if mode == "compile":
        net = torch.compile(model)
        t0 = time.perf_counter()
        (net(xin, t) - x).pow(2).mean().backward()
        compile_s = time.perf_counter() - t0
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if mode == "bf16" else contextlib.nullcontext

    def step():
        with cast():
            out = net(xin, t)
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def evaluate():
        with torch.no_grad(), cast():
            net(xin, t)

    model.train()
    s_train = _median_time(step, repeats)
    model.eval()
    s_eval = _median_time(evaluate, repeats)
    return {"preset": preset, "mode": mode, "params_M": count_parameters(model) / 1e6, "train_s": s_train,
            "eval_s": s_eval, "ddim50_img_per_s": batch / (50 * s_eval), "compile_s": compile_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny,cifar10")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--modes", default="fp32,bf16,channels_last", help=f"comma-separated, from {', '.join(MODES)}")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = a.modes.split(",")
    if "fp32" not in modes:
        modes.insert(0, "fp32")  # the reference of the ratio column
    rows = [bench(p, a.batch, a.repeats, m) for p in a.presets.split(",") for m in modes]
    print(f"\nbatch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| preset | mode | params (M) | train step (s) | step speed-up vs fp32 | denoiser eval (s) "
          "| DDIM-50 images/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = next(x for x in rows if x["preset"] == r["preset"] and x["mode"] == "fp32")
        note = f" (compile {r['compile_s']:.0f} s)" if r["compile_s"] else ""
        print(f"| {r['preset']} | {r['mode']}{note} | {r['params_M']:.2f} | {r['train_s']:.3f} | "
              f"{ref['train_s'] / r['train_s']:.2f}× | {r['eval_s']:.3f} | {r['ddim50_img_per_s']:.2f} |")


if __name__ == "__main__":
    main()
