"""Size / BOPs / OPs accountant (BinaryDM appendix B.1, Eq. 16-17; Bi-Real / ReActNet convention).

Per convolution or linear layer (output w x h, m in- and n out-channels, kernel k)::

    MACs = w h m n k^2            BOPs = MACs * b_w * b_a  (quantized layers)     FLOPs = MACs (FP layers)
    OPs  = BOPs / 64 + FLOPs

A MAC counts as one FLOP: that is the convention that gives the papers' FP figures (LDM-4: 96.0 G).
Size: quantized weights at ``b_w`` bits; everything else (FP layers, biases, norms) at 32 bits; per-channel
scales optionally (``count_scales``); MB = MiB (the papers' FP LDM-4 1045.4 MB is 274,056,163 x 4 B / 2^20). Which layers stay FP is the method's pattern list (BinaryDM/BiDM
official code: time embedding MLP, first and last conv; BiDM also the ResBlock shortcuts).

Options where the papers' counting is not stated (``OpsConvention``): attention matmuls (QK^T, AV)
counted as FP FLOPs or not (the papers' FP totals exclude them), FP elementwise work (norm + activation
per norm output, the per-channel scale of each quantized output, softmax) counted or not.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .config import Config, check
from .binarize import _matches
from .layers import LayerShape, layer_shapes
from ..files import atomic_savefig, atomic_write

MIB = 1024 * 1024

# Layers the official code keeps FP on the LDM U-Net (papers_impl section 3): bnn_modules[0,1,2,-1] for
# BinaryDM; BiDM also turns every ResBlock skip_connection back into a plain conv.
LDM_FP_PATTERNS = {
    "binarydm": ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2"),
    "bidm": ("time_embed.0", "time_embed.2", "input_blocks.0.0", "out.2", "*.skip_connection"),
}


@dataclasses.dataclass(frozen=True)
class OpsConvention(Config):
    attention_matmuls: bool = False  # count QK^T and AV MACs as FP FLOPs
    elementwise: bool = False  # count norm+activation, quantized-output scale and softmax elements as FLOPs
    count_scales: bool = False  # per-output-channel scales of quantized layers in the size (32 bit each)


@dataclass
class LayerCount:
    name: str
    block: str
    params: int  # weights (biases are counted with the other 32-bit parameters)
    bits: int  # weight bits (32 = FP)
    abits: int
    macs: int
    size_bytes: float
    bops: int
    flops: int

    @property
    def ops(self) -> float:
        return self.bops / 64 + self.flops


def _block(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("input_blocks", "output_blocks", "down", "up") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


def _register_extra(model: nn.Module, counts: list[int]) -> list:
    """Hooks that add [norm output elements, softmax elements, attention-matmul MACs] of a forward pass to
    ``counts``; returns the handles (the caller removes them)."""
    from .ldm_unet import AttentionBlock, CrossAttention
    from .unet import AttnBlock

    def norm_hook(mod, inp, out):
        counts[0] += out.numel()

    def attn_hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, CrossAttention):
            ctx = inp[1] if len(inp) > 1 and inp[1] is not None else x
            n, m, inner = x.shape[1], ctx.shape[1], mod.to_q.out_features
            counts[1] += mod.heads * n * m
            counts[2] += 2 * n * m * inner
        else:
            c, t = x.shape[1], x[0, 0].numel()
            counts[1] += getattr(mod, "heads", 1) * t * t
            counts[2] += 2 * t * t * c

    handles = []
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
            handles.append(m.register_forward_hook(norm_hook))
        elif isinstance(m, (AttentionBlock, AttnBlock, CrossAttention)):
            handles.append(m.register_forward_hook(attn_hook))
    return handles


def count(model: nn.Module, inputs: tuple, wbits: int = 32, abits: int = 32, fp_patterns: tuple[str, ...] = (),
          conv: OpsConvention = OpsConvention()) -> dict:
    """Per-layer and total size / MACs / BOPs / FLOPs / OPs of ``model`` at ``wbits``/``abits``."""
    check(wbits in (1, 2, 4, 8, 32) and abits in (1, 2, 4, 8, 32), "bits must be one of 1, 2, 4, 8, 32")
    counts = [0, 0, 0]  # norm elements, softmax elements, attention-matmul MACs: same forward as the shapes
    extra_handles = _register_extra(model, counts) if conv.elementwise or conv.attention_matmuls else []
    try:
        shapes: list[LayerShape] = layer_shapes(model, *inputs)
    finally:
        for h in extra_handles:
            h.remove()
    quantized = wbits < 32 or abits < 32
    rows = []
    for s in shapes:
        oh, ow = s.out_hw
        macs = oh * ow * s.cin * s.cout * s.k * s.k * s.tokens
        weights = s.cin * s.cout * s.k * s.k
        fp = not quantized or _matches(s.name, fp_patterns)  # binarize_'s rule: '*' crosses dots
        bits = 32 if fp else wbits
        size = weights * bits / 8 + (s.cout * 4 if conv.count_scales and not fp else 0)
        rows.append(LayerCount(s.name, _block(s.name), weights, bits, 32 if fp else abits, macs, size,
                               0 if fp else macs * wbits * abits, macs if fp else 0))
    all_params = sum(p.numel() for p in model.parameters())
    other_params = all_params - sum(r.params for r in rows)  # biases, norms, ...: 32 bit
    size = sum(r.size_bytes for r in rows) + other_params * 4
    extra = {"norm_elements": 0, "softmax_elements": 0, "attention_matmul_macs": 0}
    extra_flops = 0
    if conv.elementwise or conv.attention_matmuls:
        ne, se, am = counts
        extra = {"norm_elements": ne, "softmax_elements": se, "attention_matmul_macs": am}
        if conv.attention_matmuls:
            extra_flops += am
        if conv.elementwise:
            q_out = sum(s.out_hw[0] * s.out_hw[1] * s.cout * s.tokens for s, r in zip(shapes, rows) if r.bits < 32)
            extra_flops += 2 * ne + se + q_out
    total_bops = sum(r.bops for r in rows)
    total_flops = sum(r.flops for r in rows) + extra_flops
    return {"wbits": wbits, "abits": abits, "convention": conv.to_dict(), "fp_patterns": list(fp_patterns),
            "params": all_params, "other_params_32bit": other_params, "size_mib": size / MIB,
            "macs": sum(r.macs for r in rows), "bops": total_bops, "flops": total_flops,
            "ops": total_bops / 64 + total_flops, "extra": extra, "extra_flops": extra_flops,
            "layers": [dataclasses.asdict(r) | {"ops": r.ops} for r in rows]}


def by_block(result: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in result["layers"]:
        b = out.setdefault(r["block"], {"bin_bytes": 0.0, "fp_bytes": 0.0, "bin_ops": 0.0, "fp_ops": 0.0})
        key = "bin" if r["bits"] < 32 else "fp"
        b[f"{key}_bytes"] += r["size_bytes"]
        b[f"{key}_ops"] += r["ops"]
    return out


def format_table(result: dict, per_layer: bool = False) -> str:
    lines = []
    if per_layer:
        lines += [f"{'layer':44s} {'W/A':>7s} {'params':>11s} {'KiB':>10s} {'MMACs':>10s} {'MOPs':>10s}"]
        for r in result["layers"]:
            lines.append(f"{r['name']:44s} {r['bits']:>3d}/{r['abits']:<3d} {r['params']:>11,d} "
                         f"{r['size_bytes'] / 1024:>10.1f} {r['macs'] / 1e6:>10.2f} {r['ops'] / 1e6:>10.2f}")
        lines.append("")
    lines += [f"W{result['wbits']}A{result['abits']}: params {result['params']:,}  size {result['size_mib']:.1f} MB (MiB)  "
              f"MACs {result['macs'] / 1e9:.2f} G  BOPs {result['bops'] / 1e9:.2f} G  FLOPs {result['flops'] / 1e9:.3f} G  "
              f"OPs {result['ops'] / 1e9:.2f} G"]
    return "\n".join(lines)


def plot_blocks(result: dict, path: str | Path) -> Path:
    """Stacked bars per block: binary vs FP share of bytes and of OPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks = by_block(result)
    names = list(blocks)
    x = np.arange(len(names))
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 0.35 * len(names) + 2), 6), sharex=True)
    for ax, unit, scale, label in ((axes[0], "bytes", MIB, "size (MiB)"), (axes[1], "ops", 1e9, "OPs (G)")):
        fp = np.array([blocks[n][f"fp_{unit}"] for n in names]) / scale
        bn = np.array([blocks[n][f"bin_{unit}"] for n in names]) / scale
        ax.bar(x, bn, color="#1f77b4", label="quantized/binary")
        ax.bar(x, fp, bottom=bn, color="#8c8c8c", label="full precision")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[1].set_xticks(x, names, rotation=70, ha="right", fontsize=7)
    axes[0].set_title(f"W{result['wbits']}A{result['abits']}: {result['size_mib']:.1f} MiB, "
                      f"{result['ops'] / 1e9:.2f} GOPs", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, json.dumps(result, indent=2))
    return path
