"""``bdmtool eval``: samples from a checkpoint, a ``.tflite`` or files -> FID / sFID / precision / recall JSON.

Sources: a bdmtool checkpoint (sampled on the fly), an exported ``.tflite`` (sampled through the LCE
interpreter, TBS caches included), or existing samples (``.npz`` with ``arr_0``, or an image folder).
The reference is any dataset the loaders read (``mnist5k``, ``digits``, ``cifar10:DIR``, ``folder:DIR``,
``npz:FILE``) at the samples' resolution and channels; its statistics are cached on disk.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from bdmtool.files import atomic_write


def cache_dir() -> Path:
    return Path(os.environ.get("BDMTOOL_CACHE", Path.home() / ".cache" / "bdmtool")) / "fid"


def _default_reference(source: Path) -> str:
    if source.suffix == ".ckpt":
        from bdmtool.trainer.checkpoint import read_spec

        d = read_spec(source).data
        return d.source + (f":{d.path}" if d.path else "")
    return "mnist5k"


REFERENCE_SOURCES = ("mnist5k", "digits", "cifar10", "folder", "npz")


def reference_resolutions(spec: dict) -> tuple[int, ...]:
    """The sizes a reference dataset is scored at without resampling it: MNIST 28 (raw) or 32 (padded, as
    bdmtool trains on it), the digits 8 (raw) or 32 (as bdmtool trains on them), CIFAR-10 32, and the stored
    size of npz files and image folders."""
    from bdmtool.trainer.data import DataError, IMAGE_EXTS, load_npz

    if spec["source"] == "npz":
        return (int(load_npz(spec["path"]).shape[1]),)
    if spec["source"] == "folder":
        from PIL import Image

        root = Path(spec.get("path", ""))
        first = next((p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_EXTS), None) \
            if root.is_dir() else None
        if first is None:
            raise DataError(f"no images found under {str(root)!r}; pass --data folder:/path/to/images")
        with Image.open(first) as im:
            return (min(im.size),)
    return {"mnist5k": (28, 32), "digits": (8, 32)}.get(spec["source"], (32,))


def load_samples(source: Path, opts, out: Path, log, device: str = "cpu") -> tuple[np.ndarray, dict]:
    from bdmtool.trainer.data import load_folder, load_npz

    if source.is_dir():
        from PIL import Image

        first = next((p for p in sorted(source.rglob("*")) if p.suffix.lower() in (".png", ".jpg", ".jpeg")), None)
        if first is None:
            raise ValueError(f"{source} holds no .png/.jpg samples")
        with Image.open(first) as im:
            size, channels = im.size[0], 1 if im.mode in ("L", "1", "I;16") else 3
        return load_folder(str(source), size, channels), {"source": str(source), "kind": "folder"}
    if source.suffix == ".npz":
        return load_npz(str(source)), {"source": str(source), "kind": "npz"}
    if source.suffix == ".ckpt":
        from bdmtool.trainer.sampling import sample_checkpoint

        t0 = time.perf_counter()
        _, npz = sample_checkpoint(source, out / "samples", opts, device=device)
        log(f"[eval] sampled {opts.n} images from {source.name} in {time.perf_counter() - t0:.0f} s")
        return load_npz(str(npz)), {"source": str(source), "kind": "checkpoint"}
    if source.suffix == ".tflite":
        from bdmtool.tools.sample_tflite import sample_tflite

        t0 = time.perf_counter()
        _, npz = sample_tflite(source, out / "samples", opts)
        log(f"[eval] sampled {opts.n} images from {source.name} (LCE interpreter) in {time.perf_counter() - t0:.0f} s")
        return load_npz(str(npz)), {"source": str(source), "kind": "tflite"}
    raise ValueError(f"{source}: evaluate a .ckpt, a .tflite, an .npz of samples or an image folder")


def evaluate(source: str | Path, out: str | Path, opts, reference: str | None = None, ref_limit: int | None = None,
             with_kid: bool = False, inception_is_weights: str | None = None, log=print, device: str = "cpu") -> dict:
    from bdmtool.trainer import fid
    from bdmtool.trainer.data import load_images, parse_data_arg, save_grid
    from bdmtool.trainer.spec import DataConfig

    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if inception_is_weights:
        raise ValueError("--inception-is-weights: the Inception Score head is not implemented in this build; "
                         "IS is reported as unavailable instead of a substitute number")
    if ref_limit is not None and ref_limit < 2:
        raise ValueError(f"--ref-limit must be >= 2 reference images (or omitted for all), got {ref_limit}")
    if source.suffix in (".ckpt", ".tflite") and opts.n < 2:
        raise ValueError(f"--n must be >= 2 (FID needs at least 2 samples), got {opts.n}")
    ref_arg = reference or _default_reference(source)
    spec = parse_data_arg(ref_arg)
    if spec["source"] not in REFERENCE_SOURCES:
        raise ValueError(f"--ref {ref_arg!r}: unknown reference; use one of mnist5k, digits, cifar10:DIR, "
                         "folder:DIR, npz:FILE")
    out.mkdir(parents=True, exist_ok=True)
    samples, src_meta = load_samples(source, opts, out, log, device=device)
    _, h, w, c = samples.shape
    if len(samples) < 2:
        raise ValueError(f"{source} holds {len(samples)} sample; FID needs at least 2 samples")
    try:
        native = reference_resolutions(spec)
        dcfg = DataConfig.from_dict({**spec, "resolution": h, "channels": c, "limit": ref_limit or 0})
        ref_images = load_images(dcfg)
    except ValueError as e:
        raise type(e)(f"--ref {ref_arg}: {str(e).replace('--data', '--ref')}") from None
    own_data = reference is None and source.suffix == ".ckpt"  # the training set, at the training resolution
    if h not in native and not own_data:
        sizes = " or ".join(f"{s}x{s}" for s in native)
        raise ValueError(f"the samples are {h}x{w} but the reference {ref_arg} is {sizes}: FID across "
                         "sizes compares resized images, not models. Sample at the reference's size or pass a "
                         f"--ref at {h}x{w} (npz:FILE or folder:DIR)")
    desc = {"reference": ref_arg, "resolution": h, "channels": c, "limit": ref_limit or 0}
    t0 = time.perf_counter()
    ref = fid.reference_stats(ref_images, desc, cache_dir())
    log(f"[eval] reference {ref_arg}: {ref.n} images ({time.perf_counter() - t0:.0f} s; cache key {ref.key})")
    t0 = time.perf_counter()
    metrics = fid.compare(samples, ref, with_kid=with_kid)
    metrics.update(sample_source=src_meta, reference=desc, eval_seconds=round(time.perf_counter() - t0, 1))
    if src_meta["kind"] in ("checkpoint", "tflite"):
        metrics["sampling"] = {k: getattr(opts, k) for k in ("n", "steps", "eta", "sampler", "skip", "seed", "clip_x0")}
    save_grid(samples[:64], out / "grid.png", scale=2)
    atomic_write(out / "metrics.json", json.dumps(metrics, indent=2))
    log(f"[eval] FID {metrics['fid']:.2f}  sFID {metrics['sfid']:.2f}  precision {metrics['precision']:.3f}  "
        f"recall {metrics['recall']:.3f}  ({len(samples)} samples vs {ref.n} reference) -> {out / 'metrics.json'}")
    return metrics
