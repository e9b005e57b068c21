"""Device choice: ``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu`` or ``cuda[:N]``."""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for ``name``; asking for CUDA where there is none is a one-line error.

    Under torchrun, ``cuda`` means this process's GPU (``LOCAL_RANK``)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}, "
                             f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); "
                             "use --device cpu or auto")
        if name == "cuda":
            index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
            return torch.device("cuda", index)
        index = int(name.split(":", 1)[1]) if name.split(":", 1)[1].isdigit() else -1
        if not 0 <= index < torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (0.."
                             f"{torch.cuda.device_count() - 1})")
        return torch.device("cuda", index)
    raise ValueError(f"--device {name!r} is not a device; choose auto, cpu, cuda or cuda:N")


def move_to_cpu(obj):
    """``obj`` (tensors inside dicts / lists / tuples) with every tensor on the CPU; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: move_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_cpu(v) for v in obj)
    return obj
