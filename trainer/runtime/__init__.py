"""Where and how the computation runs: device (CPU / CUDA), arithmetic precision (fp32 / bf16 autocast),
and how many threads (``threads``: the CLI's choice next to other busy processes; imports no torch).

None of this changes what a model *is*: checkpoints are written with CPU tensors and load on any device,
and the random draws of training and sampling come from CPU generators, so a run's batches and a sampler's
noise are the same numbers on every device.
"""

_LAZY = {"move_to_cpu": "device", "resolve_device": "device", "DEVICE_CHOICES": "device", "autocast": "precision",
         "PRECISIONS": "precision"}


def __getattr__(name: str):  # torch loads only when device/precision is used (threads must run before it)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = list(_LAZY)
