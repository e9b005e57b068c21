"""LDM's first-stage autoencoders (``ldm.models.autoencoder.VQModel`` / ``AutoencoderKL``), for accounting.

Encoder/decoder as ``ldm.modules.diffusionmodules.model`` (the pesser block structure without a time
embedding: ``conv_in``, ``down.i.block.j``, ``down.i.downsample``, ``mid.{block_1,attn_1,block_2}``,
``norm_out``, ``conv_out``; the decoder's ``up.i`` in the same reversed order), plus ``quant_conv``,
``post_quant_conv`` and, for VQ, the codebook ``quantize.embedding``. Presets: ``vq-f4`` (LDM-4's
first stage: encoder 22.34 M, decoder 32.96 M parameters) and ``kl-f8``. The blocks are ``unet.py``'s.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from .config import Config
from .unet import AttnBlock, Downsample, Level, ResnetBlock, Upsample, _norm


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig(Config):
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    z_channels: int = 3
    double_z: bool = False
    embed_dim: int = 3
    n_embed: int = 8192  # 0: KL autoencoder (no codebook)

    PRESETS: ClassVar[dict[str, dict]] = {
        "vq-f4": {},  # models/first_stage_models/vq-f4/config.yaml
        "kl-f8": {"ch_mult": (1, 2, 4, 4), "z_channels": 4, "embed_dim": 4, "double_z": True, "n_embed": 0},
    }

    @classmethod
    def from_name(cls, name: str) -> "AutoencoderConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls.from_dict(cls.PRESETS[name])


_BLOCK_CFG = SimpleNamespace(num_groups=32, norm_eps=1e-6, dropout=0.0, temb_ch=0)


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        mults, res, block_in = (1, *c.ch_mult), c.resolution, c.ch
        self.down = nn.ModuleList()
        for i, m in enumerate(c.ch_mult):
            level, block_in = Level(), c.ch * mults[i]
            for _ in range(c.num_res_blocks):
                level.block.append(ResnetBlock(block_in, c.ch * m, _BLOCK_CFG, temb=False))
                block_in = c.ch * m
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, _BLOCK_CFG))
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in, True)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in, _BLOCK_CFG)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels if c.double_z else c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (len(c.ch_mult) - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        self.up = nn.ModuleList()
        for i in reversed(range(len(c.ch_mult))):
            level = Level()
            for _ in range(c.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, c.ch * c.ch_mult[i], _BLOCK_CFG, temb=False))
                block_in = c.ch * c.ch_mult[i]
                if res in c.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, _BLOCK_CFG))
            if i != 0:
                level.upsample = Upsample(block_in, True)
                res *= 2
            self.up.insert(0, level)
        self.norm_out = _norm(block_in, _BLOCK_CFG)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h, "upsample")
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


def _run_level(level: Level, h: torch.Tensor, resample: str) -> torch.Tensor:
    for i, blk in enumerate(level.block):
        h = blk(h)
        if len(level.attn):
            h = level.attn[i](h)
    return getattr(level, resample)(h) if hasattr(level, resample) else h


def _mid(ch: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch, _BLOCK_CFG, temb=False)
    mid.attn_1 = AttnBlock(ch, _BLOCK_CFG)
    mid.block_2 = ResnetBlock(ch, ch, _BLOCK_CFG, temb=False)
    return mid


class Autoencoder(nn.Module):
    """``VQModel`` (``n_embed > 0``; nearest-codebook quantization) or ``AutoencoderKL`` (posterior mean)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.cfg = c
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        zc = 2 * c.z_channels if c.double_z else c.z_channels
        self.quant_conv = nn.Conv2d(zc, 2 * c.embed_dim if c.double_z else c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        if c.n_embed:
            self.quantize = nn.Module()
            self.quantize.embedding = nn.Embedding(c.n_embed, c.embed_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.quant_conv(self.encoder(x))
        if self.cfg.double_z:
            return h.chunk(2, dim=1)[0]  # KL: the posterior mean
        e = self.quantize.embedding.weight  # [K, D]
        flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        idx = torch.cdist(flat, e).argmin(dim=1)
        return e[idx].reshape(h.shape[0], h.shape[2], h.shape[3], -1).permute(0, 3, 1, 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def example_inputs(self) -> tuple:
        return (torch.zeros(1, self.cfg.in_channels, self.cfg.resolution, self.cfg.resolution),)
