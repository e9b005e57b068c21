"""``bdmtool pack``: a small inference checkpoint of a binarized model (sign bits + per-channel scales).

The packed file samples and exports like the original: it is rebuilt and compared on seeded random inputs
across the timestep range before it is written (max |d eps| must stay below ``tol``).
"""

from __future__ import annotations

from pathlib import Path


def pack_checkpoint(src: str | Path, out: str | Path, tol: float = 1e-4, log=print) -> dict:
    import torch

    from bdmtool.trainer.binarize import packable_weights, reset_state
    from bdmtool.trainer.checkpoint import atomic_save, load_checkpoint, pack_weights, unpack_weights
    from bdmtool.trainer.train import build_model, load_model

    model, spec, ckpt = load_model(src)
    if spec.binarize is None:
        raise ValueError(f"{src} is a full-precision checkpoint; pack is for binarized students")
    names = packable_weights(model)
    packed = pack_weights({**ckpt, "model": model.state_dict()}, names)
    twin = build_model(spec)
    twin.load_state_dict(unpack_weights(packed))
    twin.eval()
    u = spec.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, u.in_channels, u.resolution, u.resolution, generator=g)
    t = torch.linspace(0, spec.diffusion.timesteps - 1, 8).round()
    with torch.no_grad():
        reset_state(model)
        reset_state(twin)
        err = float((model(x, t) - twin(x, t)).abs().max())
    if not err <= tol:
        raise ValueError(f"the packed model differs from {src} by {err:.2e} > {tol} (max |d eps|); not written")
    path = atomic_save(packed, out)
    load_checkpoint(path)  # readable as any checkpoint
    before, after = Path(src).stat().st_size, path.stat().st_size
    log(f"[pack] {len(names)} binary weight tensors as bits: {before / 1024:,.0f} KiB -> {after / 1024:,.0f} KiB; "
        f"max |d eps| vs the original {err:.1e}")
    return {"layers": len(names), "bytes": after, "max_abs_diff": err}
