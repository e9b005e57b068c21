"""``bdmtool sample --tflite``: the DDIM loop over an exported model in the LCE interpreter.

Uses the same initial noise as ``bdmtool sample`` for the same seed (so the grids are comparable) and
the sidecar's schedule; one image at a time (exported models have batch 1), resetting the BiDM cache
at the start of each image's run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def sample_tflite(tflite: str | Path, out: str | Path, opts, threads: int = 1) -> tuple[Path, Path]:
    from bdmtool.exporter.runtime import TFLiteDenoiser
    from bdmtool.trainer.data import from_model_range
    from bdmtool.trainer.diffusion import Diffusion
    from bdmtool.trainer.sampling import initial_noise, write_samples
    from bdmtool.trainer.samplers import make_sampler, sample_loop
    from bdmtool.trainer.spec import DiffusionConfig

    tflite = Path(tflite)
    den = TFLiteDenoiser.from_file(tflite, threads=threads)
    side = json.loads(tflite.with_suffix(".json").read_text())
    sch = side["schedule"]
    diffusion = Diffusion(DiffusionConfig(schedule=sch["name"], beta_start=sch["beta_start"],
                                          beta_end=sch["beta_end"], timesteps=sch["timesteps"]))
    _, h, w, c = side["inputs"][0]["shape"]
    sampler = make_sampler(opts.sampler, diffusion, eta=opts.eta, skip=opts.skip, clip_x0=opts.clip_x0)
    sampler.set_timesteps(opts.steps)
    x_T, g = initial_noise(opts.n, (c, h, w), opts.seed)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = den.step(x.numpy().transpose(0, 2, 3, 1), float(t[0]))
        return torch.from_numpy(np.ascontiguousarray(e.transpose(0, 3, 1, 2)))

    images = []
    for i in tqdm(range(opts.n), desc=f"sampling {tflite.name}"):
        x = sample_loop(eps_fn, sampler, x_T[i:i + 1], g, on_start=den.reset)
        images.append(from_model_range(x.clamp(-1, 1).numpy()))
    meta = {"tflite": str(tflite), "method": side["method"], "bits": side["bits"], **opts.__dict__}
    return write_samples(np.concatenate(images), out, meta)
