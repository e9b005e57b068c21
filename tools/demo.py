"""``bdmtool demo``: the product end to end on the embedded default model, as resumable stages.

Each stage writes its outputs under ``OUT/<stage>/`` and a ``done.json`` recording its parameters;
a re-run skips every stage whose ``done.json`` matches, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bdmtool

EMBEDDED_FP = Path(bdmtool.ASSETS) / "tiny_mnist_fp.ckpt"


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
        if done.get("params") == stage.params:
            log(f"[{stage.name}] already done, reusing {folder}")
            return done["summary"]
    folder.mkdir(parents=True, exist_ok=True)
    log(f"[{stage.name}] running ...")
    t0 = time.perf_counter()
    summary = stage.run(folder)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps({"params": stage.params, "summary": summary}, indent=2))
    log(f"[{stage.name}] done in {summary['seconds']} s")
    return summary


def _environment() -> dict:
    import numpy
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "bdmtool": bdmtool.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


QAT_RUNS = (("binarydm", 4, "BinaryDM W1A4"), ("bidm", 1, "BiDM W1A1"))


def run_demo(out: str | Path = "report", n_samples: int = 64, steps: int = 50, seed: int = 0,
             qat_steps: int = 200, qat_batch: int = 32, log: Callable[[str], None] = print) -> DemoResult:
    """Run the demo's stages into ``out`` and write ``out/report.md``.

    Stages: FP samples of the embedded model; for BinaryDM W1A4 and BiDM W1A1 a ``qat_steps``-step QAT
    from the embedded teacher (the trainer resumes an interrupted run) and its samples.
    """
    from bdmtool.trainer.metrics import read_metrics
    from bdmtool.trainer.sampling import SampleOptions, sample_checkpoint
    from bdmtool.trainer.spec import build_train_spec
    from bdmtool.trainer.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    opts = SampleOptions(n=n_samples, steps=steps, seed=seed)
    sample_cmd = f"--n {n_samples} --steps {steps} --seed {seed}"

    def fp_samples(folder: Path) -> dict:
        png, npz = sample_checkpoint(EMBEDDED_FP, folder / "samples", opts)
        return {"label": "FP (embedded)", "bits": "W32A32", "grid": str(png.relative_to(out)),
                "command": f"bdmtool sample {sample_cmd} --out samples"}

    def qat(method: str, abits: int, label: str):
        def run(folder: Path) -> dict:
            overrides = [f"train.batch_size={qat_batch}", "train.log_every=10", f"train.ckpt_every={max(qat_steps // 4, 1)}"]
            spec = build_train_spec(method=method, abits=abits, teacher=str(EMBEDDED_FP), steps=qat_steps,
                                    overrides=overrides)
            t0 = time.perf_counter()
            ckpt = train(spec, folder / "run")
            train_s = time.perf_counter() - t0
            png, npz = sample_checkpoint(ckpt, folder / "samples", opts)
            rows = read_metrics(folder / "run" / "metrics.jsonl")
            sets = " ".join(f"--set {o}" for o in overrides)
            return {"label": label, "bits": f"W1A{abits}", "grid": str(png.relative_to(out)),
                    "loss_png": str((folder / "run" / "loss.png").relative_to(out)),
                    "final_loss": rows[-1]["loss"], "train_seconds": round(train_s, 1), "steps": qat_steps,
                    "command": (f"bdmtool train --method {method} --abits {abits} --steps {qat_steps} {sets} "
                                f"--out run && bdmtool sample run/model.ckpt {sample_cmd} --out samples")}
        return run

    stages = [Stage("fp_samples", {"ckpt": EMBEDDED_FP.name, **opts.__dict__}, fp_samples)]
    for method, abits, label in QAT_RUNS:
        stages.append(Stage(f"qat_{method}_w1a{abits}", {"steps": qat_steps, "batch": qat_batch, **opts.__dict__},
                            qat(method, abits, label)))
    result = DemoResult(out)
    for st in stages:
        result.summaries[st.name] = _run_stage(st, out, log)
    _write_report(result, _environment())
    log(f"report: {out / 'report.md'}")
    return result


def _write_report(result: DemoResult, env: dict) -> None:
    rows = list(result.summaries.values())
    lines = ["# bdmtool demo report", "",
             "Tiny U-Net (1.52 M parameters) on MNIST-5k 32x32: the embedded full-precision model and binarized",
             "students trained from it by quantization-aware training. DDIM samples, same seed for every model.", "",
             "| model | bits | QAT steps | QAT time (s) | final loss | samples |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['bits']} | {r.get('steps', '-')} | {r.get('train_seconds', '-')} | "
                     f"{r['final_loss']:.4f} | ![]({r['grid']}) |" if "final_loss" in r else
                     f"| {r['label']} | {r['bits']} | - | - | - | ![]({r['grid']}) |")
    lines += ["", "## Training loss", ""]
    lines += [f"**{r['label']}**: ![loss]({r['loss_png']})" for r in rows if "loss_png" in r]
    lines += ["", "## Reproduce", ""] + [f"- {r['label']}: `{r['command']}`" for r in rows]
    lines += ["", "## Environment", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
    (result.out / "report.md").write_text("\n".join(lines))
