"""Wall time of `bdmtool export` per stage, alone and next to a busy process (issue 15).

    python benchmarks/export_speed.py [--cases fp,fp_keras,w1a4_bitplanes,w1a4_int8,w1a8_int8,w1a8_bitplanes,bidm_w1a1] [--no-busy]

Each case is one `bdmtool export` of a shipped tiny checkpoint (bdmtool/assets/) in a fresh process, the way a
user runs it. The exporter prints every stage with its elapsed seconds; a stage's time is the gap between the
line that ends it and the previous line ("start-up" is the interpreter, torch and the checkpoint load before
the first line). Then the same export runs while a second process keeps the cores busy (a torch matmul loop at
torch's default thread count: a training or a notebook a user left running). Columns: seconds per stage alone,
total alone, total next to the busy process, and their ratio. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import bdmtool  # sets no threads and imports no torch or TensorFlow

ASSETS = Path(bdmtool.ASSETS)
CASES = OrderedDict([
    ("fp", ("tiny_mnist_fp.ckpt", ["--target", "fp"])),
    ("fp_keras", ("tiny_mnist_fp.ckpt", ["--target", "keras-fp"])),
    ("w1a4_bitplanes", ("tiny_mnist_binarydm_w1a4.ckpt", ["--a4", "bitplanes"])),
    ("w1a4_int8", ("tiny_mnist_binarydm_w1a4.ckpt", ["--a4", "int8"])),
    ("w1a8_int8", ("tiny_mnist_binarydm_w1a8.ckpt", ["--a8", "int8"])),
    ("w1a8_bitplanes", ("tiny_mnist_binarydm_w1a8.ckpt", ["--a8", "bitplanes"])),
    ("bidm_w1a1", ("tiny_mnist_bidm_w1a1.ckpt", [])),
])
LINE = re.compile(r"^\s*(\d+\.\d+) s\s+\[([a-z0-9_]+)\]")
# stage tags as the exporter prints them -> the column they count in
COLUMN = {"preflight": "preflight", "bundle": "bundle", "onnx": "bundle", "keras": "keras",
          "keras_vs_pytorch": "keras", "lce": "convert", "onnx2tf": "convert", "calibrate": "calibrate",
          "tflite_vs_keras": "verify", "tflite_vs_pytorch": "verify", "per_layer": "verify"}
COLUMNS = ["start-up", "preflight", "bundle", "keras", "convert", "calibrate", "verify"]
BUSY = ("import torch\nx = torch.randn(512, 512)\nwhile True:\n    x = torch.tanh(x @ x) \n")


def export_once(ckpt: Path, args: list[str]) -> tuple[float, dict[str, float]]:
    """One export in a fresh process; returns (wall seconds, seconds per column). A stage's time is the gap
    between the line that ends it and the previous line; "start-up" is the rest of the wall time (interpreter,
    imports and the checkpoint load before the exporter's clock starts, the final file writes after it)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "bdmtool.tools.cli", "export", str(ckpt), "--out", out, *args],
                           capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:]
        raise SystemExit(f"export of {ckpt.name} {' '.join(args)} failed: {tail}")
    cols = dict.fromkeys(COLUMNS, 0.0)
    prev = 0.0
    for line in (r.stdout + "\n" + r.stderr).splitlines():
        if m := LINE.match(line):
            t, tag = float(m.group(1)), m.group(2)
            col = "calibrate" if tag == "lce" and "calibrat" in line else COLUMN.get(tag, "verify")
            cols[col] += t - prev
            prev = t
    cols["start-up"] = wall - prev
    return wall, cols


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--no-busy", action="store_true", help="only the idle column")
    a = p.parse_args()
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}: choose from {list(CASES)}")
    print(f"tiny preset exports; {os.cpu_count()} cores; python {sys.version.split()[0]}\n")
    head = "| export | " + " | ".join(COLUMNS) + " | total alone (s) | next to a busy process (s) | ratio |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for c in cases:
        fname, args = CASES[c]
        ckpt = ASSETS / fname
        if not ckpt.exists():
            print(f"| {c} | missing {ckpt} (build it with scripts/make_assets.sh) |", flush=True)
            continue
        wall, cols = export_once(ckpt, args)
        if not a.no_busy:
            busy = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(3)  # let the competitor reach its loop
                busy_wall, _ = export_once(ckpt, args)
            finally:
                busy.kill()
                busy.wait()
        cells = " | ".join(f"{cols[k]:.1f}" for k in COLUMNS)
        busy_cells = "– | –" if a.no_busy else f"{busy_wall:.1f} | {busy_wall / wall:.2f}x"
        print(f"| {c} | {cells} | {wall:.1f} | {busy_cells} |", flush=True)


if __name__ == "__main__":
    main()
