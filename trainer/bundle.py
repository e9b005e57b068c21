"""The hand-off from PyTorch to the exporter: a folder the TensorFlow side reads without torch.

``write_bundle(ckpt, out)`` writes

- ``spec.json``: the checkpoint's TrainSpec, its sha256, and one record per binarized layer
  (name, kernel/stride/padding, activation bits and quantizer, which parameters exist);
- ``weights.npz``: every float tensor of the (EMA) state dict under its PyTorch name, plus for each binary
  layer the *deployable* weights ``<name>.sign1`` (int8 +-1) and ``<name>.scale1`` [C_out] (and
  ``sign2``/``scale2`` while EBB keeps its second basis), and the DC path's deployed per-timestep tables
  ``dc_bypass.<gain|remove|offset|shrink|skip>`` (``DCBypass.tables()``, zeros where the mode has none);
- ``reference_io.npz``: inputs ``x`` [N, C, H, W], ``t`` [N] and the PyTorch outputs ``eps`` that each
  export stage is checked against.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_savez, atomic_write, file_sha256
from .binarize import BinaryConv2d, binary_layers, reset_state
from .quantizers import sign

BUNDLE_VERSION = 1


def _layer_record(m: BinaryConv2d) -> dict:
    return {"name": m.name, "linear": m.is_linear, "in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel": m.kernel_size, "stride": m.stride, "padding": m.padding, "abits": m.cfg.abits,
            "act": m.cfg.act, "weight": m.weight_fn.registry_name, "active": bool(m.active),
            "two_bases": m.sigma2 is not None and bool(m.second_basis), "bias": m.bias is not None,
            "threshold": m.threshold is not None, "lsq_step": m.uses_lsq,
            "lsq_mode": m.cfg.lsq_step, "act_pad": m.cfg.act_pad, "act_scale": m.cfg.act_scale if m.k_conv is not None else "none",
            "output_scale": m.gamma_o is not None, "post": m.cfg.post if m.post is not None else "none",
            "shortcut": m.shortcut_kind, "shortcut_conv": m.shortcut_conv is not None}


@torch.no_grad()
def _deployable(m: BinaryConv2d) -> dict[str, np.ndarray]:
    """sign/scale of the binary weights: w_b = scale1[o] * sign1 (+ scale2[o] * sign2)."""
    w = m.weight4d()
    out = {}
    if m.weight_fn.registry_name == "ebb" or m.sigma1 is not None:
        s1 = m.sigma1.reshape(-1)
        b1 = sign(w)
        out["sign1"], out["scale1"] = b1, s1
        if m.sigma2 is not None and bool(m.second_basis):
            out["sign2"], out["scale2"] = sign(w - m.sigma1 * b1), m.sigma2.reshape(-1)
    else:
        wb = m.binary_weight()
        mag = wb.abs().amax(dim=(1, 2, 3))
        out["sign1"], out["scale1"] = sign(wb), mag
    if m.uses_lsq and m.cfg.lsq_step != "per_batch":
        out["step"] = m.learned_step().reshape(())  # the deployed constant (exp(log_step) in log mode)
    return {k: (v.to(torch.int8) if k.startswith("sign") else v.float()).cpu().numpy() for k, v in out.items()}


def _fp_param_count(spec) -> int:
    """Parameters of the full-precision U-Net of this architecture (what an FP32 export stores)."""
    from .unet import UNet, count_parameters

    with torch.device("meta"):
        return count_parameters(UNet(spec.unet))


@torch.no_grad()
def _layer_outputs(model: torch.nn.Module, layers: list, x: torch.Tensor, t: torch.Tensor) -> dict[str, np.ndarray]:
    """``layer_out::<name>`` -> the output of each binary layer for one input (a first step: caches reset)."""
    outs: dict[str, np.ndarray] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=m.name: outs.__setitem__(n, out.float().numpy()))
             for m in layers]
    try:
        reset_state(model)
        model(x, t)
    finally:
        for h in hooks:
            h.remove()
        reset_state(model)
    return {f"layer_out::{n}": v for n, v in outs.items()}


@torch.no_grad()
def write_bundle(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, n_ref: int = 4, seed: int = 0,
                 use_ema: bool = True, min_margin: float = 3e-6) -> Path:
    from .train import load_model

    model, spec, ckpt = load_model(ckpt_path, use_ema=use_ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = binary_layers(model)
    cache = getattr(model, "tbs_cache", None)
    meta = {"bundle_version": BUNDLE_VERSION, "spec": spec.to_dict(), "kind": ckpt.get("kind", "fp"),
            "step": ckpt["step"], "source_checkpoint": str(ckpt_path), "source_sha256": file_sha256(ckpt_path),
            "binary_layers": [_layer_record(m) for m in layers],
            "timestep_cache": None if cache is None else {"sites": cache.sites, "buckets": cache.buckets},
            "fp32_weight_bytes": 4 * _fp_param_count(spec)}
    atomic_write(out / "spec.json", json.dumps(meta, indent=2))
    arrays = {k: v.float().cpu().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    for m in layers:
        arrays.update({f"{m.name}.{k}": v for k, v in _deployable(m).items()})
    if (bypass := getattr(model, "dc_bypass", None)) is not None:  # the deployed tables (raw x their lr scale)
        arrays.update({f"dc_bypass.{k}": v.detach().float().cpu().numpy() for k, v in bypass.tables().items()})
    atomic_savez(out / "weights.npz", **arrays)
    x, t, eps, margins = reference_inputs(model, spec, n_ref, seed, min_margin)

    def envelope_of(run, reference, margin: float, k: int) -> float:  # 0 for a certified input: nothing may flip
        return 0.0 if margin >= min_margin else flip_envelope(model, run, reference, min_margin, seed=seed + k)

    envelope = [envelope_of(lambda i=i: model(x[i:i + 1], t[i:i + 1]), eps[i:i + 1], float(m), i)
                for i, m in enumerate(margins)]
    extra = {}
    if cache is not None:  # a second sampling step that mixes with the cache of the first (x[0], t[0])
        def cached_step():
            model(x[:1], t[:1])
            return model(x[1:2], t[1:2])

        reset_state(model)
        eps2 = cached_step()
        extra = {"x2": x[1:2].numpy(), "t2": t[1:2].numpy(), "eps2": eps2.numpy(),
                 "cache_sites": np.array(cache.sites)}
        envelope.append(envelope_of(cached_step, eps2, float(margins[:2].min()), n_ref))
        reset_state(model)
    if layers:  # every binary layer's output on the first reference input, for `export --per-layer`
        extra.update(_layer_outputs(model, layers, x[:1], t[:1]))
    atomic_savez(out / "reference_io.npz", x=x.numpy(), t=t.numpy(), eps=eps.numpy(), margin=margins.numpy(),
                 envelope=np.array(envelope, dtype=np.float64), **extra)
    meta["reference_min_margin"] = float(margins.min()) if len(margins) else None
    atomic_write(out / "spec.json", json.dumps(meta, indent=2))
    return out


@torch.no_grad()
def flip_envelope(model, run, reference: torch.Tensor, jitter: float, draws: int = 16, seed: int = 0) -> float:
    """How far the model's own output moves when every quantizer input moves by at most ``jitter``.

    ``run()`` computes the output (``reference``) from a fresh state; it is repeated ``draws`` times with a
    uniform perturbation in [-jitter, jitter] added to the input of every binary layer, and the largest
    max |d out| is returned. Two float implementations that agree to ``jitter`` before each quantizer (what
    certification assumes of PyTorch, Keras and TFLite) may legitimately differ by this much on an input with
    values that close to a decision boundary: the export gate allows an uncertified input a difference of this
    order (exporter/pipeline.py). A lower bound of the true spread (a finite number of draws)."""
    g = torch.Generator().manual_seed(seed)

    def jittered(mod, inp):
        x = inp[0]
        return (x + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * jitter, *inp[1:])

    hooks = [m.register_forward_pre_hook(jittered) for m in binary_layers(model)]
    spread = 0.0
    try:
        for _ in range(draws):
            reset_state(model)
            spread = max(spread, float((run() - reference).abs().max()))
    finally:
        for h in hooks:
            h.remove()
        reset_state(model)
    return spread


def certify_chance(margins: list[float], min_margin: float, tries_left: int, slack: float = 3.0) -> float:
    """Estimated chance that ``tries_left`` more draws find an input with margin >= ``min_margin``.

    An input's margin is the minimum, over ~1e5-1e6 pre-quantization values, of each value's distance to its
    nearest decision boundary; the minimum of many independent distances whose density near 0 is positive has an
    exponential tail, P(M >= m) = exp(-lam m). The rate is estimated from the best margin of the n draws so far
    (the expected maximum of n exponential draws is H_n / lam, H_n the harmonic number), so draws that are
    hopeless for another reason (a timestep whose time-embedding path alone sits on a boundary) do not hide a
    good tail. The draws are a mixture (the search also steps t, and the time-embedding path's margin depends on
    t alone), so the tail is assumed ``slack`` times heavier than the best draw suggests (measured: a micro XNOR
    model's best margin at one timestep was 9.6e-7 after 20 draws and 4.9e-6 after 128). The chance of a success
    is then 1 - (1 - exp(-lam min_margin)) ** tries_left. Used to stop a search that cannot succeed (multi-bit
    activations: ~15-255 boundaries per value, best margins ~1e-7); certification keeps its meaning: an input
    is certified only when its measured margin is >= min_margin."""
    if not margins:
        return 1.0
    best = max(margins)
    if best >= min_margin:
        return 1.0
    if best <= 0:
        return 0.0
    rate = sum(1.0 / k for k in range(1, len(margins) + 1)) / (slack * best)
    return 1.0 - (1.0 - math.exp(-rate * min_margin)) ** tries_left


@torch.no_grad()
def reference_inputs(model, spec, n_ref: int, seed: int, min_margin: float, max_tries: int = 128,
                     probe: int = 8, give_up_below: float = 0.01):
    """Reference inputs for export parity: timesteps spread over [T-1, 0], noise drawn until every binary
    layer's pre-quantization values keep ``min_margin`` from a decision boundary (so float reordering in
    another framework cannot flip a bit). After ``probe`` draws, the search for one timestep stops when
    ``certify_chance`` of the remaining draws is below ``give_up_below`` (the best input is kept, uncertified).
    Returns x, t, eps and each sample's margin."""
    layers = binary_layers(model)
    u = spec.unet
    g = torch.Generator().manual_seed(seed)
    ts = torch.linspace(spec.diffusion.timesteps - 1, 0, n_ref).round()
    xs, epss, margins = [], [], []
    T = spec.diffusion.timesteps
    chosen_t = []
    for base in ts:
        best, seen = None, []
        for k in range(max_tries):
            if k >= probe and certify_chance(seen, min_margin, max_tries - k) < give_up_below:
                break
            # the time-embedding path depends on t alone, so the search also steps t by a few units
            t = (base + (k % 8) * (-1 if base > T // 2 else 1)).clamp(0, T - 1)
            x = torch.randn(1, u.in_channels, u.resolution, u.resolution, generator=g)
            margin = torch.tensor(float("inf"))

            def track(mod, inp, margin=margin) -> None:  # a pre-hook must return None (else it replaces inputs)
                margin.copy_(torch.minimum(margin, mod.decision_margin(inp[0]).min()))

            hooks = [m.register_forward_pre_hook(track) for m in layers]
            reset_state(model)
            eps = model(x, t[None])
            for h in hooks:
                h.remove()
            seen.append(float(margin))
            if best is None or margin > best[2]:
                best = (x, eps, margin.clone(), t)
            if margin >= min_margin:
                break
        xs.append(best[0]), epss.append(best[1]), margins.append(best[2]), chosen_t.append(best[3])
    return torch.cat(xs), torch.stack(chosen_t), torch.cat(epss), torch.stack(margins)
