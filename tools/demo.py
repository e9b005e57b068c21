"""``bdmtool demo``: the product end to end on the embedded default model, as resumable stages.

Stages (each writes ``OUT/<stage>/`` and a ``done.json`` with its parameters; a re-run skips every stage
whose ``done.json`` matches, so an interrupted demo continues where it stopped):

1. ``fp``: DDIM samples of the embedded FP model + FID against MNIST-5k;
2. ``student_<name>``: the same for every shipped binarized student (``bdmtool/assets/tiny_mnist_<name>.ckpt``,
   trained from the embedded teacher by ``scripts/make_assets.sh``);
3. ``qat_binarydm_w1a4``: a short QAT run from the embedded teacher, to show that training works;
4. ``export_*``: the FP model through ONNX -> onnx2tf, the shipped students to LCE ``.tflite`` (op inventory and
   parity verified by the exporter), then the same DDIM sampling through the LCE interpreter, and its FID;
5. ``bench``: host latency of every ``.tflite`` (android_bench host path) and of every conv alone; and with
   ``device='adb:SERIAL'`` the same on a phone;
6. the report: ``OUT/index.html`` and ``OUT/report.md`` built from the stages' JSON.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import bdmtool
from bdmtool.files import atomic_write, file_sha256

METHOD_LABELS = {"binarydm": "BinaryDM", "bidm": "BiDM", "xnor": "XNOR", "xnorpp": "XNOR++", "dorefa": "DoReFa",
                 "reactnet": "ReActNet", "reste": "ReSTE", "bbcu": "BBCU", "baseline": "Baseline"}

EMBEDDED_FP = Path(bdmtool.ASSETS) / "tiny_mnist_fp.ckpt"
QAT_RUNS = (("binarydm", 4, "BinaryDM W1A4, short QAT"),)
STUDENTS = ("binarydm_w1a8", "binarydm_w1a4", "bidm_w1a1", "xnor_w1a1")  # scripts/make_assets.sh


def student_path(name: str) -> Path:
    return Path(bdmtool.ASSETS) / f"tiny_mnist_{name}.ckpt"


@dataclass(frozen=True)
class DemoBudget:
    """What the demo spends; ``scaled(k)`` multiplies the QAT steps and sample counts (``--budget k``)."""

    qat_steps: int = 200
    qat_batch: int = 16
    n_samples: int = 64  # per model, for the grids and FID (PyTorch and .tflite alike)
    n_reference: int = 500  # MNIST-5k images for the FID reference statistics
    steps: int = 50  # DDIM steps
    seed: int = 0
    bench_runs: int = 10
    clip_x0: bool = True  # every sampler (PyTorch and .tflite) clamps the predicted x0 to [-1, 1]
    students: tuple[str, ...] = STUDENTS  # which shipped students to sample, export and benchmark

    def __post_init__(self):  # refused in the first second, not at the stage that would fail after minutes
        for flag, v, low in (("--qat-steps", self.qat_steps, 1), ("--qat-batch", self.qat_batch, 1),
                             ("--n", self.n_samples, 2), ("--steps", self.steps, 1), ("bench runs", self.bench_runs, 1)):
            if v < low:
                raise ValueError(f"{flag} must be >= {low}{' (FID needs two samples)' if flag == '--n' else ''}, "
                                 f"got {v}")
        if self.steps > 1000:
            raise ValueError(f"--steps must be in [1, 1000] (the embedded model's training timesteps), got {self.steps}")

    def scaled(self, k: float) -> "DemoBudget":
        if not k > 0 or k == float("inf"):
            raise ValueError(f"--budget must be a finite number > 0, got {k}")
        return DemoBudget(max(1, round(self.qat_steps * k)), self.qat_batch, max(4, round(self.n_samples * k)),
                          min(5000, max(16, round(self.n_reference * k))), self.steps, self.seed, self.bench_runs,
                          self.clip_x0, self.students)


@dataclass
class Stage:
    name: str
    params: dict
    run: Callable[[Path], dict]  # writes into its folder, returns a summary (JSON-able)


@dataclass
class DemoResult:
    out: Path
    summaries: dict = field(default_factory=dict)


def _run_stage(stage: Stage, out: Path, log: Callable[[str], None]) -> dict:
    folder = out / stage.name
    marker = folder / "done.json"
    if marker.exists():
        done = json.loads(marker.read_text())
        if done.get("params") == json.loads(json.dumps(stage.params)):  # as stored: tuples become lists
            log(f"[{stage.name}] already done, reusing {folder}")
            return done["summary"]
        shutil.rmtree(folder)  # made from other inputs (a new checkpoint, budget or recipe): start afresh
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{stage.name}] running ...")
    t0 = time.perf_counter()
    summary = stage.run(folder)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write(marker, json.dumps({"params": stage.params, "summary": summary}, indent=2))
    log(f"[{stage.name}] done in {summary['seconds']} s")
    return summary


def _environment() -> dict:
    import larq_compute_engine
    import numpy
    import tensorflow
    import torch

    from bdmtool.android_bench.host import host_info

    return {"python": sys.version.split()[0], "bdmtool": bdmtool.__version__, "torch": torch.__version__,
            "tensorflow": tensorflow.__version__, "larq-compute-engine": larq_compute_engine.__version__,
            "numpy": numpy.__version__, "cpu": host_info()["cpu"], "machine": platform.machine(),
            "torch threads": torch.get_num_threads()}


def run_demo(out: str | Path = "report", budget: DemoBudget = DemoBudget(), device: str | None = None,
             benchmark_binary: str | None = None, log: Callable[[str], None] = print) -> DemoResult:
    """Run every stage into ``out`` and write ``out/index.html`` + ``out/report.md``."""
    from bdmtool.android_bench.bench import run_bench
    from bdmtool.android_bench.options import BenchOptions
    from bdmtool.tools.export import INT8_OUT_DEFAULT, MULTIBIT_DEFAULT, export_checkpoint, export_convs
    from bdmtool.tools.sample_tflite import sample_tflite
    from bdmtool.trainer import fid
    from bdmtool.trainer.data import load_images, load_npz
    from bdmtool.trainer.metrics import read_metrics
    from bdmtool.trainer.checkpoint import checkpoint_spec, load_checkpoint
    from bdmtool.trainer.sampling import SampleOptions, sample_checkpoint
    from bdmtool.trainer.spec import BinarizeConfig, DataConfig, build_train_spec
    from bdmtool.trainer.train import train

    if device:  # a phone that is not there must fail now, not after the training and export stages
        from bdmtool.android_bench.bench import make_runner

        make_runner(device, BenchOptions(), benchmark_binary=benchmark_binary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = budget
    opts = SampleOptions(n=b.n_samples, steps=b.steps, seed=b.seed, batch_size=min(b.n_samples, 128),
                         clip_x0=b.clip_x0)
    sample_args = f"--n {b.n_samples} --steps {b.steps} --seed {b.seed}" + ("" if b.clip_x0 else " --no-clip-x0")
    ref_cache: dict = {}

    def reference():
        if "ref" not in ref_cache:
            images = load_images(DataConfig(source="mnist5k", limit=b.n_reference))
            ref_cache["ref"] = fid.reference_stats(images, {"reference": "mnist5k", "resolution": 32, "channels": 1,
                                                            "limit": b.n_reference}, out / ".cache")
        return ref_cache["ref"]

    def score(npz: Path) -> dict:
        m = fid.compare(load_npz(str(npz)), reference())
        return {k: m[k] for k in ("fid", "sfid", "precision", "recall", "n_samples", "n_reference")}

    eval_cmd = f"bdmtool eval {{src}} --ref mnist5k --ref-limit {b.n_reference} {sample_args}"

    def fp_stage(folder: Path) -> dict:
        png, npz = sample_checkpoint(EMBEDDED_FP, folder / "samples", opts)
        return {"label": "FP (embedded)", "bits": "W32A32", "ckpt": str(EMBEDDED_FP), "grid": str(png.relative_to(out)),
                "metrics": score(npz), "command": f"bdmtool sample {sample_args} --out samples && "
                                                  + eval_cmd.format(src="bdmtool/assets/tiny_mnist_fp.ckpt")}

    def qat_stage(method: str, abits: int, label: str):
        def run(folder: Path) -> dict:
            overrides = [f"train.batch_size={b.qat_batch}", "train.log_every=10",
                         f"train.ckpt_every={max(b.qat_steps // 4, 1)}"]
            spec = build_train_spec(method=method, abits=abits, teacher=str(EMBEDDED_FP), steps=b.qat_steps,
                                    overrides=overrides)
            t0 = time.perf_counter()
            ckpt = train(spec, folder / "run")
            train_s = time.perf_counter() - t0
            png, npz = sample_checkpoint(ckpt, folder / "samples", opts)
            rows = read_metrics(folder / "run" / "metrics.jsonl")
            sets = " ".join(f"--set {o}" for o in overrides)
            return {"label": label, "bits": f"W1A{abits}", "ckpt": str(ckpt), "grid": str(png.relative_to(out)),
                    "loss_png": str((folder / "run" / "loss.png").relative_to(out)), "metrics": score(npz),
                    "final_loss": rows[-1]["loss"], "train_seconds": round(train_s, 1), "steps": b.qat_steps,
                    "command": (f"bdmtool train --method {method} --abits {abits} --steps {b.qat_steps} {sets} "
                                f"--out run && " + eval_cmd.format(src="run/model.ckpt"))}
        return run

    def export_stage(source: str, target: str, name: str, may_refuse: bool = False):
        def run(folder: Path) -> dict:
            try:
                res = export_checkpoint(source, folder, target=target, name=name, log=log)
            except ValueError as e:  # a shipped student the exporter refuses: reported, not hidden, not fatal
                if not may_refuse:
                    raise
                log(f"[demo] export of {name} refused: {e}")
                return {"refused": str(e), "command": f"bdmtool export {source} --out export"}
            t0 = time.perf_counter()
            png, npz = sample_tflite(res.tflite, folder / "samples", opts)
            rep = res.report
            return {"tflite": str(res.tflite), "file_bytes": rep["file_bytes"], "bconv_ops": rep["bconv_ops"],
                    "binary_param_bytes": rep["binary_param_bytes"], "float_param_bytes": rep["float_param_bytes"],
                    "parity": rep["stages"], "grid": str(png.relative_to(out)), "metrics": score(npz),
                    "tflite_sampling_seconds": round(time.perf_counter() - t0, 1),
                    "command": (f"bdmtool export CKPT --target {target} --name {name} --out export && "
                                f"bdmtool sample --tflite export/{name}.tflite {sample_args} --out samples")}
        return run

    def student_stage(name: str, ckpt: Path):
        def run(folder: Path) -> dict:
            ck = load_checkpoint(ckpt)
            spec = checkpoint_spec(ck)
            png, npz = sample_checkpoint(ckpt, folder / "samples", opts)
            label = f"{METHOD_LABELS.get(spec.binarize.method, spec.binarize.method)} W1A{spec.binarize.abits}"
            extra = {}
            loss = ckpt.with_name(ckpt.stem + "_loss.png")  # the training curve make_assets.sh ships beside it
            if loss.is_file():
                shutil.copyfile(loss, folder / "loss.png")
                extra["loss_png"] = str((folder / "loss.png").relative_to(out))
            return {**extra, "label": label, "bits": f"W1A{spec.binarize.abits}", "ckpt": str(ckpt),
                    "method": spec.binarize.method, "abits": spec.binarize.abits, "steps": ck["step"], "grid": str(png.relative_to(out)), "metrics": score(npz),
                    "command": f"bdmtool sample {ckpt.relative_to(Path(bdmtool.ASSETS).parents[1])} {sample_args} "
                               f"--out samples && " + eval_cmd.format(src=f"bdmtool/assets/{ckpt.name}")}
        return run

    students = {n: student_path(n) for n in b.students if student_path(n).is_file()}
    for n in b.students:
        if n not in students:
            log(f"[demo] shipped student {n} not found ({student_path(n)}): build it with "
                f"`ONLY={n} STAGE=students scripts/make_assets.sh`; skipping it")
    sha = {n: file_sha256(ckpt) for n, ckpt in students.items()}
    stages = [Stage("fp", {"budget": asdict(b)}, fp_stage)]
    for n, ckpt in students.items():
        stages.append(Stage(f"student_{n}", {"budget": asdict(b), "sha256": sha[n]},
                            student_stage(n, ckpt)))
    for method, abits, label in QAT_RUNS:
        recipe = BinarizeConfig.from_method(method, abits).to_dict()  # a changed default trains again
        stages.append(Stage(f"qat_{method}_w1a{abits}", {"budget": asdict(b), "recipe": recipe},
                            qat_stage(method, abits, label)))
    result = DemoResult(out)
    for st in stages:
        result.summaries[st.name] = _run_stage(st, out, log)

    exports = [Stage("export_fp", {"budget": asdict(b)}, export_stage(str(EMBEDDED_FP), "fp", "fp"))]
    for n, ckpt in students.items():
        kernel = MULTIBIT_DEFAULT.get(f"a{result.summaries[f'student_{n}']['abits']}")  # W1A8 / W1A4 layers
        exports.append(Stage(f"export_{n}", {"budget": asdict(b), "sha256": sha[n], "int8_out": INT8_OUT_DEFAULT,
                                             **({"kernel": kernel} if kernel else {})},  # a new default re-exports
                             export_stage(str(ckpt), "lce", n, may_refuse=True)))
    for st in exports:
        result.summaries[st.name] = _run_stage(st, out, log)

    def bench_stage(dev: str):
        def run(folder: Path) -> dict:
            bopts = BenchOptions(runs=b.bench_runs, repeats=3, warmup_runs=3)
            fp_tfl = result.summaries["export_fp"]["tflite"]
            summary = {"device": dev, "models": {}}
            for tag in [n for n in students if "refused" not in result.summaries[f"export_{n}"]]:
                label = result.summaries[f"student_{tag}"]["label"]
                res = run_bench(result.summaries[f"export_{tag}"]["tflite"], fp_tfl, dev, folder / tag, bopts,
                                benchmark_binary=benchmark_binary, log=log)
                summary["models"][tag] = {"label": label, "binary_ms": res["models"]["binary"]["latency"]["median_ms"],
                                          "fp_ms": res["models"]["baseline"]["latency"]["median_ms"],
                                          "speedup": res["speedup"], "target": res["target"]["label"],
                                          "results": str((folder / tag / "results.json").relative_to(out))}
            ok = [n for n in ("bidm_w1a1", *students) if n in students
                  and "refused" not in result.summaries[f"export_{n}"]]
            conv_src = str(students[ok[0]]) if ok else None
            summary["convs_source"] = conv_src
            if conv_src is None:
                return summary
            index = export_convs(conv_src, folder, log=lambda s: None)
            res = run_bench(None, None, dev, folder / "convs_bench", bopts, convs=index,
                            benchmark_binary=benchmark_binary, log=log)
            sel = [c for c in res["convs"] if c["binary_in_model"]]
            summary["convs"] = {"chart": str((folder / "convs_bench" / "convs.png").relative_to(out)),
                                "table": str((folder / "convs_bench" / "results.md").relative_to(out)),
                                "layers": len(res["convs"]), "binary_layers": len(sel),
                                "fp_ms": sum(c["fp"]["median_ms"] for c in sel),
                                "binary_ms": sum(c["binary"]["median_ms"] for c in sel)}
            first = next(iter(students), "bidm_w1a1")
            summary["command"] = (f"bdmtool bench export/{first}.tflite --baseline export/fp.tflite --device {dev} && "
                                  f"bdmtool export CKPT --target convs --out x && "
                                  f"bdmtool bench --convs x/convs --device {dev}")
            return summary
        return run

    devices = ["local"] + ([device] if device else [])
    for dev in devices:
        name = "bench_host" if dev == "local" else "bench_" + dev.replace(":", "_")
        tflites = [result.summaries[k].get("tflite") for k in result.summaries if k.startswith("export_")]
        # keyed by the files' contents: a re-exported model (same path, new student) is timed again
        params = {"budget": asdict(b), "exports": [[t, file_sha256(t) if t and Path(t).exists() else None]
                                                   for t in tflites]}
        result.summaries[name] = _run_stage(Stage(name, params, bench_stage(dev)), out, log)

    result.summaries["ops"] = _ops_summary({n: result.summaries[f"student_{n}"] for n in students})
    from .report import write_report

    write_report(result.out, result.summaries, _environment(), asdict(b))
    log(f"report: {out / 'index.html'} (and report.md)")
    return result


def _ops_summary(students: dict[str, dict]) -> dict:
    """Theoretical size / OPs of each demo model (the accountant on the tiny preset, binarized by each model's
    method; ``students``: name -> its stage summary)."""
    from bdmtool.tools.ops import account

    rows = {"fp": account(preset="tiny", wbits=32, abits=32)}
    for method, abits, _ in QAT_RUNS:
        rows[f"qat_{method}_w1a{abits}"] = account(preset="tiny", wbits=1, abits=abits, method=method)
    for n, st in students.items():
        rows[n] = account(preset="tiny", wbits=1, abits=st["abits"], method=st["method"])
    return {k: {"size_mib": v["size_mib"], "gops": v["ops"] / 1e9} for k, v in rows.items()}
