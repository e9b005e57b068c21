"""QAT training-step time per method and precision, relative to an FP training step of the same U-Net and batch.

    python benchmarks/qat_step.py [--preset tiny] [--batch 32] [--repeats 5] [--methods binarydm,bidm,...]
                                  [--modes fp32,bf16,fp32+compiled,bf16+compiled+channels_last,...]

Each row times the full step the trainer runs (schedule, TBS cache pass, student forward, teacher forward
and distillation terms, backward, AdamW) with median over ``--repeats`` after one warm-up step, inside the
same autocast context as ``bdmtool train`` (``train.precision``), and for ``+compiled`` modes with the
quantizers' compiled kernels (``train.kernels=compiled``; the first steps compile them, outside the timing),
for ``+channels_last`` modes with student, teacher and batch in NHWC (``train.memory_format=channels_last``),
for ``+teacher_bf16`` modes with the teacher's forward in bf16 autocast (``distill.teacher_precision=bf16``).
Columns: the step, QAT / FP at the same precision and layout (the FP step has no quantizers, so its kernels
do not matter), QAT / FP against the eager-fp32 FP step (the issue-14 yardstick), and the speed-up over eager fp32 for
the same method, all from one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bdmtool.trainer.checkpoint import atomic_save, make_checkpoint
from bdmtool.trainer.diffusion import Diffusion
from bdmtool.trainer.objective import TrainingObjective
from bdmtool.trainer.quantizers import kernels
from bdmtool.trainer.runtime import autocast, to_layout
from bdmtool.trainer.spec import METHODS, TrainSpec, UNetConfig, build_train_spec
from bdmtool.trainer.train import build_student


def training_setup(spec: TrainSpec, batch: int, layout: str = "contiguous"):
    """The trainer's pieces for ``spec`` on one fixed random batch in ``layout``, prepared (LSQ steps, LRM
    projections): (student, teacher, objective, optimizer, (x0, t, noise))."""
    torch.manual_seed(0)
    model, teacher = build_student(spec)
    for net in (model, teacher):
        if net is not None:
            to_layout(net, layout)
    objective = TrainingObjective(spec, Diffusion(spec.diffusion), model, teacher)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    c, r = spec.unet.in_channels, spec.unet.resolution
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(batch, c, r, r, generator=g) * 2 - 1, torch.randn(batch, c, r, r, generator=g)
    x0, noise = to_layout(x0, layout), to_layout(noise, layout)
    t = torch.randint(0, spec.diffusion.timesteps - 1, (batch,), generator=g)
    objective.prepare(x0, t, noise)
    return model, teacher, objective, opt, (x0, t, noise)


def _parse_mode(mode: str) -> tuple[str, str, str, str]:
    """``PRECISION[+compiled][+channels_last][+teacher_bf16]`` as (precision, kernels, layout, teacher precision);
    exits naming a bad mode."""
    precision, *flags = mode.split("+")
    if precision not in ("fp32", "bf16") or set(flags) - {"compiled", "channels_last", "teacher_bf16"}:
        raise SystemExit(f"mode {mode!r}: PRECISION[+compiled][+channels_last][+teacher_bf16], PRECISION fp32 or "
                         "bf16")
    return (precision, "compiled" if "compiled" in flags else "eager",
            "channels_last" if "channels_last" in flags else "contiguous",
            "bf16" if "teacher_bf16" in flags else "step")


def _time_steps(spec: TrainSpec, batch: int, repeats: int, mode: str = "fp32") -> float:
    precision, kernel, layout, teacher_precision = _parse_mode(mode)
    spec = spec.replace(distill=spec.distill.replace(teacher_precision=teacher_precision))
    model, _, objective, opt, (x0, t, noise) = training_setup(spec, batch, layout)

    def step(i: int) -> None:
        with autocast(precision, torch.device("cpu")), kernels(kernel):
            loss = objective(model, x0, t, noise, i)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2 if kernel == "compiled" else 1):  # warm-up, every schedule stage on (all layers binary)
        step(10**6)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(10**6)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fp_mode(mode: str) -> str:
    """The FP step a QAT mode is compared with: the same precision and layout (an FP step has no quantizers
    and no teacher, so the kernels and the teacher's precision do not apply to it)."""
    return "+".join(f for f in mode.split("+") if f not in ("compiled", "teacher_bf16"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default="fp32,bf16,fp32+compiled,bf16+compiled",
                    help="PRECISION[+compiled][+channels_last], comma-separated")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    for m in modes:
        _parse_mode(m)  # refuse a bad mode before any timing
    torch.manual_seed(0)
    from bdmtool.trainer.unet import UNet

    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher.ckpt"
        fp_spec = build_train_spec(a.preset, "mnist5k" if UNetConfig.from_name(a.preset).in_channels == 1 else "digits")
        atomic_save(make_checkpoint(fp_spec, 0, UNet(fp_spec.unet).state_dict()), teacher)
        fp_modes = list(dict.fromkeys(_fp_mode(m) for m in modes))
        fp = {p: _time_steps(fp_spec, a.batch, a.repeats, p) for p in fp_modes}  # the same loop, no binarization
        rows = [("fp", 32, p, fp[p]) for p in fp_modes]
        for m in a.methods.split(","):
            spec = build_train_spec(method=m, teacher=str(teacher))
            rows += [(m, spec.binarize.abits, p, _time_steps(spec, a.batch, a.repeats, p)) for p in modes]
    print(f"\npreset {a.preset}, batch {a.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| method | W/A bits | mode | step (s) | QAT / FP (same precision and layout) | QAT / FP fp32 "
          "| speed-up vs fp32 |")
    print("|---|---|---|---:|---:|---:|---:|")
    for m, abits, p, s in rows:
        own = next(x[3] for x in rows if x[0] == m and x[2] == "fp32")
        print(f"| {m} | {'32/32' if m == 'fp' else f'1/{abits}'} | {p} | {s:.3f} | {s / fp[_fp_mode(p)]:.2f} | "
              f"{s / fp['fp32']:.2f} | {own / s:.2f}× |")


if __name__ == "__main__":
    main()
