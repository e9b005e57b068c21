"""BiDM's QAT step with and without its two exact rewrites, side by side in one run.

    python benchmarks/bidm_step.py [--preset tiny] [--batch 32] [--repeats 5] [--precisions fp32,bf16]

The rewrites (both equal to the original up to float summation order, tests/test_binarize.py and
tests/test_qat.py): SPD over all patches of a feature in one batched product, in fp32 under bf16 autocast
(``spd_loss`` vs the per-patch loop ``spd_loss_reference``), and the cross-timestep cache pass ending at its
last site (``TimestepCache.stop_when_filled``). Rows: the SPD term alone (forward + backward on the student's
real feature shapes), the cache pass alone, and the whole training step (schedule, cache pass, student,
teacher, SPD, backward, AdamW), each as before / after with the speed-up; medians over ``--repeats`` after a
warm-up. The teacher is a freshly initialised FP U-Net (timing does not depend on its weights).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bdmtool.trainer import objective as objective_module
from bdmtool.trainer.checkpoint import atomic_save, make_checkpoint
from bdmtool.trainer.distill import spd_loss, spd_loss_reference
from bdmtool.trainer.runtime import autocast
from bdmtool.trainer.spec import UNetConfig, build_train_spec
from bdmtool.trainer.unet import UNet
from fp_step import _median_time  # benchmarks/ is on sys.path when run as a script
from qat_step import training_setup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--precisions", default="fp32,bf16")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = Path(tmp) / "teacher.ckpt"
        fp_spec = build_train_spec(a.preset, "mnist5k" if UNetConfig.from_name(a.preset).in_channels == 1 else "digits")
        torch.manual_seed(0)
        atomic_save(make_checkpoint(fp_spec, 0, UNet(fp_spec.unet).state_dict()), teacher)
        spec = build_train_spec(method="bidm", teacher=str(teacher))
        model, tmodel, obj, opt, (x0, t, noise) = training_setup(spec, a.batch)
        cache = model.tbs_cache
        with torch.no_grad():  # the student's and the teacher's real features at the SPD sites
            model(x0, t)
            tmodel(x0, t)
        fs = {k: v.detach().clone() for k, v in obj.s_tap.features.items()}
        ft = {k: v.detach().clone() for k, v in obj.t_tap.features.items()}
        obj.s_tap.clear()
        obj.t_tap.clear()

        def variant(before: bool) -> None:
            objective_module.spd_loss = spd_loss_reference if before else spd_loss
            cache.stop_when_filled = not before

        for prec in a.precisions.split(","):
            def spd_term(impl=None):
                leaves = {k: v.clone().requires_grad_() for k, v in fs.items()}
                with autocast(prec, torch.device("cpu")):
                    loss = impl({k: v * 1.0 for k, v in leaves.items()}, ft, spec.distill.spd_patches,
                                spec.distill.spd_variant)
                loss.backward()

            def cache_pass():
                with autocast(prec, torch.device("cpu")):
                    cache.record(model, x0, t)

            def step():
                with autocast(prec, torch.device("cpu")):
                    loss = obj(model, x0, t, noise, 10**6)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for name, fn in (("SPD term (fwd + bwd)", None), ("cache pass", cache_pass), ("whole step", step)):
                times = []
                for before in (True, False):
                    variant(before)
                    if fn is None:
                        times.append(_median_time(lambda: spd_term(spd_loss_reference if before else spd_loss), a.repeats))
                    else:
                        times.append(_median_time(fn, a.repeats))
                rows.append((name, prec, *times))
        variant(False)
    print(f"\nBiDM W1A1, preset {a.preset}, batch {a.batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| part | precision | before (s) | after (s) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for name, prec, before, after in rows:
        print(f"| {name} | {prec} | {before:.3f} | {after:.3f} | {before / after:.2f}× |")


if __name__ == "__main__":
    main()
