"""``bdmtool pack``: a small inference checkpoint of a binarized model (sign bits + per-channel scales).

The packed file samples and exports like the original: it is rebuilt and compared on seeded inputs across the
timestep range before it is written (max |d eps| below ``tol`` on every input certified free of near-boundary
values, and on at least half of all inputs).
"""

from __future__ import annotations

from pathlib import Path


def pack_checkpoint(src: str | Path, out: str | Path, tol: float = 1e-4, min_margin: float = 3e-6,
                    log=print) -> dict:
    import math

    import torch

    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"--tol must be a positive number (the largest |d eps| accepted), got {tol}")
    from bdmtool.trainer.binarize import packable_weights, reset_state
    from bdmtool.trainer.bundle import reference_inputs
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
    # Compared on inputs whose every pre-quantization value keeps min_margin from a decision boundary (as
    # export certifies its reference inputs): mean|W| recomputed from +-mean|W| differs by an ulp, which may
    # flip a bit of a value closer than that, and a binary network amplifies one flip. Every certified input
    # must match to tol, and at least half of all inputs.
    x, t, _, margins = reference_inputs(model, spec, n_ref=8, seed=0, min_margin=min_margin)
    with torch.no_grad():
        errs = []
        for i in range(len(x)):
            reset_state(model)
            reset_state(twin)
            errs.append(float((model(x[i:i + 1], t[i:i + 1]) - twin(x[i:i + 1], t[i:i + 1])).abs().max()))
    certified = [e for e, m in zip(errs, margins.tolist()) if m >= min_margin]
    matching = sum(e <= tol for e in errs)
    err = max(certified) if certified else max(errs)
    if (certified and err > tol) or matching < len(errs) / 2:
        raise ValueError(f"the packed model differs from {src}: max |d eps| {err:.2e} on {len(certified)} certified "
                         f"of {len(errs)} inputs, {matching} of them within {tol}; not written")
    path = atomic_save(packed, out)
    load_checkpoint(path)  # readable as any checkpoint
    before, after = Path(src).stat().st_size, path.stat().st_size
    log(f"[pack] {len(names)} binary weight tensors as bits: {before / 1024:,.0f} KiB -> {after / 1024:,.0f} KiB; "
        f"max |d eps| vs the original {err:.1e} ({len(certified)} of {len(errs)} inputs certified, {matching} match)")
    return {"layers": len(names), "bytes": after, "max_abs_diff": err, "certified": len(certified),
            "matching": matching}
