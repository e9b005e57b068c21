"""Weight binarizers and activation quantizers: small pure functions with straight-through gradients.

Two registries keyed by name, filled by decorators:

- ``WEIGHT_BINARIZERS[name](w, **params) -> w_b``: 1-bit weights with their scale (per output channel
  unless stated), for ``w`` of shape [C_out, ...].
- ``ACT_QUANTIZERS[name](x, **params) -> x_q``: activations at 1 or b bits.

Conventions shared with the exporter (it is held to bit-level parity with these):

- ``sign(0) = +1``, as LCE's ``LceQuantize`` and larq's ``ste_sign`` (``sign(sign(x) + 0.1)``).
- Every gradient is written out in the docstring as ``d out / d in`` and tested against finite
  differences or the formula in ``tests/test_quantizers.py``.

Names follow larq's aliases where a larq twin exists (``ste_sign``, ``approx_sign``,
``magnitude_aware_sign``), so the Keras rebuild can pass the same string to ``QuantConv2D``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

WEIGHT_BINARIZERS: dict[str, Callable[..., torch.Tensor]] = {}
ACT_QUANTIZERS: dict[str, Callable[..., torch.Tensor]] = {}


def _registrar(registry: dict[str, Callable[..., torch.Tensor]]):
    def register(name: str):
        def deco(fn):
            registry[name] = fn
            fn.registry_name = name
            return fn
        return deco
    return register


register_weight = _registrar(WEIGHT_BINARIZERS)
register_act = _registrar(ACT_QUANTIZERS)


def get_weight_binarizer(name: str) -> Callable[..., torch.Tensor]:
    if name not in WEIGHT_BINARIZERS:
        raise ValueError(f"unknown weight binarizer {name!r}; choose from {sorted(WEIGHT_BINARIZERS)}")
    return WEIGHT_BINARIZERS[name]


def get_act_quantizer(name: str) -> Callable[..., torch.Tensor]:
    if name not in ACT_QUANTIZERS:
        raise ValueError(f"unknown activation quantizer {name!r}; choose from {sorted(ACT_QUANTIZERS)}")
    return ACT_QUANTIZERS[name]


# ----------------------------------------------------------------------------------------------------------
# primitives


def sign(x: torch.Tensor) -> torch.Tensor:
    """Deployment sign: +1 for x >= 0, -1 otherwise (no gradient)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x >= 0, one, -one)


class _SignClippedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x.abs() <= ctx.clip).to(g.dtype), None


class _SignApproxSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.clamp(2.0 - 2.0 * x.abs(), min=0.0)


class _SignReSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, o, t, delta):
        ctx.save_for_backward(x)
        ctx.o, ctx.t, ctx.delta = o, t, delta
        return sign(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        o, t, delta = ctx.o, ctx.t, ctx.delta
        a = x.abs()
        inner = (1.0 / o) * a.clamp(min=delta).pow((1.0 - o) / o)
        small = delta ** (1.0 / o) / delta
        grad = torch.where(a <= delta, torch.full_like(a, small), inner)
        return g * torch.where(a > t, torch.zeros_like(a), grad), None, None, None


class _ScaledSign(torch.autograd.Function):
    """Forward exactly ``scale * sign(w)`` (no rounding from detach tricks); gradient to ``w`` only:
    ``g * 1{|w| <= clip}`` (``clip=None``: identity). ``scale`` gets no gradient."""

    @staticmethod
    def forward(ctx, w, scale, clip):
        ctx.save_for_backward(w)
        ctx.clip = clip
        return scale * sign(w)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        if ctx.clip is None:
            return g, None, None
        return g * (w.abs() <= ctx.clip).to(g.dtype), None, None


class _GradScale(torch.autograd.Function):
    """Identity forward (exact), gradient multiplied by ``scale`` (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _LSQ(torch.autograd.Function):
    """LSQ in one node: the forward and both gradients of :func:`lsq_autograd`, bit for bit, with a third of
    the elementwise passes and temporaries (the chain div -> clamp -> round -> mul costs more than the
    convolutions of a W1A4 step on CPU)."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale):
        v = x / step
        r = torch.clamp(v, qn, qp).round_()
        ctx.save_for_backward(v, r, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return r * step

    @staticmethod
    def backward(ctx, g):
        v, r, step = ctx.saved_tensors
        gx, g_step = _lsq_grads(g, v, r, step, ctx.qn, ctx.qp)
        return gx, g_step * ctx.grad_scale, None, None, None


def _lsq_grads(g: torch.Tensor, v: torch.Tensor, r: torch.Tensor, step: torch.Tensor, qn: float, qp: float):
    """d/dx and d/ds (before LSQ's gradient scale) from v = x/s and r = round(clamp(v)), op for op the chain's."""
    g_v = torch.where((v >= qn) & (v <= qp), g * step, 0.0)  # mul, round (identity), clamp
    return g_v / step, (g * r).sum_to_size(step.shape) + (-g_v * (v / step)).sum_to_size(step.shape)


def _lsq_forward(x: torch.Tensor, step: torch.Tensor, qn: float, qp: float) -> torch.Tensor:
    return torch.clamp(x / step, qn, qp).round() * step


def _lsq_backward(g: torch.Tensor, x: torch.Tensor, step: torch.Tensor, qn: float, qp: float):
    v = x / step
    return _lsq_grads(g, v, torch.clamp(v, qn, qp).round(), step, qn, qp)


_COMPILED: dict[str, Callable] = {}


class _LSQCompiled(torch.autograd.Function):
    """:class:`_LSQ` with its forward and backward each fused into one compiled loop (``torch.compile``,
    inductor's C++ on CPU): saves only x and recomputes x/s in the backward. The output and d/dx are bit for bit
    those of :class:`_LSQ`; d/ds is the same sum in another order (|diff| ~1e-4 of a sum over ~1e6 terms).
    ``train.kernels=compiled`` (docs/methods.md, "Training speed")."""

    @staticmethod
    def forward(ctx, x, step, qn, qp, grad_scale):
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return _compiled("forward")(x, step, float(qn), float(qp))

    @staticmethod
    def backward(ctx, g):
        x, step = ctx.saved_tensors
        gx, g_step = _compiled("backward")(g.contiguous(), x, step, float(ctx.qn), float(ctx.qp))
        return gx, g_step * ctx.grad_scale, None, None, None


def _sign_forward(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x + b >= 0, one, -one)


def _approx_sign_backward(g: torch.Tensor, x: torch.Tensor, b: torch.Tensor):
    gx = g * torch.clamp(2.0 - 2.0 * (x + b).abs(), min=0.0)
    return gx, gx.sum(dim=(0, 2, 3), keepdim=True) if b.ndim == 4 else None  # 0-d b: the constant 0, no gradient


def _ste_sign_backward(g: torch.Tensor, x: torch.Tensor, clip: float) -> torch.Tensor:
    return g * (x.abs() <= clip).to(g.dtype)


class _ApproxSignCompiled(torch.autograd.Function):
    """sign(x + b) with the ApproxSign gradient (Bi-Real Net; b = ReActNet / BiDM's learnable threshold, or a
    0-d zero) as one compiled loop forward and one backward. Output and d/dx bit for bit those of the eager
    chain (add -> sign, abs -> mul -> rsub -> clamp -> mul); d/db the same sum in another order."""

    @staticmethod
    def forward(ctx, x, b):
        ctx.save_for_backward(x, b)
        # detach(): a Parameter would be compiled with static shapes (one graph per channel count, then eager)
        return _compiled("sign_forward")(x, b.detach())

    @staticmethod
    def backward(ctx, g):
        x, b = ctx.saved_tensors
        gx, gb = _compiled("approx_sign_backward")(g.contiguous(), x, b.detach())
        return gx, (gb if ctx.needs_input_grad[1] else None)


class _SteSignCompiled(torch.autograd.Function):
    """sign(x) with the clipped straight-through gradient 1{|x| <= clip}, each direction one compiled loop;
    output and gradient bit for bit those of :class:`_SignClippedSTE`."""

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return _compiled("sign_forward")(x, torch.zeros((), dtype=x.dtype, device=x.device))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _compiled("ste_sign_backward")(g.contiguous(), x, float(ctx.clip)), None


_KERNEL_FNS = {"forward": _lsq_forward, "backward": _lsq_backward, "sign_forward": _sign_forward,
               "approx_sign_backward": _approx_sign_backward, "ste_sign_backward": _ste_sign_backward}


def _compiled(which: str) -> Callable:
    if which not in _COMPILED:  # compiled once per process, for every shape (dynamic), on first use
        _COMPILED[which] = torch.compile(_KERNEL_FNS[which], dynamic=True)
    return _COMPILED[which]


_KERNELS = {"mode": "eager"}
KERNELS = ("eager", "compiled")


class kernels:
    """``with kernels("compiled"):`` runs LSQ through :class:`_LSQCompiled` (``"eager"``: :class:`_LSQ`) and the
    1-bit activation signs (``ste_sign``, ``approx_sign``, ``rsign``) through their compiled nodes.
    A context, not a setting of the model: checkpoints and exports do not depend on it."""

    def __init__(self, mode: str):
        if mode not in KERNELS:
            raise ValueError(f"kernels={mode!r}; choose one of {KERNELS}")
        self.mode = mode

    def __enter__(self):
        self.previous, _KERNELS["mode"] = _KERNELS["mode"], self.mode
        return self

    def __exit__(self, *exc):
        _KERNELS["mode"] = self.previous


def ste_sign(x: torch.Tensor, clip_value: float = 1.0) -> torch.Tensor:
    """sign(x) forward; gradient 1{|x| <= clip_value} (clipped straight-through, Hubara et al. 2016)."""
    return _SignClippedSTE.apply(x, clip_value)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward; gradient max(0, 2 - 2|x|) (Bi-Real Net ApproxSign, Liu et al. 2018)."""
    return _SignApproxSTE.apply(x)


def _compiled_acts() -> bool:
    return _KERNELS["mode"] == "compiled"


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward; identity gradient."""
    return _RoundSTE.apply(x)


def _per_channel_mean_abs(w: torch.Tensor) -> torch.Tensor:
    return w.abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True)


# ----------------------------------------------------------------------------------------------------------
# weight binarizers


@register_weight("ste_sign")
def w_ste_sign(w: torch.Tensor) -> torch.Tensor:
    """Unscaled sign(W). Gradient 1{|W| <= 1}. (BNN, Hubara et al. 2016.)"""
    return ste_sign(w)


@register_weight("scaled_sign")
def w_scaled_sign(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """BinaryDM baseline: sigma * sign(W), sigma learnable per output channel (init mean|W|).

    Gradients: d/dW = sigma * 1{|W| <= 1}; d/dsigma = sign(W).
    Source: BinaryDM ``ours_util.py`` BNNConv2d order=1 (papers_impl.md §1.1).
    """
    return sigma * ste_sign(w)


@register_weight("magnitude_aware_sign")
def w_magnitude_aware_sign(w: torch.Tensor) -> torch.Tensor:
    """XNOR / ReActNet / BiDM: s * sign(W), s = mean|W| per output channel, detached (not learned).

    Gradient: d/dW = 1{|W| <= 1} (the clamp STE of ReActNet's HardBinaryConv; no s factor).
    Source: BiDM ``util_ours.py`` L66-71; ReActNet ``birealnet.py`` (papers_impl.md §1.3).
    """
    return _ScaledSign.apply(w, _per_channel_mean_abs(w).detach(), 1.0)


@register_weight("ebb")
def w_ebb(w: torch.Tensor, sigma1: torch.Tensor, sigma2: torch.Tensor | None) -> torch.Tensor:
    """BinaryDM Evolvable-Basis Binarizer: sigma1*sign(W) + sigma2*sign(W - sigma1*sign(W)).

    ``sigma2=None`` is EBB's stage 2 (one basis). Gradients: d/dW = sigma1*1{|W|<=1} +
    sigma2*1{|R|<=1}*(1 - sigma1*1{|W|<=1}) with R = W - sigma1*sign(W); d/dsigma1 = sign(W) -
    sigma2*1{|R|<=1}*sign(W); d/dsigma2 = sign(R). Source: BinaryDM Eq. 4-6 and ``ours_util.py`` order=2.
    """
    b1 = ste_sign(w)
    out = sigma1 * b1
    if sigma2 is None:
        return out
    r = w - sigma1 * b1
    return out + sigma2 * ste_sign(r)


@register_weight("dorefa")
def w_dorefa(w: torch.Tensor) -> torch.Tensor:
    """DoReFa 1-bit weights: E(|W|) * sign(W) with one scale per layer; identity gradient.

    Source: Zhou et al. 2016, k=1 weights (papers_impl.md §11).
    """
    return _ScaledSign.apply(w, w.abs().mean().detach(), None)


@register_weight("reste")
def w_reste(w: torch.Tensor, o: float = 1.0, t: float = 1.5, delta: float = 0.1) -> torch.Tensor:
    """ReSTE weights: m * sign(W), m = mean|W| over the whole tensor (detached).

    Gradient: (1/o)|W|^((1-o)/o) for delta < |W| <= t, delta^(1/o)/delta for |W| <= delta, 0 beyond t;
    ``o`` is annealed 1 -> 3 by the trainer. Source: ReSTE ``binarized_modules.py`` (papers_impl.md §11).
    """
    m = w.abs().mean().detach()
    return m * _SignReSTE.apply(w, o, t, delta)


# ----------------------------------------------------------------------------------------------------------
# activation quantizers


@register_act("identity")
def a_identity(x: torch.Tensor) -> torch.Tensor:
    """Full-precision activations (W1A32). Identity forward and gradient."""
    return x


@register_act("ste_sign")
def a_ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x), gradient 1{|x| <= 1}. Used by XNOR-Net and XNOR++ (Rastegari et al. 2016)."""
    return _SteSignCompiled.apply(x, 1.0) if _compiled_acts() else ste_sign(x)


@register_act("approx_sign")
def a_approx_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x), gradient max(0, 2 - 2|x|) (Bi-Real Net)."""
    if _compiled_acts():
        return _ApproxSignCompiled.apply(x, torch.zeros((), dtype=x.dtype, device=x.device))
    return approx_sign(x)


@register_act("rsign")
def a_rsign(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """ReActNet RSign: sign(x + b_c), b_c learnable per input channel ([1, C, 1, 1], init 0).

    Gradients (ApproxSign): d/dx = d/db_c = max(0, 2 - 2|x + b_c|). Source: ReActNet ``LearnableBias``;
    BiDM TBS threshold (papers_impl.md §2.2).
    """
    if _compiled_acts():
        return _ApproxSignCompiled.apply(x, threshold)
    return approx_sign(x + threshold)


@register_act("lsq")
def a_lsq(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ signed b-bit, per tensor: round(clamp(x/s, -2^(b-1), 2^(b-1)-1)) * s, s learned.

    Gradients (Esser et al. 2020): d/dx = 1 inside the clamp range, else 0; d/ds = (round(x/s) - x/s) inside,
    Qn or Qp outside, scaled by g = 1/sqrt(numel * Qp). s is a learned parameter (initialised once by
    calibration to 2 mean|x| / sqrt(Qp)); the official code re-initialises it every batch (a bug).
    """
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    fn = _LSQCompiled if _KERNELS["mode"] == "compiled" else _LSQ
    return fn.apply(x, step, qn, qp, 1.0 / math.sqrt(x.numel() * qp))


def lsq_autograd(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`a_lsq` written as a chain of autograd ops (the reference the fused version is tested against)."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = _GradScale.apply(step, 1.0 / math.sqrt(x.numel() * qp))
    return round_ste(torch.clamp(x / s, qn, qp)) * s


@register_act("dorefa")
def a_dorefa(x: torch.Tensor) -> torch.Tensor:
    """DoReFa 1-bit activations: round(clip(x, 0, 1)) in {0, 1}; gradient 1{0 <= x <= 1}.

    Not LCE-expressible (0/1 inputs fall back to float ops); kept for the paper's comparison table.
    """
    c = x.clamp(0.0, 1.0)
    return round_ste(c)


@register_act("reste")
def a_reste(x: torch.Tensor, o: float = 1.0, t: float = 1.5, delta: float = 0.1) -> torch.Tensor:
    """ReSTE activations: sign(x) with the ReSTE gradient (see ``w_reste``)."""
    return _SignReSTE.apply(x, o, t, delta)
