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

import io
import os
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write
from .spec import TrainSpec

FORMAT = "bdmtool-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """The file is not a readable bdmtool checkpoint; the message says why and what to do."""


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then written to a temp file beside ``path``, fsync-ed and renamed over it
    (atomic on POSIX). Serialising first keeps torch's writer away from the disk: a full disk raises a plain
    OSError naming the file (torch's own writer turns it into 'unexpected pos' RuntimeErrors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return Path(atomic_write(path, buf.getbuffer()))


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
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted copy? Copy or re-create the checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} is not a readable bdmtool checkpoint ({_first_line(e)}); it is truncated, damaged or holds "
            "Python objects, which bdmtool never unpickles. For pytorch_diffusion or diffusers weights run "
            "`bdmtool import` first") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bdmtool checkpoint (no format={FORMAT!r} field); "
                              "convert foreign weights with `bdmtool import`")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {version}; this bdmtool reads "
                              f"version {FORMAT_VERSION}. Upgrade bdmtool or re-export the checkpoint.")
    _check_contents(ckpt, path)
    return ckpt


def _first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (torch's load errors are long and advise unsafe options: cut them
    before any 'weights_only=False' advice)."""
    text = next((ln for ln in str(e).splitlines() if ln.strip()), "")
    text = text.split("WeightsUnpickler error:")[-1].strip()
    if "weights_only" in text:
        text = "the file holds objects that are not plain tensors"
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _check_contents(ckpt: dict, path: Path) -> None:
    """The spec parses and validates, and every weight is a finite tensor (NaN weights sample black images)."""
    from .config import ConfigError

    try:
        TrainSpec.from_dict(ckpt.get("spec"))
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} carries an invalid spec ({e}); it was not written by this bdmtool's "
                              "`train`/`import`: re-create it") from None
    sections = [("model", ckpt.get("model")), ("ema", ckpt.get("ema"))]
    sections += [(f"packed.{n}", {"scale": p.get("scale")} if isinstance(p, dict) else p)
                 for n, p in (ckpt.get("packed") or {}).items()]
    for section, weights in sections:
        if weights is None and section == "ema":
            continue
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{path}: its {section!r} entry is not a dict of tensors; the file is damaged or "
                                  "not from bdmtool: re-create it")
        for name, v in weights.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{path}: weight {name} holds non-finite values (NaN/inf), so every sample would "
                                      "be blank; use an earlier checkpoint or retrain with a lower train.lr")


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
