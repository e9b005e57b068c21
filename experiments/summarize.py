"""Summarise an experiment folder of QAT arms (experiments/dc_fix*.sh) as a Markdown table.

Per arm: training eps-MSE (mean of the last 30 logged steps), DC slope at t >= 500 (from DIR/diagnose),
saturated samples of the 64-image grids with and without x0 clipping (an image more than half white, or
with under 1 % of pixels above 32: the "squares"), and the FID of the 256-sample eval (vs all of MNIST-5k).
Usage: python experiments/summarize.py runs/dc_fix [arm ...]
"""

import json
import sys
from pathlib import Path

import numpy as np


def saturated(npz: Path) -> int:
    x = np.load(npz)["arr_0"].astype(np.float32)
    white = (x >= 250).mean(axis=(1, 2, 3)) > 0.5
    empty = (x > 32).mean(axis=(1, 2, 3)) < 0.01
    return int((white | empty).sum())


def main(root: str, arms: list[str]) -> None:
    root = Path(root)
    diag = json.loads((root / "diagnose" / "diagnose.json").read_text())
    slopes = {k.split("(")[-1].rstrip(")"): v for k, v in diag["high_t_slope"].items()}
    arms = arms or [p.name for p in sorted(root.iterdir()) if (p / "metrics.jsonl").exists()]
    teacher = next(v for k, v in diag["high_t_slope"].items() if k.startswith("teacher"))
    print(f"teacher DC slope at t>=500: {teacher:.2f}\n")
    print("| arm | train eps-MSE (last 30) | DC slope t>=500 | saturated / 64, no clip | saturated / 64, clip | FID (256, clip) |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in arms:
        rows = [json.loads(line) for line in (root / arm / "metrics.jsonl").read_text().splitlines()]
        mse = np.mean([r["loss_mse"] for r in rows[-3:]]) if rows else float("nan")
        fid = json.loads((root / arm / "eval" / "metrics.json").read_text())["fid"]
        print(f"| {arm} | {mse:.4f} | {slopes.get(arm, float('nan')):.2f} | "
              f"{saturated(root / arm / 'grid_noclip.npz')} | {saturated(root / arm / 'grid_clip.npz')} | {fid:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
