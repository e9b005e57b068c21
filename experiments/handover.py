"""Which timesteps cost a student its FID? Sample with the teacher's eps on part of the trajectory and the
student's on the rest, and score each hybrid (DDIM-50, eta 0, clipping, the same x_T for every arm).

Arms: the student alone; the teacher for t >= T (T = 750, 500, 250) and the student below; the student for
t >= T and the teacher below; the teacher alone. If "teacher for t >= 750" closes most of the gap, the
student's high-t predictions (the layout) are what it gets wrong; if "teacher below T" does, the details are.

Usage: python experiments/handover.py STUDENT.ckpt TEACHER.ckpt OUT_DIR [--n 256]
Writes OUT_DIR/handover.json, OUT_DIR/handover.md and one grid per arm.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from bdmtool.trainer import fid
from bdmtool.trainer.binarize import reset_state
from bdmtool.trainer.data import from_model_range, load_images
from bdmtool.trainer.diffusion import Diffusion
from bdmtool.trainer.sampling import initial_noise, write_samples
from bdmtool.trainer.samplers import make_sampler, sample_loop
from bdmtool.trainer.checkpoint import read_spec
from bdmtool.trainer.train import load_model
from bdmtool.tools.evaluate import cache_dir


def hybrid(student, teacher, rule):
    """eps_fn using the teacher where rule(t) is true (t is one value per call: the sampler's step)."""
    def eps(x, t):
        return teacher(x, t) if rule(int(t[0])) else student(x, t)
    return eps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("student"), ap.add_argument("teacher"), ap.add_argument("out")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    student = load_model(a.student)[0]
    teacher, tspec, _ = load_model(a.teacher)
    diffusion = Diffusion(tspec.diffusion)
    shape = (tspec.unet.in_channels, tspec.unet.resolution, tspec.unet.resolution)
    data = read_spec(a.teacher).data
    images = load_images(dataclasses.replace(data, limit=5000, hflip=False))
    ref = fid.reference_stats(images, {"reference": data.source, "path": data.path, "resolution": data.resolution,
                                       "channels": data.channels, "limit": 5000}, cache_dir())
    arms = {"student": lambda t: False}
    for T in (750, 500, 250):
        arms[f"teacher t>={T}"] = (lambda T: lambda t: t >= T)(T)
    for T in (750, 500, 250):
        arms[f"teacher t<{T}"] = (lambda T: lambda t: t < T)(T)
    arms["teacher"] = lambda t: True
    results = json.loads((out / "handover.json").read_text()) if (out / "handover.json").exists() else {}
    for name, rule in arms.items():
        if name in results:
            continue
        sampler = make_sampler("ddim", diffusion, eta=0.0, clip_x0=True)
        sampler.set_timesteps(50)
        x_T, g = initial_noise(a.n, shape, a.seed)
        batches = []
        with torch.no_grad():
            for s in range(0, a.n, 128):
                x = sample_loop(hybrid(student, teacher, rule), sampler, x_T[s:s + 128], g,
                                on_start=lambda: (reset_state(student), reset_state(teacher)))
                batches.append(from_model_range(x.clamp(-1, 1).numpy()))
        imgs = np.concatenate(batches)
        slug = name.replace(" ", "_").replace(">=", "ge").replace("<", "lt")
        write_samples(imgs[:64], out / f"{slug}.png", {"arm": name})
        m = fid.compare(imgs, ref, progress=False)
        results[name] = {k: float(m[k]) for k in ("fid", "sfid", "precision", "recall")}
        print(f"{name}: FID {results[name]['fid']:.2f}", flush=True)
        (out / "handover.json").write_text(json.dumps(results, indent=2))
    lines = [f"| arm | FID ({a.n}) | sFID | precision | recall |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {v['fid']:.2f} | {v['sfid']:.2f} | {v['precision']:.3f} | {v['recall']:.3f} |"
              for k, v in results.items()]
    (out / "handover.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
