"""File sizes of exported .tflite models per U-Net preset: FP vs binarized (random weights are fine).

    python benchmarks/export_sizes.py [--preset cifar10] [--methods bidm,binarydm] [--fp-target keras-fp|fp]

Builds a random FP checkpoint of the preset, turns it into each method's binarized checkpoint with one QAT
step (on scikit-learn digits, so no download), exports everything, and prints a Markdown table of file
size, bit-packed binary bytes, float bytes, LceBconv2d count and the FP/binary size ratio. Also the papers'
theoretical ratio: 32 bits per FP weight vs 1 bit per binary weight + 32 per FP parameter left.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cifar10")
    ap.add_argument("--methods", default="bidm,binarydm")
    ap.add_argument("--fp-target", default="keras-fp", choices=["keras-fp", "fp"])
    ap.add_argument("--out", default=None, help="keep the exports here (default: a temp dir)")
    a = ap.parse_args()

    from bdmtool.trainer.binarize import binary_layers
    from bdmtool.trainer.checkpoint import atomic_save, make_checkpoint
    from bdmtool.trainer.spec import UNetConfig, build_train_spec
    from bdmtool.trainer.train import load_model, train
    from bdmtool.trainer.unet import UNet
    from bdmtool.tools.export import export_checkpoint

    torch.manual_seed(0)
    tmp = Path(a.out or tempfile.mkdtemp(prefix="bdm_sizes_"))
    channels = UNetConfig.from_name(a.preset).in_channels
    fp_spec = build_train_spec(a.preset, "digits", 1, [f"data.channels={channels}", "data.limit=8"])
    fp_ckpt = atomic_save(make_checkpoint(fp_spec, 0, UNet(fp_spec.unet).state_dict()), tmp / "fp.ckpt")
    rows = []
    t0 = time.perf_counter()
    fp = export_checkpoint(fp_ckpt, tmp / "fp", target=a.fp_target, name="fp", log=lambda s: None)
    rows.append(("fp", a.fp_target, fp.report, time.perf_counter() - t0, None))
    for m in a.methods.split(","):
        spec = build_train_spec(method=m, teacher=str(fp_ckpt), steps=1,
                                overrides=["train.batch_size=2", "data.limit=8", "binarize.ebb_stage2_step=0",
                                           "binarize.progressive=none"])  # every layer binary at once
        ckpt = train(spec, tmp / f"qat_{m}", progress=False)
        model, _, _ = load_model(ckpt)
        n_bin = sum(layer.weight.numel() for layer in binary_layers(model))
        n_all = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        res = export_checkpoint(ckpt, tmp / m, log=lambda s: None)
        rows.append((m, f"W1A{spec.binarize.abits}", res.report, time.perf_counter() - t0, (n_bin, n_all)))
    fp_bytes = rows[0][2]["file_bytes"]
    print(f"\npreset {a.preset}; exports in {tmp}\n")
    print("| model | bits | .tflite (KiB) | binary bytes (KiB) | float bytes (KiB) | LceBconv2d | FP / this | "
          "theory 32/(1·bin+32·rest) | export (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, bits, rep, secs, counts in rows:
        theory = "-" if counts is None else f"{32 * counts[1] / (counts[0] + 32 * (counts[1] - counts[0])):.1f}x"
        print(f"| {name} | {bits} | {rep['file_bytes'] / 1024:.0f} | {rep['binary_param_bytes'] / 1024:.0f} | "
              f"{rep['float_param_bytes'] / 1024:.0f} | {rep['bconv_ops']} | {fp_bytes / rep['file_bytes']:.1f}x | "
              f"{theory} | {secs:.0f} |")


if __name__ == "__main__":
    main()
