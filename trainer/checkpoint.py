"""Versioned, atomic checkpoints that carry their own spec, readable without unpickling code.

A checkpoint is one ``torch.save`` file holding only tensors and plain containers, loaded with
``torch.load(weights_only=True)``::

    {"format": "bdmtool-checkpoint", "format_version": 1, "kind": "fp" | "binary",
     "spec": TrainSpec.to_dict(), "step": int,
     "model": state_dict, "ema": state_dict | None,        # weights
     "optimizer": state_dict | None, "rng": {...} | None,  # only in resumable training state
     "distill": {"sites": [...], "proj": [tensors]} | None}  # fixed LRM projections (BinaryDM)

Two files per run: ``state.ckpt`` (everything, for exact resume) and ``model.ckpt`` (EMA weights and
spec only: what ``sample`` and ``export`` read). Writes go to a temporary file in the same folder,
are fsync-ed, then renamed over the target, so a kill never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .spec import TrainSpec

FORMAT = "bdmtool-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable bdmtool checkpoint; the message says why and what to do."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def make_checkpoint(spec: TrainSpec, step: int, model: dict, ema: dict | None = None,
                    optimizer: dict | None = None, rng: dict | None = None, kind: str = "fp",
                    distill: dict | None = None) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "spec": spec.to_dict(),
            "step": int(step), "model": model, "ema": ema, "optimizer": optimizer, "rng": rng, "distill": distill}


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load and check a bdmtool checkpoint (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} is not a readable bdmtool checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "To use original pytorch_diffusion or diffusers weights, run `bdmtool import` first.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bdmtool checkpoint (no format={FORMAT!r} field); "
                              "convert foreign weights with `bdmtool import`")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {version}; this bdmtool reads "
                              f"version {FORMAT_VERSION}. Upgrade bdmtool or re-export the checkpoint.")
    return ckpt


def read_spec(path: str | os.PathLike) -> TrainSpec:
    """The spec stored in a checkpoint file."""
    return checkpoint_spec(load_checkpoint(path))


def checkpoint_spec(ckpt: dict) -> TrainSpec:
    return TrainSpec.from_dict(ckpt["spec"])


def inference_weights(ckpt: dict, use_ema: bool = True) -> dict:
    """The weights to sample or export from: the EMA copy when present and wanted, else the raw model."""
    if use_ema and ckpt.get("ema") is not None:
        return ckpt["ema"]
    if not use_ema and ckpt.get("ema") is None and ckpt.get("optimizer") is None:
        raise CheckpointError("this checkpoint holds one set of weights (a run's model.ckpt is its EMA copy); "
                              "the raw weights are in the run's state.ckpt: sample that with --no-ema")
    return unpack_weights(ckpt)


# Packed inference checkpoints: a binary layer's latent weights matter only through sign(W) and the
# per-output-channel mean |W| (every weight binarizer's scale is that, a learned sigma, or a per-tensor mean
# of equal-sized channels), so `pack_weights` stores them as bits + one float per output channel.


def pack_weights(ckpt: dict, names: list[str]) -> dict:
    """A copy of an inference checkpoint whose tensors ``names`` are stored as packed sign bits + per-row
    mean |W| (``ckpt["packed"]``); ``load_checkpoint`` callers get them back through ``unpack_weights``."""
    import numpy as np

    weights = dict(ckpt["model"])
    packed = {}
    for n in names:
        w = weights.pop(n).float()
        rows = w.reshape(w.shape[0], -1)
        bits = np.packbits((rows >= 0).numpy().astype(np.uint8), axis=None)
        packed[n] = {"bits": torch.from_numpy(bits), "shape": torch.tensor(list(w.shape)),
                     "scale": rows.abs().mean(dim=1)}
    return {**ckpt, "model": weights, "ema": None, "optimizer": None, "rng": None, "packed": packed}


def unpack_weights(ckpt: dict) -> dict:
    """The state dict of ``ckpt["model"]``, with packed binary weights restored as sign * mean|W| per row."""
    import numpy as np

    weights = dict(ckpt["model"])
    for n, p in (ckpt.get("packed") or {}).items():
        shape = [int(v) for v in p["shape"]]
        count = int(np.prod(shape))
        bits = np.unpackbits(p["bits"].numpy(), count=count).astype(np.float32) * 2 - 1
        rows = torch.from_numpy(bits).reshape(shape[0], -1) * p["scale"].float()[:, None]
        weights[n] = rows.reshape(shape)
    return weights
