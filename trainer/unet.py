"""The full-precision DDPM/DDIM pixel U-Net, built only from a :class:`UNetConfig`.

Architecture and parameter names follow pesser/pytorch_diffusion's ``Model`` (the CIFAR-10 DDPM port
used by ermongroup/ddim and BiDM), so its ``model-790000.ckpt`` loads with no renaming: ``temb.dense``,
``conv_in``, ``down.{i}.block/attn/downsample``, ``mid.block_1/attn_1/block_2``,
``up.{i}.block/attn/upsample`` (``up.0`` is the 32x32 level, applied last), ``norm_out``, ``conv_out``.

This module knows nothing about binarization: binary layers are swapped in afterwards by
``trainer.binarize`` from a config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .spec import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps: ``[sin(t*f_i), cos(t*f_i)]``, ``f_i = 1e4^(-i/(half-1))``.

    ``t`` has shape [B] (float or int); the result is float32 [B, dim]. This is the DDPM/pesser formula
    (diffusers' ``flip_sin_to_cos=False, freq_shift=1`` equivalent).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(ch: int, cfg: UNetConfig) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.num_groups, ch, eps=cfg.norm_eps, affine=True)


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv1 -> (+ temb_proj(SiLU(temb))) -> GN -> SiLU -> dropout -> conv2, plus a shortcut."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, temb: bool = True):
        super().__init__()
        self.norm1 = _norm(in_ch, cfg)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(cfg.temb_ch, out_ch) if temb else None  # None: LDM autoencoders
        self.norm2 = _norm(out_ch, cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # 1x1 "network-in-network" shortcut when the channel count changes (pesser: nin_shortcut).
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv q, k, v and output projection, plus the residual."""

    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.norm = _norm(ch, cfg)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # [B, HW, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, HW]
        v = self.v(h).reshape(b, c, hh * ww)  # [B, C, HW]
        w = torch.softmax(torch.bmm(q, k) * (c ** -0.5), dim=2)  # [B, HW_q, HW_k]
        h = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve the resolution: pad (0,1,0,1) then 3x3 stride-2 conv (or 2x2 average pooling)."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour x2 then (optionally) a 3x3 conv."""

    def __init__(self, ch: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Level(nn.Module):
    """One resolution level: its ResnetBlocks, optional attention after each, and an optional resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class TimestepEmbedding(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear (pesser: ``temb.dense.0/1``)."""

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.ch = ch
        self.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.dense[1](F.silu(self.dense[0](timestep_embedding(t, self.ch))))


class MidBlock(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, cfg)
        self.attn_1 = AttnBlock(ch, cfg)
        self.block_2 = ResnetBlock(ch, ch, cfg)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


class UNet(nn.Module):
    """epsilon-prediction U-Net: ``forward(x [B,C,H,W] in [-1,1], t [B]) -> eps [B,C_out,H,W]``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, mult = cfg.ch, cfg.ch_mult
        in_mult = (1,) + tuple(mult)
        self.temb = TimestepEmbedding(ch, cfg.temb_ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        res = cfg.resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i, m in enumerate(mult):
            level = Level()
            block_in, block_out = ch * in_mult[i], ch * m
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, cfg))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != len(mult) - 1:
                level.downsample = Downsample(block_in, cfg.resamp_with_conv)
                res //= 2
            self.down.append(level)

        self.mid = MidBlock(block_in, cfg)

        up_levels: list[Level] = []
        for i in reversed(range(len(mult))):
            level = Level()
            block_out = ch * mult[i]
            for j in range(cfg.num_res_blocks + 1):
                skip_in = ch * (in_mult[i] if j == cfg.num_res_blocks else mult[i])
                level.block.append(ResnetBlock(block_in + skip_in, block_out, cfg))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, cfg))
            if i != 0:
                level.upsample = Upsample(block_in, cfg.resamp_with_conv)
                res *= 2
            up_levels.insert(0, level)  # up[0] is the full-resolution level, applied last
        self.up = nn.ModuleList(up_levels)

        self.norm_out = _norm(block_in, cfg)
        self.conv_out = nn.Conv2d(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.cfg.in_channels, self.cfg.resolution, self.cfg.resolution):
            raise ValueError(f"UNet expects input [B, {self.cfg.in_channels}, {self.cfg.resolution}, "
                             f"{self.cfg.resolution}], got {list(x.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.temb(t)
        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid(hs[-1], temb)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
