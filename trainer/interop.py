"""Import foreign full-precision weights into bdmtool's U-Net.

Supported sources:

- **pytorch_diffusion / ermongroup-ddim** (``model-790000.ckpt``, a plain state dict; also ddim's
  ``ckpt.pth`` list ``[model, optimizer, epoch, step, ema]`` with ``module.`` prefixes). Our parameter
  names *are* pesser's, so this is the identity map; the U-Net config is inferred from the shapes.
- **diffusers** ``UNet2DModel`` directories (``config.json`` + ``diffusion_pytorch_model.safetensors``
  or ``.bin``). Two traps (see ``shared/reference/ecosystem.md`` §3.3): diffusers' ``up_blocks`` run
  in the opposite order to pesser's ``up`` list, and attention must be single-head
  (``attention_head_dim`` null or equal to the channel count). 1x1 attention convs are Linear there.

Everything is read with ``torch.load(weights_only=True)`` or safetensors; nothing is unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..files import read_json

from .spec import DiffusionConfig, UNetConfig


class InteropError(ValueError):
    """Foreign weights cannot be mapped; the message says which key or setting and why."""


# ----------------------------------------------------------------------------------------------------------
# pytorch_diffusion (pesser) / ermongroup ddim


def read_pesser_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a pesser ``model-*.ckpt`` or an ermongroup ``ckpt.pth`` (EMA weights preferred)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InteropError(f"cannot read {path} as a tensor-only torch file ({type(e).__name__}); "
                           "is it a pytorch_diffusion/ddim checkpoint?") from None
    if isinstance(obj, (list, tuple)):  # ermongroup ddim: [model, optimizer, epoch, step, ema]
        obj = obj[4] if len(obj) > 4 and isinstance(obj[4], dict) else obj[0]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj.get("format") == "bdmtool-checkpoint":
        raise InteropError(f"{path} is already a bdmtool checkpoint: use it directly (sample, train --init, export)")
    if not isinstance(obj, dict) or "conv_in.weight" not in {k.removeprefix("module.") for k in obj}:
        raise InteropError(f"{path} has no 'conv_in.weight': not a pytorch_diffusion / ddim U-Net state dict")
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad:
        raise InteropError(f"{path}: weight {bad} holds NaN/inf values; these weights cannot sample")
    return sd


def infer_unet_config(sd: dict[str, torch.Tensor], resolution: int = 32, dropout: float = 0.1) -> UNetConfig:
    """Recover a :class:`UNetConfig` from pesser-named weights (resolution and dropout are not stored)."""
    ch, in_channels = sd["conv_in.weight"].shape[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down\.(\d+)\.", k))})
    ch_mult = tuple(sd[f"down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len({k.split(".")[3] for k in sd if k.startswith("down.0.block.")})
    attn = tuple(resolution // 2**i for i in levels if f"down.{i}.attn.0.q.weight" in sd)
    return UNetConfig(resolution=resolution, in_channels=int(in_channels),
                      out_channels=int(sd["conv_out.weight"].shape[0]), ch=int(ch), ch_mult=ch_mult,
                      num_res_blocks=num_res_blocks, attn_resolutions=attn, dropout=dropout,
                      resamp_with_conv="down.0.downsample.conv.weight" in sd,
                      norm_eps=1e-6)


# ----------------------------------------------------------------------------------------------------------
# diffusers UNet2DModel

_RESNET = {"time_emb_proj": "temb_proj", "conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
         "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # legacy (hub .bin) names too


def _rename_inner(rest: str, table: dict[str, str]) -> str:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src):]
    return rest


def diffusers_key_to_ours(key: str, num_levels: int) -> str:
    """Map one diffusers ``UNet2DModel`` parameter name to ours (pesser names)."""
    simple = {"time_embedding.linear_1.": "temb.dense.0.", "time_embedding.linear_2.": "temb.dense.1.",
              "conv_norm_out.": "norm_out.", "conv_in.": "conv_in.", "conv_out.": "conv_out."}
    for src, dst in simple.items():
        if key.startswith(src):
            return dst + key[len(src):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        if side == "up":
            i = num_levels - 1 - i  # diffusers up_blocks[0] is the lowest resolution; pesser up[0] the highest
        if kind == "resnets":
            return f"{side}.{i}.block.{j}.{_rename_inner(rest, _RESNET)}"
        if kind == "attentions":
            return f"{side}.{i}.attn.{j}.{_rename_inner(rest, _ATTN)}"
        return f"{side}.{i}.{'downsample' if side == 'down' else 'upsample'}.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m.groups()
        if kind == "resnets":
            return f"mid.block_{int(j) + 1}.{_rename_inner(rest, _RESNET)}"
        return f"mid.attn_1.{_rename_inner(rest, _ATTN)}"
    raise InteropError(f"unexpected diffusers parameter {key!r}; only UNet2DModel DDPM layouts are supported")


def _check_diffusers_config(cfg: dict) -> None:
    wanted = {"act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
              "downsample_padding": 0, "center_input_sample": False, "mid_block_scale_factor": 1,
              "add_attention": True, "resnet_time_scale_shift": "default", "class_embed_type": None,
              "num_class_embeds": None, "downsample_type": "conv", "upsample_type": "conv"}
    for k, v in wanted.items():
        if k in cfg and cfg[k] != v:
            raise InteropError(f"diffusers config {k}={cfg[k]!r} is not the DDPM U-Net layout ({k}={v!r} needed)")
    down = cfg.get("down_block_types", [])
    for t in down + cfg.get("up_block_types", []):
        if t not in ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"):
            raise InteropError(f"diffusers block type {t!r} is not supported (DDPM UNet2DModel blocks only)")
    chans = cfg["block_out_channels"]
    head = cfg.get("attention_head_dim")
    for i, t in enumerate(down):
        if t.startswith("Attn") and head is not None and head != chans[i]:
            raise InteropError(
                f"attention_head_dim={head} gives {chans[i] // head} heads at level {i}; bdmtool's U-Net (like "
                "pesser's) is single-head. Only attention_head_dim=null (or equal to the channels) maps exactly.")


def read_diffusers_dir(path: str | Path) -> tuple[UNetConfig, dict[str, torch.Tensor], DiffusionConfig | None]:
    """Read a diffusers ``UNet2DModel`` folder (or a pipeline folder with ``unet/``) into our names."""
    root = Path(path)
    if (root / "unet" / "config.json").exists():
        scheduler = root / "scheduler" / "scheduler_config.json"
        root = root / "unet"
    else:
        scheduler = root / "scheduler_config.json"
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise InteropError(f"{root} has no config.json: not a diffusers model folder")
    cfg = read_json(cfg_path, "diffusers UNet2DModel config")
    if not isinstance(cfg, dict):
        raise InteropError(f"{cfg_path} is not a JSON object: not a diffusers model folder")
    missing = [k for k in ("block_out_channels", "down_block_types") if k not in cfg]
    if missing:
        raise InteropError(f"{cfg_path} lacks {missing}: not a complete diffusers UNet2DModel config")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise InteropError(f"{cfg_path} describes a {cfg.get('_class_name')}; only UNet2DModel is supported")
    _check_diffusers_config(cfg)
    chans = list(cfg["block_out_channels"])
    ch = chans[0]
    sample = cfg.get("sample_size", 32)
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    unet = UNetConfig(
        resolution=int(sample), in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        ch=ch, ch_mult=tuple(c // ch for c in chans), num_res_blocks=cfg.get("layers_per_block", 2),
        attn_resolutions=tuple(int(sample) // 2**i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("Attn")),
        dropout=float(cfg.get("dropout", 0.0)), resamp_with_conv=True, num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=float(cfg.get("norm_eps", 1e-5)))
    st, bin_ = root / "diffusion_pytorch_model.safetensors", root / "diffusion_pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        raw = load_file(str(st))
    elif bin_.exists():
        raw = torch.load(bin_, map_location="cpu", weights_only=True)
    else:
        raise InteropError(f"{root} has neither diffusion_pytorch_model.safetensors nor .bin")
    sd = {}
    for k, v in raw.items():
        ours = diffusers_key_to_ours(k, len(chans))
        if ".attn" in ours and v.ndim == 2:
            v = v[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        sd[ours] = v
    diffusion = None
    if scheduler.exists():
        sc = read_json(scheduler, "diffusers scheduler config")
        kind = {"linear": "linear", "scaled_linear": "ldm_linear", "squaredcos_cap_v2": "cosine"}.get(
            sc.get("beta_schedule", "linear"))
        if kind is None:
            raise InteropError(f"scheduler beta_schedule={sc.get('beta_schedule')!r} is not supported")
        diffusion = DiffusionConfig(schedule=kind, beta_start=sc.get("beta_start", 1e-4),
                                    beta_end=sc.get("beta_end", 0.02), timesteps=sc.get("num_train_timesteps", 1000))
    return unet, sd, diffusion


# ----------------------------------------------------------------------------------------------------------


def import_weights(src: str | Path, out: str | Path, resolution: int = 32, dropout: float | None = None) -> Path:
    """Convert pesser/ddim weights (a file) or a diffusers folder into a bdmtool ``model.ckpt``."""
    from .checkpoint import atomic_save, make_checkpoint
    from .spec import TrainSpec
    from .unet import UNet

    src = Path(src)
    if resolution < 8:
        raise InteropError(f"--resolution must be >= 8 (the image size the weights were trained at), got {resolution}")
    diffusion = None
    if src.is_dir():
        unet, sd, diffusion = read_diffusers_dir(src)
        if dropout is not None:
            unet = unet.replace(dropout=dropout)
    elif src.is_file():
        sd = read_pesser_state_dict(src)
        try:
            unet = infer_unet_config(sd, resolution=resolution, dropout=0.1 if dropout is None else dropout)
        except (KeyError, IndexError, ZeroDivisionError, ValueError) as e:
            raise InteropError(f"{src}: cannot infer the U-Net layout from its weights ({type(e).__name__}: {e}); "
                               "not a complete pytorch_diffusion / ddim U-Net state dict") from None
    else:
        raise InteropError(f"{src} does not exist")
    from .train import load_weights

    model = UNet(unet)
    load_weights(model, sd, src, fix="the weights are not a DDPM U-Net of the layout bdmtool reads")
    data = ({"source": "cifar10", "path": "cifar-10-batches-py"} if unet.in_channels == 3 else {"source": "mnist5k"})
    spec = TrainSpec.from_dict({"unet": unet.to_dict(), "diffusion": (diffusion or DiffusionConfig()).to_dict(),
                                "data": {**data, "channels": unet.in_channels, "resolution": unet.resolution}})
    return atomic_save(make_checkpoint(spec, 0, model.state_dict()), out)
