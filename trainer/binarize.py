"""Binarization as a module swap: ``binarize_(model, cfg)`` replaces Conv2d/Linear layers by binary twins.

The U-Net is untouched: every ``nn.Conv2d`` / ``nn.Linear`` whose name does not match ``cfg.keep_fp`` is
swapped for a :class:`BinaryConv2d` (a Linear becomes a 1x1 convolution, which is also how the exporter
writes it, since LCE never binarizes Dense layers). Parameter names are kept (``down.1.block.0.conv1.weight``
holds the latent float weights), so FP weights load before or after the swap.

One forward of a binary layer (input x, latent weights W)::

    x_q = act_quantizer(x)                      # ACT_QUANTIZERS[cfg.act]; sign(0) = +1
    x_q = pad(x_q, +1 if 1-bit else Qp*step)    # what LCE computes: 'same-one' bconvs (on every bit plane);
                                                # multi-bit with cfg.act_pad='zero': 0 (the int8 path)
    y   = conv(x_q, weight_binarizer(W))        # WEIGHT_BINARIZERS[cfg.weight], per-output-channel scale
    y   = y * K(mean_c |x|)                     # XNOR (fixed box filter) / BiDM TBS (learnable k x k conv)
    y   = y * Gamma                             # XNOR++ a_o (x) b_h (x) c_w
    y   = y + bias ; y = RPReLU(y)              # as configured
    y   = y + gamma * shortcut(x)               # BiDM learnable shortcut (FP 1x1 conv when C changes) / BBCU

State that training changes is kept in buffers so it is checkpointed and exact on resume: ``active``
(progressive binarization: an inactive layer computes the original float conv) and ``second_basis``
(EBB stage: after stage 2 sigma_II is ignored; the parameter stays so optimizer state lines up).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import get_act_quantizer, get_weight_binarizer, sign
from .spec import BinarizeConfig


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch over the whole dotted name: ``*`` also crosses dots (``*.nin_shortcut``, ``down.0.*``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _matches_segments(name: str, patterns: Iterable[str]) -> bool:
    """Segment-wise match: ``up.1.attn.*`` matches ``up.1.attn.0`` but not its children ``up.1.attn.0.q``."""
    parts = name.split(".")
    return any(len(p.split(".")) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, p.split(".")))
               for p in patterns)


class RPReLU(nn.Module):
    """ReActNet RPReLU: PReLU(x + gamma_c) + zeta_c (per channel)."""

    def __init__(self, ch: int):
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(1, ch, 1, 1))
        self.prelu = nn.PReLU(ch, init=0.25)
        self.shift_out = nn.Parameter(torch.zeros(1, ch, 1, 1))

    def forward(self, x):
        return self.prelu(x + self.shift_in) + self.shift_out


class BinaryConv2d(nn.Module):
    """Binary-weight convolution with quantized inputs; see the module docstring for the forward."""

    def __init__(self, conv: nn.Conv2d | nn.Linear, cfg: BinarizeConfig, name: str,
                 in_hw: tuple[int, int] | None = None, ebb: bool = False):
        super().__init__()
        self.name, self.cfg = name, cfg
        self.is_linear = isinstance(conv, nn.Linear)
        w = conv.weight.detach()
        if self.is_linear:
            w = w[:, :, None, None]
            self.kernel_size, self.stride, self.padding = 1, 1, 0
        else:
            if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1]:
                raise ValueError(f"{name}: only square, ungrouped, undilated convolutions can be binarized")
            self.kernel_size, self.stride, self.padding = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.in_channels, self.out_channels = w.shape[1], w.shape[0]
        self.weight = nn.Parameter(conv.weight.detach().clone())  # original shape: a Linear stays [O, I]
        # BiDM drops the float bias of binarized layers (cfg.bias=False); BinaryDM keeps it.
        keep = cfg.bias and conv.bias is not None
        self.bias = nn.Parameter(conv.bias.detach().clone()) if keep else None
        self.register_buffer("active", torch.tensor(True))
        self.register_buffer("second_basis", torch.tensor(ebb))

        # Weight binarizer parameters (initialised from the weights: no lazy init in forward).
        self.weight_fn = get_weight_binarizer("ebb" if ebb else cfg.weight)
        self.sigma1 = self.sigma2 = None
        if cfg.weight == "scaled_sign" or ebb:
            s1 = w.abs().mean(dim=(1, 2, 3), keepdim=True)
            self.sigma1 = nn.Parameter(s1.clone())
            if ebb:  # BinaryDM Eq. 5: sigma_II = mean |W - sigma_I sign(W)|
                self.sigma2 = nn.Parameter((w - s1 * sign(w)).abs().mean(dim=(1, 2, 3), keepdim=True))
        self.reste_o = 1.0  # annealed by the trainer for ReSTE (a schedule, not learned)

        # Activation quantizer parameters.
        self.act_fn = get_act_quantizer(cfg.act)
        self.threshold = nn.Parameter(torch.zeros(1, self.in_channels, 1, 1)) if cfg.act == "rsign" else None
        # LSQ step, set by calibrate_(): learned as is ("learned", the paper) or as its log ("log", bdmtool: it
        # stays positive; Adam moves a raw step by ~lr per iteration, which drove steps of ~0.01 negative).
        self.uses_lsq = cfg.act == "lsq"
        self.step = nn.Parameter(torch.tensor(1.0)) if self.uses_lsq and cfg.lsq_step != "log" else None
        self.log_step = nn.Parameter(torch.tensor(0.0)) if self.uses_lsq and cfg.lsq_step == "log" else None

        # XNOR / TBS activation scale K = k_conv(mean_c |x|) (convolutions only, as in the official code).
        self.k_conv = None
        if cfg.act_scale != "none" and not self.is_linear:
            k = self.kernel_size
            self.k_conv = nn.Conv2d(1, 1, k, stride=self.stride, padding=self.padding, bias=cfg.act_scale == "tbs")
            with torch.no_grad():
                self.k_conv.weight.fill_(1.0 / (k * k))  # box filter: XNOR-Net's K = A * k
                if self.k_conv.bias is not None:
                    self.k_conv.bias.zero_()  # official: random U(-1/k, 1/k); zero keeps K = XNOR's at init
            self.k_conv.requires_grad_(cfg.act_scale == "tbs")

        # XNOR++ output scale Gamma = alpha_o (x) beta_h (x) gamma_w.
        self.gamma_o = self.gamma_h = self.gamma_w = None
        if cfg.output_scale == "xnorpp":
            if in_hw is None:
                raise ValueError(f"{name}: XNOR++ needs the layer's spatial size (binarize_ records it)")
            oh, ow = (1, 1) if self.is_linear else self._out_hw(in_hw)
            self.gamma_o = nn.Parameter(w.abs().mean(dim=(1, 2, 3)).reshape(1, -1, 1, 1).clone())
            self.gamma_h = nn.Parameter(torch.ones(1, 1, oh, 1))
            self.gamma_w = nn.Parameter(torch.ones(1, 1, 1, ow))

        self.post = RPReLU(self.out_channels) if cfg.post == "rprelu" else None

        # Learnable shortcut (BiDM) / identity residual (BBCU) around the binary conv, convolutions only.
        self.shortcut_scale = self.shortcut_conv = None
        self.shortcut_kind = "none" if self.is_linear else cfg.shortcut
        if self.shortcut_kind == "bidm":
            self.shortcut_scale = nn.Parameter(torch.tensor(float(cfg.shortcut_init)))
            if self.in_channels != self.out_channels:
                self.shortcut_conv = nn.Conv2d(self.in_channels, self.out_channels, 1)  # FP, counted by `ops`
        elif self.shortcut_kind == "bbcu" and self.in_channels != self.out_channels:
            self.shortcut_kind = "none"  # BBCU's residual needs matching channels

    def _out_hw(self, in_hw: tuple[int, int]) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return ((in_hw[0] + 2 * p - k) // s + 1, (in_hw[1] + 2 * p - k) // s + 1)

    @property
    def abits(self) -> int:
        return self.cfg.abits

    def weight4d(self) -> torch.Tensor:
        """Latent weights as a conv kernel [O, I, k, k] (a Linear's [O, I] becomes [O, I, 1, 1])."""
        return self.weight[:, :, None, None] if self.is_linear else self.weight

    def binary_weight(self) -> torch.Tensor:
        """The weights the deployed layer uses: {-s, +s} per output channel (two bases under EBB stage 1)."""
        w = self.weight4d()
        if self.weight_fn.registry_name == "ebb":
            return self.weight_fn(w, self.sigma1, self.sigma2 if bool(self.second_basis) else None)
        if self.sigma1 is not None:
            return self.weight_fn(w, self.sigma1)
        if self.weight_fn.registry_name == "reste":
            return self.weight_fn(w, o=self.reste_o)
        return self.weight_fn(w)

    def learned_step(self) -> torch.Tensor:
        """The LSQ step the deployed layer uses: a learned constant, exp(lsq_log_lr_scale * log_step) in log mode
        (the scale makes Adam move log(step) that many times faster than the weights)."""
        if self.log_step is not None:
            return (self.log_step * self.cfg.lsq_log_lr_scale).exp()
        return self.step

    @torch.no_grad()
    def set_step_(self, value: float) -> None:
        if self.log_step is not None:
            self.log_step.fill_(math.log(value) / self.cfg.lsq_log_lr_scale)
        else:
            self.step.fill_(value)

    def _lsq_step(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.lsq_step == "per_batch":  # official BinaryDM: step = 2 mean|x| / sqrt(Qp) of this batch
            return (2.0 * x.abs().mean() / math.sqrt(2 ** (self.cfg.abits - 1) - 1)).detach()
        return self.learned_step()

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_lsq:
            return self.act_fn(x, self._lsq_step(x), self.cfg.abits)
        if self.threshold is not None:
            return self.act_fn(x, self.threshold)
        if self.act_fn.registry_name == "reste":
            return self.act_fn(x, o=self.reste_o)
        return self.act_fn(x)

    @torch.no_grad()
    def decision_margin(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample distance of the input to the quantizer's nearest decision boundary ([B]).

        1-bit: |x + threshold| (the sign's boundary is 0; DoReFa's {0, 1} codes: |x - 1/2|); LSQ: distance
        of x/step to the nearest rounding boundary k + 0.5 (inside the clamp range), times step. Two
        implementations whose float results differ by less than this margin quantize identically. Exact zeros
        are skipped: they come from explicit padding (the Downsample's border) and every implementation
        reproduces them exactly.
        """
        if not bool(self.active) or self.cfg.abits == 32:
            return torch.full((x.shape[0],), float("inf"))
        if self.is_linear:
            x = x[:, :, None, None]
        if self.uses_lsq:
            s = self._lsq_step(x)
            v = x / s
            qn, qp = -(2 ** (self.cfg.abits - 1)), 2 ** (self.cfg.abits - 1) - 1
            inside = (v > qn - 0.5) & (v < qp + 0.5)
            d = ((v - torch.floor(v) - 0.5).abs() * s).where(inside, torch.full_like(v, float("inf")))
        elif self.cfg.act == "dorefa":  # round(clip(x, 0, 1)): the boundary is 1/2
            d = (x - 0.5).abs()
        else:
            d = (x + self.threshold if self.threshold is not None else x).abs()
        d = d.where(x != 0, torch.full_like(d, float("inf")))
        return d.flatten(1).min(dim=1).values

    def _conv(self, x: torch.Tensor, w: torch.Tensor, pad_value: float) -> torch.Tensor:
        if self.padding and pad_value != 0.0:
            x = F.pad(x, (self.padding,) * 4, value=pad_value)
            return F.conv2d(x, w, stride=self.stride)
        return F.conv2d(x, w, stride=self.stride, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_linear:
            return self._forward4d(x[:, :, None, None]).flatten(1)
        return self._forward4d(x)

    def _forward4d(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.active):  # progressive binarization: still the original float layer
            return F.conv2d(x, self.weight4d(), self.bias, stride=self.stride, padding=self.padding)
        xq = self.quantize_input(x)
        if self.padding and self.cfg.abits not in (1, 32) and self.cfg.act_pad == "top":
            # Multi-bit: pad with the top level Qp * step, i.e. every +-1 bit plane padded with +1, which is what
            # LCE's fast 'same-one' bconvs compute (the constant part then folds into a per-channel bias).
            p = self.padding
            border = F.pad(torch.zeros_like(xq[:1, :1]), (p, p, p, p), value=1.0)
            xq = F.pad(xq, (p, p, p, p)) + border * ((2 ** (self.cfg.abits - 1) - 1) * self._lsq_step(x))
            y = F.conv2d(xq, self.binary_weight(), stride=self.stride)
        else:
            y = self._conv(xq, self.binary_weight(), pad_value=1.0 if self.cfg.abits == 1 else 0.0)
        if self.k_conv is not None:
            y = y * self.k_conv(x.abs().mean(dim=1, keepdim=True))
        if self.gamma_o is not None:
            y = y * (self.gamma_o * self.gamma_h * self.gamma_w)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        if self.post is not None:
            y = self.post(y)
        if self.shortcut_kind == "bidm":
            sc = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
            if self.shortcut_conv is not None:
                sc = self.shortcut_conv(sc)
            y = y + self.shortcut_scale * sc[..., : y.shape[-2], : y.shape[-1]]
        elif self.shortcut_kind == "bbcu":
            sc = F.avg_pool2d(x, self.stride) if self.stride > 1 else x
            y = y + sc[..., : y.shape[-2], : y.shape[-1]]
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, s={self.stride}, p={self.padding}, "
                f"w={self.weight_fn.registry_name}, a={self.cfg.act}/{self.cfg.abits}b, linear={self.is_linear}")


def timestep_bucket(t: torch.Tensor, buckets: int, timesteps: int) -> torch.Tensor:
    """Index of the bucket ``t * buckets // timesteps`` (integer arithmetic: exact for integer t)."""
    return (t.long() * buckets // timesteps).clamp(0, buckets - 1)


class DCBypass(nn.Module):
    """Float path for the image mean (bdmtool), per channel, with per-timestep-bucket parameters:

    - ``timestep_gain``:   eps + g[b(t)] * mean_hw(x_t)
    - ``timestep_affine``: eps - h[b(t)] * mean_hw(eps) + g[b(t)] * mean_hw(x_t) + c[b(t)]
      (h = 1 replaces the network's own image mean by a float affine function of the input's mean).
    - ``timestep_skip``: the affine path, then - r[b(t)] * (eps - mean_hw(eps)) + s[b(t)] * (x_t - mean_hw(x_t)):
      a float per-pixel skip of x_t (at high t, eps ~ x_t, which binary layers pass through poorly) that can
      also shrink the network's own per-pixel output (r = s = 1 at t = T is eps = x_t).

    A binary U-Net quantizes away the per-image mean of x_t (about 1/32 of a pixel's noise, far below one
    activation level), yet at high t the mean of the noise is almost exactly the mean of x_t, and DDIM
    multiplies an error in it by sqrt((1 - abar) / abar) ~ 100. Every parameter starts at 0 (the student
    starts as the plain binarized teacher) and is stored raw with value = ``lr_scale`` * raw so that Adam
    moves it ``lr_scale`` times faster than the weights (``skip_lr_scale``, default the same, for the per-pixel
    tables r and s; 10 was too slow for them in a 600-step A/B, docs/methods.md). It runs as a forward hook on the whole U-Net, which
    stays unaware of it; the exporter writes it with MEAN, GATHER, MUL, ADD (and SUB).
    """

    TABLES = ("gain", "remove", "offset", "shrink", "skip")
    PIXEL_TABLES = ("shrink", "skip")  # scaled by ``skip_lr_scale``: they move every pixel, not one mean

    def __init__(self, buckets: int, timesteps: int, lr_scale: float, mode: str = "timestep_gain",
                 skip_lr_scale: float | None = None):
        super().__init__()
        self.buckets, self.timesteps, self.lr_scale = buckets, timesteps, lr_scale
        self.skip_lr_scale = skip_lr_scale or lr_scale
        affine, skip = mode in ("timestep_affine", "timestep_skip"), mode == "timestep_skip"
        self.gain_raw = nn.Parameter(torch.zeros(buckets))
        self.remove_raw = nn.Parameter(torch.zeros(buckets)) if affine else None
        self.offset_raw = nn.Parameter(torch.zeros(buckets)) if affine else None
        self.shrink_raw = nn.Parameter(torch.zeros(buckets)) if skip else None
        self.skip_raw = nn.Parameter(torch.zeros(buckets)) if skip else None

    def scale(self, name: str) -> float:
        return self.skip_lr_scale if name in self.PIXEL_TABLES else self.lr_scale

    def gains(self) -> torch.Tensor:
        return self.gain_raw * self.lr_scale

    def tables(self) -> dict[str, torch.Tensor]:
        """{"gain", "remove", "offset", "shrink", "skip"} per bucket (0 where the mode has no such table)."""
        z = torch.zeros_like(self.gain_raw)
        return {k: z if getattr(self, f"{k}_raw") is None else getattr(self, f"{k}_raw") * self.scale(k)
                for k in self.TABLES}

    def hook(self, module: nn.Module, args: tuple, eps: torch.Tensor) -> torch.Tensor:
        x, t = args[0], args[1]
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        idx = timestep_bucket(t, self.buckets, self.timesteps)

        def at(name):
            return (getattr(self, f"{name}_raw") * self.scale(name))[idx].reshape(-1, 1, 1, 1)

        x_dc, eps_dc = x.mean(dim=(2, 3), keepdim=True), eps.mean(dim=(2, 3), keepdim=True)
        out = eps + at("gain") * x_dc
        if self.remove_raw is not None:
            out = out - at("remove") * eps_dc + at("offset")
        if self.skip_raw is not None:
            out = out - at("shrink") * (eps - eps_dc) + at("skip") * (x - x_dc)
        return out


class CacheFilled(Exception):
    """Raised by a recording-only pass once every site is recorded: the rest of that forward is not needed."""


class TimestepCache(nn.Module):
    """BiDM cross-timestep connection: out_i <- (1 - a[t, i]) out_i + a[t, i] * stopgrad(cache_i).

    ``alpha`` [buckets, sites] is learnable (init 0). Sites are modules of the U-Net; forward hooks mix
    and record their outputs. ``reset()`` empties the cache (start of every sampling run); while a site's
    cache is empty the output passes unchanged and is recorded. ``recording_only`` fills the cache without
    mixing (training's extra forward at t + delta) and, with ``stop_when_filled``, ends that forward by
    raising :class:`CacheFilled` at the last site (``record`` catches it): the tiny preset's sites are in
    ``up.1``, so the full-resolution level and the output conv are skipped (~25 % of that pass).
    """

    def __init__(self, sites: list[str], buckets: int, timesteps: int):
        super().__init__()
        self.sites, self.buckets, self.timesteps = list(sites), buckets, timesteps
        self.alpha = nn.Parameter(torch.zeros(buckets, len(sites)))
        self.cache: dict[str, torch.Tensor] = {}
        self.t: torch.Tensor | None = None
        self.recording_only = False
        self.stop_when_filled = True

    def reset(self) -> None:
        self.cache = {}

    def bucket(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_bucket(t, self.buckets, self.timesteps)

    def hook(self, index: int):
        site = self.sites[index]

        def fn(module, inputs, out):
            prev = self.cache.get(site)
            if prev is not None and not self.recording_only and prev.shape == out.shape:
                a = self.alpha[self.bucket(self.t), index].reshape(-1, *([1] * (out.ndim - 1)))
                out = (1 - a) * out + a * prev.detach()
            self.cache[site] = out.detach()
            if self.recording_only and self.stop_when_filled and len(self.cache) == len(self.sites):
                raise CacheFilled
            return out
        return fn

    @torch.no_grad()
    def record(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
        """Empty the cache and fill it from ``model(x, t)`` without mixing (BiDM training's pass at t + delta)."""
        self.reset()
        self.recording_only = True
        try:
            model(x, t)
        except CacheFilled:
            pass
        finally:
            self.recording_only = False


def _record_shapes(model: nn.Module, example: tuple[torch.Tensor, ...]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: shapes.__setitem__(n, tuple(inp[0].shape[-2:])))
             for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def binarize_(model: nn.Module, cfg: BinarizeConfig, example_input: tuple[torch.Tensor, ...] | None = None,
              timesteps: int = 1000) -> nn.Module:
    """Swap every Conv2d/Linear not matching ``cfg.keep_fp`` for a BinaryConv2d, in place; returns ``model``.

    ``example_input`` (default: zeros of the U-Net's input shape) is run once to record each layer's input
    size, which XNOR++ needs; nothing is initialised from data here (see ``calibrate_``).
    """
    if example_input is None:
        ucfg = model.cfg
        example_input = (torch.zeros(1, ucfg.in_channels, ucfg.resolution, ucfg.resolution), torch.zeros(1))
    shapes = _record_shapes(model, example_input)
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and not _matches(n, cfg.keep_fp)]
    if not targets:
        raise ValueError(f"binarize: no Conv2d/Linear left after keep_fp={list(cfg.keep_fp)}")
    for name, module in targets:
        _set_submodule(model, name, BinaryConv2d(module, cfg, name, shapes.get(name),
                                                 ebb=_matches(name, cfg.ebb_layers)))
    if cfg.timestep_cache:
        sites = [n for n, _ in model.named_modules() if n and _matches_segments(n, cfg.timestep_cache)]
        if not sites:
            raise ValueError(f"binarize.timestep_cache={list(cfg.timestep_cache)} matches no module")
        cache = TimestepCache(sites, cfg.cache_buckets, timesteps)
        model.tbs_cache = cache
        for i, site in enumerate(sites):
            model.get_submodule(site).register_forward_hook(cache.hook(i))
        model.register_forward_pre_hook(lambda mod, args: setattr(cache, "t", args[1]))
    if cfg.dc_bypass != "none":
        model.dc_bypass = DCBypass(cfg.dc_bypass_buckets, timesteps, cfg.dc_bypass_lr_scale, cfg.dc_bypass,
                                   cfg.dc_bypass_skip_lr_scale)
        model.register_forward_hook(model.dc_bypass.hook)  # a bound method: deep copies follow the module
    return model


def binary_layers(model: nn.Module) -> list[BinaryConv2d]:
    return [m for m in model.modules() if isinstance(m, BinaryConv2d)]


def packable_weights(model: nn.Module) -> list[str]:
    """Parameter names of the latent weights whose forward depends only on sign(W) and the per-output-channel
    mean |W| (active layers out of EBB stage 1): ``checkpoint.pack_weights`` may store them as bits."""
    return [f"{m.name}.weight" for m in binary_layers(model)
            if bool(m.active) and not (m.sigma2 is not None and bool(m.second_basis))]


def reset_state(model: nn.Module) -> None:
    """Start of a sampling run: empty the BiDM timestep cache (if any)."""
    cache = getattr(model, "tbs_cache", None)
    if cache is not None:
        cache.reset()


@torch.no_grad()
def calibrate_(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    """Data-dependent initialisation, run once before QAT: LSQ step = 2 mean|x| / sqrt(Qp) per layer (LSQ init)."""
    layers = [m for m in binary_layers(model) if m.uses_lsq]
    hooks = []
    for m in layers:
        def pre(mod, inp):
            qp = 2 ** (mod.cfg.abits - 1) - 1
            mod.set_step_(max(2.0 * float(inp[0].abs().mean()) / math.sqrt(qp), 1e-8))
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        reset_state(model)
        model(x, t)
        reset_state(model)
    finally:
        for h in hooks:
            h.remove()


def level_groups(model: nn.Module) -> list[list[BinaryConv2d]]:
    """BinaryDM progressive groups, middle outward: [mid], [down.L-1 + up.L-1], ..., [down.0 + up.0]."""
    layers = binary_layers(model)
    levels = sorted({int(m.name.split(".")[1]) for m in layers if m.name.split(".")[0] in ("down", "up")})
    groups = [[m for m in layers if m.name.startswith("mid.")]]
    for lv in reversed(levels):
        groups.append([m for m in layers if m.name.startswith((f"down.{lv}.", f"up.{lv}."))])
    rest = [m for m in layers if not any(m in g for g in groups)]
    return [g for g in groups if g] + ([rest] if rest else [])


def apply_schedule_(model: nn.Module, cfg: BinarizeConfig, step: int, total_steps: int) -> None:
    """Set every schedule-driven state for training step ``step`` (a pure function of the step):
    progressive binarization flags, EBB stage, ReSTE's annealed o."""
    layers = binary_layers(model)
    if cfg.progressive == "middle_out":
        for i, group in enumerate(level_groups(model)):
            on = step >= i * cfg.progressive_every
            for m in group:
                m.active.fill_(on)
    if cfg.ebb_stage2_step >= 0 and step >= cfg.ebb_stage2_step:
        for m in layers:
            m.second_basis.fill_(False)
    if cfg.weight == "reste" or cfg.act == "reste":
        o = 1.0 + (1.0 - math.cos(math.pi / 2 * min(step / max(total_steps, 1), 1.0))) * (cfg.reste_o_end - 1.0)
        for m in layers:
            m.reste_o = o
