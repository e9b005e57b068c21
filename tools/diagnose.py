"""``bdmtool diagnose``: per-timestep eps-MSE and DC pass-through of students next to their FP teacher."""

from __future__ import annotations

import json
from pathlib import Path

from bdmtool.files import atomic_write


def diagnose(ckpts: list[str], out: str | Path, teacher: str | None = None, n: int = 256, seed: int = 0,
             timesteps: tuple[int, ...] | None = None, log=print) -> dict:
    from bdmtool.trainer.data import load_images
    from bdmtool.trainer.diagnostics.passthrough import (DEFAULT_TIMESTEPS, high_t_slope, markdown_table,
                                                         passthrough_report, plot_passthrough)
    from bdmtool.trainer.diffusion import Diffusion
    from bdmtool.trainer.train import load_model

    if not ckpts:
        raise ValueError("diagnose needs at least one checkpoint")
    loaded = {}
    for c in ckpts:
        model, spec, _ = load_model(c)
        loaded[c] = (model, spec)
    first_spec = loaded[ckpts[0]][1]
    if teacher is None:
        recorded = next(((c, s.teacher) for c, (_, s) in loaded.items() if s.teacher), None)
        teacher = recorded_teacher(*recorded) if recorded else None
    if teacher in loaded:
        raise ValueError(f"--teacher {teacher} is also one of the checkpoints to diagnose; pass the FP teacher")
    models, reference = {}, None
    if teacher and teacher not in loaded:
        tmodel, tspec, _ = load_model(teacher)
        if tspec.binarize is not None:
            raise ValueError(f"--teacher {teacher} is a binarized ({tspec.binarize.method}) checkpoint; the teacher "
                             "is the full-precision model the students were trained from")
        if tspec.unet != first_spec.unet:
            raise ValueError(f"--teacher {teacher} has a different U-Net than {ckpts[0]}")
        reference = f"teacher ({Path(teacher).name})"
        models[reference] = tmodel
    for c, (model, spec) in loaded.items():
        if spec.unet != first_spec.unet or spec.diffusion != first_spec.diffusion:
            raise ValueError(f"{c} and {ckpts[0]} have different U-Nets or schedules; diagnose them separately")
        label = spec.binarize.method + f" W1A{spec.binarize.abits}" if spec.binarize else "fp"
        models[f"{label} ({Path(c).parent.name or Path(c).name})"] = model
    images = load_images(first_spec.data)
    ts = tuple(timesteps) if timesteps else DEFAULT_TIMESTEPS
    if any(not 0 <= t < first_spec.diffusion.timesteps for t in ts):
        raise ValueError(f"--timesteps must lie in [0, {first_spec.diffusion.timesteps - 1}]")
    log(f"[diagnose] {len(models)} models x {len(ts)} timesteps x {min(n, len(images))} images ...")
    rep = passthrough_report(models, Diffusion(first_spec.diffusion), images, ts, n=n, seed=seed, reference=reference)
    rep["high_t_slope"] = {k: high_t_slope(v) for k, v in rep["models"].items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "diagnose.json", json.dumps(rep, indent=2))
    atomic_write(out / "diagnose.md", markdown_table(rep) + "\n")
    png = plot_passthrough(rep, out / "diagnose.png")
    for k, v in rep["high_t_slope"].items():
        mse_hi = [r["mse"] for r in rep["models"][k] if r["t"] >= 500]
        if v is None:
            log(f"[diagnose] {k}: no probed t >= 500 (see the table for each t)")
        else:
            worst = max((r for r in rep["models"][k] if r["t"] >= 500 and "dc_gap" in r), default=None,
                        key=lambda r: r["dc_gap"])
            gap = (f"; largest gap to the teacher at t={worst['t']}: {worst['dc_gap']:.2f} ± {worst['dc_gap_se']:.3f}"
                   if worst else "")
            log(f"[diagnose] {k}: DC slope at t>=500 {v:.2f}, eps-MSE at t>=500 {sum(mse_hi) / len(mse_hi):.4f}{gap}")
    log(f"[diagnose] wrote {out / 'diagnose.json'}, {out / 'diagnose.md'} and {png}")
    return rep


def recorded_teacher(student: str | Path, recorded: str) -> str:
    """The teacher path a student's spec records, found from here, or else relative to a folder above the student
    (a spec written in a checkout records ``bdmtool/assets/...`` relative to it) or next to it."""
    rec = Path(recorded)
    if rec.is_file():
        return recorded
    here = Path(student).resolve().parent
    candidates = [] if rec.is_absolute() else [d / rec for d in (here, *here.parents)]
    for c in [*candidates, here / rec.name]:
        if c.is_file():
            return str(c)
    raise ValueError(f"the teacher recorded in {student} ({recorded}) is not here, above or next to it; pass "
                     "--teacher FP_CHECKPOINT")
