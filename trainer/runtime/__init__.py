"""Where and how the computation runs: device (CPU / CUDA), arithmetic precision (fp32 / bf16 autocast).

None of this changes what a model *is*: checkpoints are written with CPU tensors and load on any device,
and the random draws of training and sampling come from CPU generators, so a run's batches and a sampler's
noise are the same numbers on every device.
"""

from .device import move_to_cpu, resolve_device
from .precision import PRECISIONS, autocast

__all__ = ["PRECISIONS", "autocast", "move_to_cpu", "resolve_device"]
