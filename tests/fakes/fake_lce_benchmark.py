"""Stands in for an ARM ``lce_benchmark_model`` on the fake device: reads the real ``.tflite`` it is given
and prints the real output format (TF 2.16: ``INFO: `` prefix, op-profiling tables without ``[start]``),
one row per operator of the flatbuffer with its real output tensor name. Timings are synthetic but
deterministic: every op costs 0.2 ms, ``LceBconv2d`` 0.05 ms, ``CONV_2D`` 0.4 ms."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path

COST = {"LceBconv2d": 0.05, "CONV_2D": 0.4}


def schema():
    root = next(Path(p) for p in sys.path if (Path(p) / "tensorflow" / "lite" / "python").is_dir())
    spec = importlib.util.spec_from_file_location("schema", root / "tensorflow/lite/python/schema_py_generated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # only needs flatbuffers: no TensorFlow import
    return mod


def ops_of(path: Path) -> list[tuple[str, str]]:
    s = schema()
    fb = path.read_bytes()
    m = s.Model.GetRootAsModel(fb, 0)
    sg = m.Subgraphs(0)
    builtin = {v: k for k, v in s.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    out = []
    for j in range(sg.OperatorsLength()):
        op = sg.Operators(j)
        oc = m.OperatorCodes(op.OpcodeIndex())
        name = oc.CustomCode().decode() if oc.CustomCode() else builtin[max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())]
        out.append((name, sg.Tensors(op.Outputs(0)).Name().decode()))
    return out


def main(argv: list[str]) -> int:
    if os.environ.get("FAKE_ADB_NOEXEC"):
        print(f"/system/bin/sh: {sys.argv[0]}: can't execute: Permission denied", file=sys.stderr)
        return 126
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    print("INFO: STARTING!")
    print(f"INFO: Log parameter values verbosely: [0]\nINFO: Min num runs: [{args.get('num_runs', 50)}]")
    print(f"INFO: Num threads: [{args.get('num_threads', -1)}]\nINFO: Graph: [{args.get('graph')}]")
    graph = Path(args.get("graph", ""))  # the fake adb already mapped /data/local/tmp into its filesystem
    if os.environ.get("FAKE_BENCH_FAIL") or not graph.is_file():
        print(f"ERROR: Could not open '{args.get('graph')}'.\nERROR: Failed to create model.", file=sys.stderr)
        return 1
    ops = ops_of(graph)
    total = sum(COST.get(t, 0.2) for t, _ in ops)
    runs = int(args.get("num_runs", 50))
    print(f"INFO: Loaded model {args['graph']}\nINFO: The input model file size (MB): {graph.stat().st_size / 1e6:.6g}")
    print("INFO: Initialized session in 12.5ms.")
    print("INFO: Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding "
          "150 seconds.")
    print(f"INFO: count=3 first={int(total * 1300)} curr={int(total * 1000)} min={int(total * 990)} "
          f"max={int(total * 1300)} avg={total * 1100:.6g} std=12\n")
    print(f"INFO: Running benchmark for at least {runs} iterations and at least 1 seconds but terminate if "
          "exceeding 150 seconds.")
    print(f"INFO: count={runs} first={int(total * 1000)} curr={int(total * 1000)} min={int(total * 990)} "
          f"max={int(total * 1010)} avg={total * 1000:.6g} std=3\n")
    print(f"INFO: Inference timings in us: Init: 12500, First inference: {int(total * 1300)}, "
          f"Warmup (avg): {total * 1100:.6g}, Inference (avg): {total * 1000:.6g}")
    print("INFO: Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE "
          "to the actual memory footprint of the model at runtime. Take the information at your discretion.")
    print("INFO: Memory footprint delta from the start of the tool (MB): init=3.5 overall=9.25")
    if args.get("enable_op_profiling") == "true":
        hdr = "\t%40s\t%16s\t%16s\t%16s\t%16s\t%16s\t%16s\t%s"
        print("INFO: Profiling Info for Benchmark Initialization:")
        print("============================== Run Order ==============================")
        print(hdr % ("[node type]", "[first]", "[avg ms]", "[%]", "[cdf%]", "[mem KB]", "[times called]", "[Name]"))
        print(hdr % ("AllocateTensors", "1.000", "1.000", "100.000%", "100.000%", "0.000", "1", "AllocateTensors/0"))
        print("INFO: Operator-wise Profiling Info for Regular Benchmark Runs:")
        print("============================== Run Order ==============================")
        print(hdr % ("[node type]", "[first]", "[avg ms]", "[%]", "[cdf%]", "[mem KB]", "[times called]", "[Name]"))
        cdf = 0.0
        for i, (t, name) in enumerate(ops):
            ms = COST.get(t, 0.2)
            cdf += 100 * ms / total
            print(hdr % (t, f"{ms:.3f}", f"{ms:.3f}", f"{100 * ms / total:.3f}%", f"{cdf:.3f}%", "0.000", "1",
                         f"[{name}]:{i}"))
        print("\n============================== Summary by node type ==============================")
        print("\t%40s\t%16s\t%16s\t%16s\t%16s\t%16s\t%16s" % ("[Node type]", "[count]", "[avg ms]", "[avg %]",
                                                               "[cdf %]", "[mem KB]", "[times called]"))
        for t, n in Counter(t for t, _ in ops).most_common():
            ms = COST.get(t, 0.2) * n
            print("\t%40s\t%16d\t%16.3f\t%15.3f%%\t%15.3f%%\t%16s\t%16d" % (t, n, ms, 100 * ms / total, 0, "0.000", n))
        print(f"\nTimings (microseconds): count={runs} first={int(total * 1000)} curr={int(total * 1000)} "
              f"min={int(total * 990)} max={int(total * 1010)} avg={total * 1000:.6g} std=3")
        print("Memory (bytes): count=0\n" f"{len(ops)} nodes observed\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
