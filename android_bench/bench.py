"""``run_bench``: time a binary model against its FP baseline (and every conv alone) on a phone or the host.

``device`` is ``local`` (the LCE Python interpreter on this machine) or ``adb:SERIAL``. Results are saved
after every measurement, so a device that disappears mid-run loses nothing already measured; the error
is recorded in ``results.json`` (status ``partial``) and raised as one line.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from . import results as R
from ..files import FileFormatError, atomic_write, file_sha256, read_json
from .adb import DeviceError
from .options import BenchOptions


def make_runner(device: str, opts: BenchOptions, benchmark_binary: str | None = None):
    if device == "local":
        from .host import HostRunner

        return HostRunner(opts)
    if device.startswith("adb:") and len(device) > 4:
        from .device import DeviceRunner

        return DeviceRunner(device[4:], opts, benchmark_binary=benchmark_binary)
    raise ValueError(f"--device {device!r}: use 'local' or 'adb:SERIAL' (serials: `adb devices`)")


def _layers_from_ops(ops: list[dict]) -> dict[str, float]:
    from bdmtool.exporter.inspect_tflite import layer_of

    per = defaultdict(float)
    for op in ops:
        layer = layer_of(op["outputs"][0]) if op["type"] in ("LceBconv2d", "CONV_2D", "FULLY_CONNECTED",
                                                   "DEPTHWISE_CONV_2D") else None
        if layer:
            per[layer] += op["avg_ms"]
    return dict(per)


def _is_binary(path: Path) -> bool:
    from bdmtool.exporter.inspect_tflite import inspect_file

    return inspect_file(path).histogram.get("LceBconv2d", 0) > 0


def run_bench(model: str | Path | None, baseline: str | Path | None, device: str, out_dir: str | Path,
              opts: BenchOptions | None = None, convs: str | Path | None = None,
              benchmark_binary: str | None = None, log=print) -> dict:
    opts = opts or BenchOptions()
    out = Path(out_dir)
    paths = {role: Path(p) for role, p in (("binary", model), ("baseline", baseline)) if p}
    for role, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"{role} model {p} does not exist")
    if len(paths) == 2 and file_sha256(paths["binary"]) == file_sha256(paths["baseline"]):
        raise ValueError(f"{model} and --baseline {baseline} are the same model (equal sha256): the speedup would "
                         "compare it with itself; pass the FP .tflite (`bdmtool export CKPT --target fp`) as --baseline")
    conv_index, conv_files = None, []
    if convs:
        idx = Path(convs) / "convs.json" if Path(convs).is_dir() else Path(convs)
        if not idx.is_file():
            raise FileNotFoundError(f"{idx}: no micro-model index; write one with `bdmtool export CKPT --target convs`")
        conv_index = read_json(idx, "micro-model index written by `bdmtool export CKPT --target convs`")
        try:
            for s in conv_index["shapes"].values():
                conv_files += [idx.parent / s["binary"], idx.parent / s["fp"]]
        except (KeyError, TypeError, AttributeError):
            raise FileFormatError(f"{idx} has no valid 'shapes' table (each with 'binary' and 'fp' files); "
                                  "re-create it with `bdmtool export CKPT --target convs`") from None
    if not paths and not conv_index:
        raise ValueError("nothing to benchmark: give a model, --baseline and/or --convs")

    runner = make_runner(device, opts, benchmark_binary)
    if hasattr(runner, "prepare"):
        runner.prepare([*paths.values(), *conv_files])
    res = R.new_results(runner.info(), opts.to_dict())
    path = out / "results.json"
    try:
        for role, p in paths.items():
            log(f"[bench] {role}: {p.name} on {res['target']['label']}")
            m = runner.measure(p, binary=_is_binary(p))
            m.update(path=str(p), sha256=file_sha256(p), size_bytes=p.stat().st_size)
            if m.get("ops"):
                m["layers"] = _layers_from_ops(m["ops"])
            res["models"][role] = m
            R.save(res, path)
        if conv_index:
            timed = {}
            for key, s in tqdm(conv_index["shapes"].items(), desc="per-conv", unit="shape"):
                b = runner.measure(idx.parent / s["binary"], binary=True, profile=False)["latency"]
                f = runner.measure(idx.parent / s["fp"], binary=False, profile=False)["latency"]
                timed[key] = (b, f)
                res["convs"] = [{"layer": ly["name"], "shape": ly["shape"], "binary_in_model": ly["binary_in_model"],
                                 "binary": timed[ly["shape"]][0], "fp": timed[ly["shape"]][1],
                                 "speedup": timed[ly["shape"]][1]["median_ms"] / timed[ly["shape"]][0]["median_ms"]}
                                for ly in conv_index["layers"] if ly["shape"] in timed]
                R.save(res, path)
    except (DeviceError, KeyboardInterrupt) as e:
        res["error"] = str(e) or type(e).__name__
        R.save(res, path)
        raise
    R.finish(res)
    R.save(res, path)
    atomic_write(out / "results.md", R.markdown(res))
    R.chart(res, out / "convs.png")
    log(f"[bench] wrote {path}, {out / 'results.md'}" + (f", {out / 'convs.png'}" if res["convs"] else ""))
    return res
