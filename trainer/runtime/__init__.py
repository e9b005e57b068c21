"""Where and how the computation runs: device (CPU / CUDA), arithmetic precision (fp32 / bf16 autocast),
memory layout (NCHW / channels-last), and how many threads (``threads``: the CLI's choice next to other busy
processes; imports no torch).

None of this changes what a model *is*: checkpoints are written with CPU tensors and load on any device,
and the random draws of training and sampling come from CPU generators, so a run's batches and a sampler's
noise are the same numbers on every device.
"""

_LAZY = {"move_to_cpu": "device", "resolve_device": "device", "autocast": "precision", "PRECISIONS": "precision",
         "to_layout": "layout", "LAYOUTS": "layout"}


def parse_device(name: str) -> tuple[str, int | None] | None:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` as (kind, index or None); None when ``name`` is none of them.
    Torch-free, so configs validate device names without loading torch."""
    name = (name or "auto").strip().lower()
    if name in ("auto", "cpu", "cuda"):
        return name, None
    kind, _, index = name.partition(":")
    return (kind, int(index)) if kind == "cuda" and index.isdigit() else None


def has_cxx_compiler() -> bool:
    """A C++ compiler on PATH (what ``torch.compile``'s CPU backend, i.e. ``train.kernels=compiled``, needs)."""
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def __getattr__(name: str):  # torch loads only when device/precision is used (threads must run before it)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = [*_LAZY, "has_cxx_compiler", "parse_device"]
