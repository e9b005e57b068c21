"""Generate images from a checkpoint: the library side of ``bdmtool sample``."""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import atomic_write
from .binarize import reset_state
from .data import from_model_range, save_grid
from .diffusion import Diffusion
from .samplers import check_sampler_settings, make_sampler, sample_loop


@dataclass(frozen=True)
class SampleOptions:
    n: int = 64
    steps: int = 50
    eta: float = 0.0
    sampler: str = "ddim"
    skip: str = "uniform"
    seed: int = 0
    batch_size: int = 64
    clip_x0: bool = True  # clamp the predicted x0 to [-1, 1] each step (pixel-space models; --no-clip-x0)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be an integer in [0, 2**63), got {self.seed}")
        if not (self.eta >= 0 and self.eta == self.eta and self.eta != float("inf")):
            raise ValueError(f"--eta must be a finite number >= 0 (0 = deterministic DDIM), got {self.eta}")
        check_sampler_settings(self.sampler, self.eta, self.skip)


def initial_noise(n: int, shape: tuple[int, int, int], seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """x_T for ``n`` samples and the generator for the sampler's per-step noise (both from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), g


def generate(eps_model: torch.nn.Module, diffusion: Diffusion, shape: tuple[int, int, int],
             opts: SampleOptions, progress: bool = True, device: torch.device | None = None,
             partial: "PartialSamples | None" = None) -> np.ndarray:
    """Sample ``opts.n`` images with a PyTorch epsilon model (on ``device``, default the CPU; the noise is
    drawn on the CPU either way); returns uint8 NHWC.

    With ``partial``, every finished batch is kept on disk with the sampler generator's state after it, and a
    run interrupted and started again continues after the last kept batch with the same numbers."""
    sampler = make_sampler(opts.sampler, diffusion, eta=opts.eta, skip=opts.skip, clip_x0=opts.clip_x0)
    sampler.set_timesteps(opts.steps)
    x_T, g = initial_noise(opts.n, shape, opts.seed)
    out = []
    chunks = range(0, opts.n, opts.batch_size)
    bar = tqdm(chunks, desc=f"sampling {opts.n} images", disable=not progress or len(chunks) == 1)
    for i, s in enumerate(bar):
        kept = partial.load(i) if partial is not None else None
        if kept is not None:
            images, state = kept
            g.set_state(state)
            out.append(images)
            continue
        x = sample_loop(eps_model, sampler, x_T[s: s + opts.batch_size].to(device or "cpu"), g,
                        progress=progress and len(chunks) == 1, on_start=lambda: reset_state(eps_model))
        out.append(from_model_range(x.clamp(-1, 1).cpu().numpy()))
        if partial is not None:
            partial.save(i, out[-1], g.get_state())
    return np.concatenate(out)


class PartialSamples:
    """Finished sampling batches of one (checkpoint, options) pair in ``folder`` (``batch_<i>.npz``: the uint8
    images and the generator state after them). ``key`` names what they were sampled from; batches kept under
    another key are discarded, so a changed checkpoint or option never mixes into the result."""

    def __init__(self, folder: str | os.PathLike, key: dict):
        self.folder, self.key = Path(folder), json.loads(json.dumps(key))
        meta = self.folder / "key.json"
        try:
            same = json.loads(meta.read_text()) == self.key
        except (OSError, ValueError):
            same = False
        if not same:
            self.clear()
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(meta, json.dumps(self.key, indent=2))

    @classmethod
    def beside(cls, out: str | os.PathLike, key: dict) -> "PartialSamples":
        """The batches of the samples ``write_samples(..., out, ...)`` will write: ``<out>.partial/``."""
        base = Path(out)
        base = base.with_suffix("") if base.suffix.lower() in (".png", ".npz") else base
        return cls(base.parent / f"{base.name}.partial", key)

    def load(self, i: int) -> tuple[np.ndarray, torch.Tensor] | None:
        path = self.folder / f"batch_{i}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], torch.from_numpy(z["generator"].copy())
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # absent or torn: sample it again
            return None

    def save(self, i: int, images: np.ndarray, state: torch.Tensor) -> None:
        buf = io.BytesIO()
        np.savez(buf, images=images, generator=state.numpy())
        atomic_write(self.folder / f"batch_{i}.npz", buf.getvalue())

    def clear(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def write_samples(images: np.ndarray, out: str | os.PathLike, meta: dict) -> tuple[Path, Path]:
    """Write ``<out>.png`` (grid of up to 64) and ``<out>.npz`` (``arr_0`` uint8 NHWC, ADM style) + meta."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix.lower() in (".png", ".npz") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    png = save_grid(images[:64], base.with_suffix(".png"), scale=2)
    npz = base.with_suffix(".npz")
    buf = io.BytesIO()
    np.savez(buf, arr_0=images)
    atomic_write(npz, buf.getvalue())
    atomic_write(base.with_suffix(".json"), json.dumps(meta, indent=2))
    return png, npz


def sample_checkpoint(ckpt_path: str | os.PathLike, out: str | os.PathLike, opts: SampleOptions,
                      use_ema: bool = True, progress: bool = True, device: str = "cpu") -> tuple[Path, Path]:
    """Load a checkpoint, sample on ``device`` (auto | cpu | cuda[:N]), write grid + npz; returns their paths.

    Finished batches are kept in ``<out>.partial/`` until the npz is written, so an interrupted command run
    again continues where it stopped (the same images as an uninterrupted run)."""
    from ..files import file_sha256
    from .runtime import resolve_device
    from .train import load_model

    dev = resolve_device(device)
    model, spec, ckpt = load_model(ckpt_path, use_ema=use_ema)
    shape = (spec.unet.in_channels, spec.unet.resolution, spec.unet.resolution)
    partial = PartialSamples.beside(out, {"checkpoint_sha256": file_sha256(ckpt_path), "use_ema": use_ema,
                                          **opts.__dict__})
    with torch.no_grad():
        images = generate(model.to(dev), Diffusion(spec.diffusion), shape, opts, progress=progress, device=dev,
                          partial=partial)
    meta = {"checkpoint": str(ckpt_path), "step": ckpt["step"], **opts.__dict__}
    paths = write_samples(images, out, meta)
    partial.clear()
    return paths
