"""Device choice: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu`` or ``cuda[:N]``."""

from __future__ import annotations

import os

import torch

from . import parse_device


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for ``name`` (see :func:`parse_device`); asking for CUDA where there is none is a one-line
    error. Under torchrun, ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    parsed = parse_device(name)
    if parsed is None:
        raise ValueError(f"--device {name!r} is not a device; choose auto, cpu, cuda or cuda:N")
    kind, index = parsed
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                         f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); "
                         "use --device cpu or auto")
    count = torch.cuda.device_count()
    if index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % count)
    if index >= count:
        raise ValueError(f"--device {name}: there are {count} CUDA devices (0..{count - 1})")
    return torch.device("cuda", index)


def move_to_cpu(obj):
    """``obj`` (tensors inside dicts / lists / tuples) with every tensor on the CPU and contiguous (a
    channels-last run writes the same files as any other); other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu().contiguous()
    if isinstance(obj, dict):
        return {k: move_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_cpu(v) for v in obj)
    return obj
