"""W1A8 kernels side by side: LceBconv2d bit planes (the default, exact) vs int8 CONV_2D vs the FP baseline.

    python benchmarks/w1a8_kernels.py [--ckpt W1A8.ckpt | --steps 200] [--n 64] [--ref-limit 500] [--out DIR]

Without ``--ckpt`` it trains a BinaryDM W1A8 student from the embedded FP teacher exactly like the demo's
QAT stages (batch 16). Then it exports the FP teacher (onnx2tf), the student with ``--a8 int8`` and with
``--a8 bitplanes``, times each .tflite on this host (android_bench host protocol: LCE interpreter, XNNPACK for
float/int8, indirect BGEMM for bconvs, 1 thread) and, with ``--n > 0``, samples ``--n`` images through each
model (DDIM-50, seed 0) and the PyTorch student for FID against the first ``--ref-limit`` MNIST-5k images.
Prints one Markdown table. Host numbers, not a phone's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="a BinaryDM W1A8 checkpoint (default: train one)")
    ap.add_argument("--steps", type=int, default=200, help="QAT steps when training the student")
    ap.add_argument("--n", type=int, default=64, help="samples per model for FID (0: skip)")
    ap.add_argument("--ref-limit", type=int, default=500)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="keep everything here (default: a temp dir)")
    a = ap.parse_args()

    from bdmtool import ASSETS
    from bdmtool.android_bench.host import HostRunner
    from bdmtool.android_bench.options import BenchOptions
    from bdmtool.tools.evaluate import evaluate
    from bdmtool.tools.export import export_checkpoint
    from bdmtool.trainer.sampling import SampleOptions
    from bdmtool.trainer.spec import build_train_spec
    from bdmtool.trainer.train import train

    root = Path(a.out or tempfile.mkdtemp(prefix="bdm_w1a8_"))
    quiet = lambda s: None  # noqa: E731
    ckpt = a.ckpt
    if ckpt is None:
        spec = build_train_spec(method="binarydm", abits=8, teacher=str(Path(ASSETS) / "tiny_mnist_fp.ckpt"),
                                steps=a.steps, overrides=["train.batch_size=16"])
        ckpt = str(train(spec, root / "qat", progress=True))
    exports = {"FP teacher (onnx2tf)": export_checkpoint(ckpt, root / "fp", target="fp", log=quiet),
               "W1A8 int8 CONV_2D": export_checkpoint(ckpt, root / "int8", a8="int8", log=quiet),
               "W1A8 bit planes": export_checkpoint(ckpt, root / "bitplanes", a8="bitplanes", log=quiet)}
    runner = HostRunner(BenchOptions(threads=1, runs=a.runs, repeats=a.repeats, warmup_runs=3))
    ms = {k: runner.measure(r.tflite, binary=r.report["bconv_ops"] > 0)["latency"]["median_ms"]
          for k, r in exports.items()}
    fids = {}
    if a.n:
        opts = SampleOptions(n=a.n, steps=50, seed=0, batch_size=min(a.n, 128))
        fids["PyTorch student"] = evaluate(ckpt, root / "eval_pytorch", opts, ref_limit=a.ref_limit, log=quiet)["fid"]
        for k, r in exports.items():
            if k.startswith("W1A8"):
                fids[k] = evaluate(r.tflite, root / f"eval_{r.tflite.stem}", opts, ref_limit=a.ref_limit,
                                   log=quiet)["fid"]
    fp_ms = ms["FP teacher (onnx2tf)"]
    print(f"\nBinaryDM W1A8 student {ckpt}; host: {runner.info()['cpu']}, 1 thread; exports in {root}\n")
    fid_head = f" FID ({a.n} vs {a.ref_limit}) |" if a.n else ""
    print(f"| model | .tflite KiB | LceBconv2d | int8 CONV_2D | max \\|d eps\\| vs PyTorch | host ms | FP / this |"
          + fid_head)
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if a.n else ""))
    for k, r in exports.items():
        rep = r.report
        fid = (f" {fids[k]:.1f} |" if k in fids else " - |") if a.n else ""
        print(f"| {k} | {rep['file_bytes'] / 1024:,.0f} | {rep['bconv_ops']} | {rep.get('int8_conv_ops', 0)} | "
              f"{rep['stages']['tflite_vs_pytorch']:.2g} | {ms[k]:.2f} | {fp_ms / ms[k]:.2f}x |{fid}")
    if "PyTorch student" in fids:
        print(f"| PyTorch student (reference) | | | | 0 | | | {fids['PyTorch student']:.1f} |")


if __name__ == "__main__":
    main()
