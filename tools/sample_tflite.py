"""``bdmtool sample --tflite``: the DDIM loop over an exported model in the LCE interpreter.

Uses the same initial noise as ``bdmtool sample`` for the same seed (so the grids are comparable) and
the sidecar's schedule; one image at a time (exported models have batch 1), resetting the BiDM cache
at the start of each image's run. Images are independent, so chunks of them run in ``workers``
processes (LCE's fast x86 bconv kernel is single-threaded); with eta > 0 each image draws its step noise
from its own generator (seeded by ``seed`` and its index), so the result does not depend on ``workers``.
Finished chunks are kept in ``<out>.partial/`` (keyed by the file's sha256 and the options) until the npz is
written, so an interrupted run (an N = 1,000 evaluation through the x86 bit-plane kernels takes hours) continues
where it stopped with the same images.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bdmtool.exporter.inspect_tflite import inspect_file
from bdmtool.exporter.runtime import check_sidecar_matches
from bdmtool.files import read_json

CHUNK = 8


@lru_cache(maxsize=2)
def _denoiser(tflite: str, threads: int):
    """One interpreter per (model, process): chunks of the same run reuse it (state is reset per image)."""
    from bdmtool.exporter.runtime import TFLiteDenoiser

    return TFLiteDenoiser.from_file(tflite, threads=threads)


def _sample_range(tflite: str, start: int, stop: int, opts, threads: int = 1) -> np.ndarray:
    import bdmtool  # noqa: F401  (TF_USE_LEGACY_KERAS in a spawned worker)
    from bdmtool.trainer.data import from_model_range
    from bdmtool.trainer.diffusion import Diffusion
    from bdmtool.trainer.sampling import initial_noise
    from bdmtool.trainer.samplers import make_sampler, sample_loop
    from bdmtool.trainer.spec import DiffusionConfig

    den = _denoiser(tflite, threads)
    side = read_json(Path(tflite).with_suffix(".json"), "sidecar written by `bdmtool export`")
    sch = side["schedule"]
    diffusion = Diffusion(DiffusionConfig(schedule=sch["name"], beta_start=sch["beta_start"],
                                          beta_end=sch["beta_end"], timesteps=sch["timesteps"]))
    _, h, w, c = side["inputs"][0]["shape"]
    sampler = make_sampler(opts.sampler, diffusion, eta=opts.eta, skip=opts.skip, clip_x0=opts.clip_x0)
    sampler.set_timesteps(opts.steps)
    x_T, _ = initial_noise(opts.n, (c, h, w), opts.seed)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = den.step(x.numpy().transpose(0, 2, 3, 1), float(t[0]))
        return torch.from_numpy(np.ascontiguousarray(e.transpose(0, 3, 1, 2)))

    images = []
    for i in range(start, stop):
        g = torch.Generator().manual_seed(opts.seed * 1_000_003 + i)
        x = sample_loop(eps_fn, sampler, x_T[i:i + 1], g, on_start=den.reset)
        images.append(from_model_range(x.clamp(-1, 1).numpy()))
    return np.concatenate(images)


def default_workers() -> int:
    """One single-threaded interpreter process per core this command may use: the thread count the CLI chose
    (``OMP_NUM_THREADS``, set from BDMTOOL_THREADS or the cores other processes leave idle), else the CPU
    affinity's cores (`taskset -c 1` means one)."""
    from bdmtool.trainer.runtime.threads import allowed_cpus

    n = os.environ.get("OMP_NUM_THREADS", "")
    return int(n) if n.isdigit() and int(n) > 0 else len(allowed_cpus())


def sample_tflite(tflite: str | Path, out: str | Path, opts, threads: int = 1,
                  workers: int | None = None) -> tuple[Path, Path]:
    from bdmtool.files import file_sha256
    from bdmtool.trainer.sampling import PartialSamples, write_samples

    tflite = Path(tflite)
    side_path = tflite.with_suffix(".json")
    if not side_path.exists():
        raise FileNotFoundError(f"{side_path} (the sidecar written by `bdmtool export`) is needed to run {tflite.name}")
    side = read_json(side_path, "sidecar written by `bdmtool export`")
    inspect_file(tflite)  # a damaged file fails here, in one line, before any worker starts; named as damage,
    check_sidecar_matches(tflite, side, side_path)  # not as the sidecar mismatch a damaged copy also has
    sha = side.get("model_sha256") or file_sha256(tflite)  # the sidecar's was just checked against the file
    partial = PartialSamples.beside(out, {"tflite_sha256": sha, "chunk": CHUNK, **opts.__dict__})
    chunks = [(s, min(s + CHUNK, opts.n)) for s in range(0, opts.n, CHUNK)]
    parts: dict[int, np.ndarray] = {}
    for s, _ in chunks:
        if (kept := partial.load(s)) is not None:
            parts[s] = kept[0]
    todo = [(s, e) for s, e in chunks if s not in parts]
    workers = max(1, min(workers or default_workers(), len(todo) or 1))
    bar = tqdm(total=opts.n, initial=opts.n - sum(e - s for s, e in todo), unit="img",
               desc=f"sampling {tflite.name} ({workers} process{'es' if workers > 1 else ''})")

    def done(s: int, images: np.ndarray) -> None:
        parts[s] = images
        partial.save(s, images, torch.zeros(0, dtype=torch.uint8))  # images are independent: no generator state
        bar.update(len(images))

    if workers == 1:
        for s, e in todo:
            done(s, _sample_range(str(tflite), s, e, opts, threads))
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futs = {pool.submit(_sample_range, str(tflite), s, e, opts, threads): s for s, e in todo}
            for f in as_completed(futs):
                done(futs[f], f.result())
    bar.close()
    images = np.concatenate([parts[s] for s, _ in chunks])
    meta = {"tflite": str(tflite), "method": side["method"], "bits": side["bits"], "workers": workers,
            **opts.__dict__}
    paths = write_samples(images, out, meta)
    partial.clear()
    return paths
