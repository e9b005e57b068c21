"""The latent-diffusion U-Net (CompVis ``ldm.modules.diffusionmodules.openaimodel.UNetModel``), second architecture.

Parameter names follow the original (``time_embed.{0,2}``, ``input_blocks.k.{0,1}``, ``middle_block``,
``output_blocks``, ``out.{0,2}``; ResBlock ``in_layers.2`` / ``emb_layers.1`` / ``out_layers.3`` /
``skip_connection``; AttentionBlock ``norm`` / ``qkv`` / ``proj_out`` (1x1 Conv1d, legacy head order);
SpatialTransformer ``proj_in`` / ``transformer_blocks.i.{attn1,ff,attn2,norm1-3}`` / ``proj_out``), so LDM
checkpoints' ``model.diffusion_model.*`` keys map one to one. Presets reproduce the papers' configurations
(``ldm4-bedrooms``: 274,056,163 parameters, as the released checkpoint). Like ``unet.py`` it knows nothing
about binarization; the size/OPs accountant and ``binarize_`` work on it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, check


@dataclasses.dataclass(frozen=True)
class LDMUNetConfig(Config):
    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 224
    attention_resolutions: tuple[int, ...] = (8, 4, 2)  # downsample factors, as in LDM configs
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_heads: int = -1
    num_head_channels: int = 32
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int = 0
    dropout: float = 0.0

    PRESETS: ClassVar[dict[str, dict]] = {
        # CompVis/latent-diffusion models/ldm/lsun_beds256/config.yaml (BinaryDM/BiDM LDM-4), VQ-f4 latents
        "ldm4-bedrooms": {},
        # models/ldm/lsun_churches256/config.yaml (LDM-8), KL-f8 latents
        "ldm8-churches": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 192,
                          "attention_resolutions": (1, 2, 4, 8), "channel_mult": (1, 2, 2, 4, 4), "num_heads": 8,
                          "num_head_channels": -1, "use_scale_shift_norm": True, "resblock_updown": True},
        # models/ldm/text2img256/config.yaml style (LDM-KL-8 txt2img): spatial transformers, cross-attention
        "ldm8-txt2img": {"model_channels": 320, "attention_resolutions": (4, 2, 1), "channel_mult": (1, 2, 4, 4),
                     "in_channels": 4, "out_channels": 4, "image_size": 32, "num_heads": 8, "num_head_channels": -1,
                     "use_spatial_transformer": True, "context_dim": 1280},
    }

    def validate(self) -> None:
        check(self.num_heads != -1 or self.num_head_channels != -1, "set num_heads or num_head_channels")
        check(not self.use_spatial_transformer or self.context_dim > 0,
              "use_spatial_transformer needs context_dim > 0")

    @classmethod
    def from_name(cls, name: str) -> "LDMUNetConfig":
        if name not in cls.PRESETS:
            raise ValueError(f"unknown LDM preset {name!r}; choose one of {sorted(cls.PRESETS)}")
        return cls.from_dict(cls.PRESETS[name])


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int, emb_ch: int, out_ch: int, cfg: LDMUNetConfig, up: bool = False, down: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.updown = up or down
        self.h_upd = Upsample(ch, False) if up else Downsample(ch, False) if down else nn.Identity()
        self.x_upd = Upsample(ch, False) if up else Downsample(ch, False) if down else nn.Identity()
        self.scale_shift = cfg.use_scale_shift_norm
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch if self.scale_shift else out_ch))
        self.out_layers = nn.Sequential(_gn(out_ch), nn.SiLU(), nn.Dropout(cfg.dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.in_layers[-1](self.h_upd(h)), self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """GN -> qkv (1x1 Conv1d) -> legacy multi-head attention -> proj_out, plus the residual."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = _gn(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x, emb=None):
        b, c, *sp = x.shape
        qkv = self.qkv(self.norm(x.reshape(b, c, -1)))
        t = qkv.shape[-1]
        q, k, v = qkv.reshape(b * self.heads, 3 * c // self.heads, t).split(c // self.heads, dim=1)
        scale = 1 / math.sqrt(math.sqrt(c // self.heads))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        h = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, t)
        return (x.reshape(b, c, t) + self.proj_out(h)).reshape(b, c, *sp)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner, ctx = heads * dim_head, context_dim or dim
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(ctx, inner, bias=False)
        self.to_v = nn.Linear(ctx, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (z.reshape(b, z.shape[1], self.heads, -1).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, ch, 1)

    def forward(self, x, emb=None, context=None):
        b, c, h, w = x.shape
        z = self.proj_in(self.norm(x))
        z = z.flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            z = blk(z, context)
        return self.proj_out(z.transpose(1, 2).reshape(b, -1, h, w)) + x


class Downsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x, emb=None):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, use_conv: bool = True):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context=context)
            else:
                x = layer(x)
        return x


class LDMUNet(nn.Module):
    def __init__(self, cfg: LDMUNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, ted = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))

        def attn(ch: int) -> nn.Module:
            heads = ch // cfg.num_head_channels if cfg.num_head_channels != -1 else cfg.num_heads
            if cfg.use_spatial_transformer:
                return SpatialTransformer(ch, heads, ch // heads, cfg.transformer_depth, cfg.context_dim)
            return AttentionBlock(ch, heads)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, ted, mult * mc, cfg)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = ResBlock(ch, ted, ch, cfg, down=True) if cfg.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, ted, ch, cfg), attn(ch), ResBlock(ch, ted, ch, cfg))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), ted, mc * mult, cfg)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ted, ch, cfg, up=True) if cfg.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        hs, h = [], x
        for blk in self.input_blocks:
            h = blk(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)

    def example_inputs(self) -> tuple:
        c = self.cfg
        x = torch.zeros(1, c.in_channels, c.image_size, c.image_size)
        ctx = torch.zeros(1, 77, c.context_dim) if c.use_spatial_transformer else None
        return (x, torch.tensor([500.0])) + ((ctx,) if ctx is not None else ())
