"""Memory layout of a training step's images and convolution weights: ``contiguous`` (NCHW, torch's default)
or ``channels_last`` (NHWC).

The values are the same in both layouts; only the order in memory changes, and with it which oneDNN / cuDNN
convolution kernels run and how many layout reorders surround them. Those kernels sum in another order, so a run
in one layout follows a run in the other to float rounding, not bit for bit: the layout is part of a run's
resume check, like the precision. Checkpoints are written contiguous either way and load into either layout.
Measured in docs/methods.md ("Training speed").
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "channels_last")


def to_layout(obj, layout: str):
    """``obj`` (a module, or a tensor: 4-D ones are converted) in ``layout``; modules are converted in place."""
    if layout not in LAYOUTS:
        raise ValueError(f"train.memory_format={layout!r}; choose one of {LAYOUTS}")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    if isinstance(obj, torch.nn.Module):
        return obj.to(memory_format=fmt)
    return obj.contiguous(memory_format=fmt) if obj.dim() == 4 else obj
