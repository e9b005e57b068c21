"""Arithmetic precision of a training step: ``fp32`` (exact, the papers' setting) or ``bf16`` autocast.

bf16 runs convolutions and matrix products in bfloat16 (AVX-512 BF16 on CPU, tensor cores on GPU) and keeps
weights, optimizer state, quantizer step sizes, losses and gradients' accumulation in fp32. The binarizers see
the same values (sign and LSQ levels are computed in the dtype of their input); the measured effect on the loss
curve is in docs/methods.md ("Training speed").
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device):
    """A context in which the step runs at ``precision`` on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"train.precision={precision!r}; choose one of {PRECISIONS}")
