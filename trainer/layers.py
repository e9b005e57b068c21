"""Every convolution / linear layer of a network with the shape it sees in one forward pass.

``layer_shapes(model, x, t) -> list[LayerShape]`` runs one batch-1 forward with hooks and records, per
layer, the input spatial size (after any explicit padding), channels, kernel, stride, padding and whether
the layer is binarized. Linear layers are 1x1 convolutions on a 1x1 map (the exporter builds them so).
Used by the per-convolution micro-models (android_bench) and the size/OPs accountant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerShape:
    name: str
    h: int  # input height seen by the kernel (padding excluded)
    w: int
    cin: int
    cout: int
    k: int
    stride: int
    padding: int
    binary: bool
    abits: int = 32
    tokens: int = 1  # a Linear applied to L tokens (LDM attention) counts L positions

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h + 2 * self.padding - self.k) // self.stride + 1,
                (self.w + 2 * self.padding - self.k) // self.stride + 1)

    @property
    def shape_key(self) -> tuple:
        return (self.h, self.w, self.cin, self.cout, self.k, self.stride, self.padding)

    def to_dict(self) -> dict:
        return asdict(self)


def layer_shapes(model: nn.Module, *inputs: torch.Tensor) -> list[LayerShape]:
    from .binarize import BinaryConv2d

    records: list[LayerShape] = []
    hooks = []
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, BinaryConv2d):
            skip.update(id(c) for c in m.modules() if c is not m)  # its k_conv / shortcut are accounted by it

    def hook_for(name: str, m: nn.Module):
        def hook(mod, args):
            x = args[0]
            if isinstance(mod, BinaryConv2d):
                k, s, p, cin, cout = mod.kernel_size, mod.stride, mod.padding, mod.in_channels, mod.out_channels
                binary, abits = bool(mod.active), mod.cfg.abits
            elif isinstance(mod, (nn.Conv2d, nn.Conv1d)):
                k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
                cin, cout, binary, abits = mod.in_channels, mod.out_channels, False, 32
            else:
                k, s, p, cin, cout, binary, abits = 1, 1, 0, mod.in_features, mod.out_features, False, 32
            linear = isinstance(mod, nn.Linear) or (isinstance(mod, BinaryConv2d) and mod.is_linear)
            if isinstance(mod, nn.Conv1d):  # a 1x1 Conv1d over L positions = a 1x1 conv on an L x 1 map
                h, w = x.shape[-1], 1
            else:
                h, w = (1, 1) if linear else (x.shape[-2], x.shape[-1])
            tokens = int(x[0].numel() // x.shape[-1]) if linear else 1
            records.append(LayerShape(name, int(h), int(w), int(cin), int(cout), int(k), int(s), int(p),
                                      binary, int(abits), tokens))
        return hook

    for name, m in model.named_modules():
        if id(m) in skip:
            continue
        if isinstance(m, (BinaryConv2d, nn.Conv2d, nn.Conv1d, nn.Linear)):
            hooks.append(m.register_forward_pre_hook(hook_for(name, m)))
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return records


def unet_example_inputs(unet_cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch-1 (x, t) for the pixel U-Net of ``unet_cfg`` (shapes are all the walkers need)."""
    return torch.zeros(1, unet_cfg.in_channels, unet_cfg.resolution, unet_cfg.resolution), torch.tensor([500.0])


def unet_layer_shapes(model: nn.Module, unet_cfg) -> list[LayerShape]:
    return layer_shapes(model, *unet_example_inputs(unet_cfg))
