"""The ``bdmtool`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

import bdmtool  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)

DEFAULT_CKPT = Path(bdmtool.ASSETS) / "tiny_mnist_fp.ckpt"


class _UserError(click.ClickException):
    """Shown as one line 'Error: ...' with exit code 1, never a traceback."""


def _friendly(fn):
    """Turn the library's validation errors (ValueError and subclasses, missing files) into one-line errors."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            raise _UserError(_one_line(str(e))) from None
        except OSError as e:  # an output folder under a file, no permission, a full disk: name the path
            where = f"{e.filename}: " if e.filename else ""
            raise _UserError(f"{where}{e.strerror or e} (check the path, its permissions and the free disk space; "
                             "nothing was left half-written)") from None
    return wrapper


def _one_line(text: str) -> str:
    """Errors are one line: multi-line library messages are joined."""
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(bdmtool.__version__, prog_name="bdmtool")
def cli() -> None:
    """bdmtool: binarized diffusion models from PyTorch to a 1-bit LCE .tflite on Android."""
    from bdmtool.trainer.runtime.threads import choose_threads

    try:  # before torch / TensorFlow load: take only the cores other processes leave idle
        note = choose_threads().note
    except ValueError as e:
        raise _UserError(str(e)) from None
    if note:
        click.echo(note, err=True)


@cli.command()
@click.option("--preset", default="tiny", show_default=True, help="U-Net preset for FP training (tiny, tiny-rgb, cifar10).")
@click.option("--data", default=None, help="mnist5k | digits | folder:DIR | cifar10:DIR | npz:FILE "
              "[default: mnist5k, or the teacher's data for QAT]")
@click.option("--method", default=None, help="Binarize with a method preset: binarydm, baseline, bidm, xnor, "
              "xnorpp, dorefa, reactnet, reste, bbcu. Omit for full-precision training.")
@click.option("--wbits", type=click.Choice(["1"]), default="1", help="Weight bits (binary).")
@click.option("--abits", type=click.Choice(["1", "4", "8", "32"]), default=None,
              help="Activation bits [default: the method's: 4 binarydm/baseline, 1 others].")
@click.option("--teacher", type=click.Path(dir_okay=False), default=None,
              help="FP checkpoint the binarized student starts from and distils [default: the embedded model].")
@click.option("--init", type=click.Path(dir_okay=False), default=None,
              help="FP training only: start from this FP checkpoint's weights (its U-Net, schedule and data) "
                   "instead of random ones, e.g. to train the embedded model longer.")
@click.option("--steps", type=int, default=None, help="Training steps (default: train.steps of the spec).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run directory (created; resumed if it has state.ckpt).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any spec field, e.g. --set train.lr=1e-4 --set unet.dropout=0.1 (repeatable).")
@click.option("--no-resume", is_flag=True, help="Ignore an existing state.ckpt in --out and start over.")
@click.option("--device", default=None, help="auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N "
              "[default: train.device, auto]; a run may resume on another device.")
@click.option("--bf16", is_flag=True, help="Autocast the step to bfloat16 (train.precision=bf16; docs/methods.md).")
@_friendly
def train(preset, data, method, wbits, abits, teacher, init, steps, out, overrides, no_resume, device, bf16):
    """Train a full-precision U-Net, or a binarized one from an FP teacher (resumes exactly; DDP under torchrun)."""
    from bdmtool.trainer.spec import build_train_spec
    from bdmtool.trainer.train import train as run

    if method is None:
        _refuse_unused("to full-precision training (a binarized student needs --method METHOD)", "teacher",
                       "wbits", "abits")
    else:
        _refuse_unused("to a binarized student (it takes its --teacher's U-Net)", "preset")
    if init is not None:
        _refuse_unused("with --init (the run takes that checkpoint's U-Net)", "preset")
    for flag, key, value in (("--bf16", "train.precision", bf16), ("--device", "train.device", device)):
        if value and any(o.split("=", 1)[0].strip() == key for o in overrides):
            raise ValueError(f"{flag} and --set {key}=... both set {key}; give one of them")
    if method is not None and teacher is None:
        teacher = str(DEFAULT_CKPT)
    if device:
        overrides += (f"train.device={device}",)
    if bf16:
        overrides += ("train.precision=bf16",)
    spec = build_train_spec(preset, data, steps, overrides, method=method,
                            abits=None if abits is None else int(abits), teacher=teacher, init=init)
    path = run(spec, out, resume=not no_resume)
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("ckpt", type=click.Path(dir_okay=False), default=str(DEFAULT_CKPT))
@click.option("--out", type=click.Path(), default="samples", show_default=True, help="Writes OUT.png, OUT.npz, OUT.json.")
@click.option("--n", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--steps", type=int, default=50, show_default=True, help="Sampling steps.")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta (0 = deterministic).")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm", "plms", "dpmsolver"]), default="ddim", show_default=True)
@click.option("--skip", type=click.Choice(["uniform", "quad"]), default="uniform", show_default=True,
              help="Timestep spacing for ddim/ddpm.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--no-ema", is_flag=True, help="Use the raw weights instead of the EMA weights.")
@click.option("--clip-x0/--no-clip-x0", default=True, show_default=True,
              help="Clamp the predicted x0 to [-1, 1] each step and re-derive eps (diffusers' clip_sample).")
@click.option("--tflite", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Sample an exported .tflite (with its sidecar .json) in the LCE interpreter instead of CKPT.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N.")
@_friendly
def sample(ckpt, out, n, steps, eta, sampler, skip, seed, batch_size, no_ema, clip_x0, tflite, device):
    """Sample images from CKPT (default: the embedded tiny MNIST model) or --tflite; writes a grid PNG and an .npz."""
    from bdmtool.trainer.sampling import SampleOptions, sample_checkpoint

    opts = SampleOptions(n=n, steps=steps, eta=eta, sampler=sampler, skip=skip, seed=seed, batch_size=batch_size,
                         clip_x0=clip_x0)
    if tflite:
        _refuse_unused("with --tflite (the .tflite is sampled instead of CKPT, on the CPU's LCE interpreter, with "
                       "the one set of weights it holds)", "ckpt", "no_ema", "device")
        from bdmtool.tools.sample_tflite import sample_tflite

        png, npz = sample_tflite(tflite, out, opts)
    else:
        png, npz = sample_checkpoint(ckpt, out, opts, use_ema=not no_ema, device=device)
    click.echo(f"wrote {png} and {npz}")


@cli.command(name="import")
@click.argument("src", type=click.Path(exists=True))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="bdmtool checkpoint to write.")
@click.option("--resolution", type=int, default=32, show_default=True, help="Image size (pesser files do not store it).")
@click.option("--dropout", type=float, default=None, help="Dropout for fine-tuning (default: 0.1 pesser, config for diffusers).")
@_friendly
def import_(src, out, resolution, dropout):
    """Convert pytorch_diffusion/ddim weights (SRC file) or a diffusers UNet2DModel folder (SRC dir)."""
    from bdmtool.trainer.interop import import_weights

    _refuse_overwriting(src, out)
    click.echo(f"wrote {import_weights(src, out, resolution=resolution, dropout=dropout)}")


def _refuse_unused(reason: str, *names: str) -> None:
    """Refuse options the user set on the command line that this input does not use (never silently ignored)."""
    ctx = click.get_current_context()
    given = [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        p = next(p for p in ctx.command.params if p.name == given[0])
        label = p.human_readable_name if isinstance(p, click.Argument) else "/".join(p.opts + p.secondary_opts)
        raise ValueError(f"{label} does not apply {reason}; drop it")


def _refuse_overwriting(src: str, out: str) -> None:
    """A command that reads SRC and writes --out must not replace its own input (the original would be lost)."""
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"--out {out} is the input file itself: writing it would replace the original; choose "
                         "another --out")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="report", show_default=True)
@click.option("--budget", type=float, default=1.0, show_default=True,
              help="Scale QAT steps and sample counts (1 = about 15 min on 2 cores; 4 = longer, better students).")
@click.option("--n", type=int, default=None, help="Samples per model for grids and FID [default: 64 x budget].")
@click.option("--steps", type=int, default=None, help="DDIM steps [default: 50].")
@click.option("--seed", type=int, default=None, help="Sampling seed [default: 0].")
@click.option("--qat-steps", type=int, default=None, help="QAT steps per binarized model [default: 200 x budget].")
@click.option("--qat-batch", type=int, default=None, help="QAT batch size [default: 16].")
@click.option("--clip-x0/--no-clip-x0", default=True, show_default=True,
              help="Clamp the predicted x0 to [-1, 1] in every sampler (PyTorch and .tflite).")
@click.option("--device", default=None, help="Also benchmark on a phone: adb:SERIAL (needs --benchmark-binary).")
@click.option("--benchmark-binary", type=click.Path(dir_okay=False), default=None,
              help="lce_benchmark_model for the phone [default: $BDMTOOL_LCE_BENCHMARK].")
@_friendly
def demo(out, budget, n, steps, seed, qat_steps, qat_batch, clip_x0, device, benchmark_binary):
    """Run the whole product on the embedded default model; writes OUT/index.html and OUT/report.md (stages are reused)."""
    import dataclasses

    from bdmtool.tools.demo import DemoBudget, run_demo

    if not (device or "").startswith("adb:"):
        _refuse_unused("without --device adb:SERIAL (the demo's host benchmark needs no binary)", "benchmark_binary")
    b = DemoBudget().scaled(budget)
    given = {"n_samples": n, "steps": steps, "seed": seed, "qat_steps": qat_steps, "qat_batch": qat_batch,
             "clip_x0": clip_x0}
    b = dataclasses.replace(b, **{k: v for k, v in given.items() if v is not None})
    run_demo(out, b, device=device, benchmark_binary=benchmark_binary, log=click.echo)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="replication", show_default=True)
@click.option("--tables", default="all", show_default=True,
              help="Comma-separated: binarydm_t1, binarydm_t7, bidm_t1, bidm_ablation (or all).")
@click.option("--budget", type=float, default=1.0, show_default=True,
              help="Scale QAT steps (2,000) and samples per run (1,000).")
@click.option("--steps", type=int, default=None, help="QAT steps per run [default: 2,000 x budget].")
@click.option("--n", type=int, default=None, help="Samples per run for FID [default: 1,000 x budget].")
@click.option("--ref-limit", type=int, default=None, help="MNIST-5k reference images [default: all 5,000].")
@click.option("--seeds", type=int, default=None, help="Training seeds of the headline pairs [default: 3].")
@click.option("--teacher", type=click.Path(dir_okay=False), default=str(DEFAULT_CKPT), show_default=True)
@click.option("--sample-steps", type=int, default=None, help="DDIM steps when sampling [default: 50].")
@click.option("--only", default="", help="Comma-separated run keys: only these rows of the tables (a partial "
              "report, e.g. one pair).")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Runs side by side, each on cores/jobs threads (2 on a 2-core machine: one thread each); "
              "cores are those of the CPU affinity, so `taskset -c 0 bdmtool replicate` leaves core 1 free.")
@click.option("--report-only", is_flag=True, help="Train nothing: write OUT/report.md from the runs already "
              "finished at this budget (e.g. while workers are still going).")
@_friendly
def replicate(out, tables, budget, steps, n, ref_limit, seeds, sample_steps, only, teacher, jobs, report_only):
    """Train and score the papers' tables (BinaryDM T1/T7, BiDM T1/ablation) from one teacher; OUT/report.md.

    Every run is a resumable `bdmtool train` folder under OUT/runs/; re-running reuses finished runs and scores."""
    import dataclasses

    from bdmtool.trainer.replication import (TABLES, ReplicationBudget, environment, finished_scores, run_replication,
                                                write_report)

    chosen = tuple(TABLES) if tables == "all" else tuple(t.strip() for t in tables.split(",") if t.strip())
    b = ReplicationBudget().scaled(budget)
    flags = {"--steps": steps, "--n": n, "--ref-limit": ref_limit, "--seeds": seeds, "--sample-steps": sample_steps}
    for flag, v in flags.items():
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    given = {"steps": steps, "n_samples": n, "n_reference": ref_limit, "seeds": seeds, "sample_steps": sample_steps}
    b = dataclasses.replace(b, **{k: v for k, v in given.items() if v is not None})
    if b.n_reference > 5000:
        raise ValueError(f"--ref-limit must be <= 5000 (MNIST-5k), got {b.n_reference}")
    if report_only:
        _refuse_unused("with --report-only (it trains nothing and reports every finished run)", "only", "jobs")
    keys = tuple(k.strip() for k in only.split(",") if k.strip())
    scores = {} if report_only else run_replication(out, chosen, b, teacher, jobs=jobs, only=keys, log=click.echo)
    scores = {**finished_scores(out, chosen, b, teacher), **scores}  # rows another worker or --only run finished
    if report_only and not scores:
        raise ValueError(f"no run under {out}/runs has finished at this budget ({b.steps} steps, N = {b.n_samples}): "
                         f"run `bdmtool replicate --out {out}` first, or pass the --budget/--steps/--n it used")
    md, js = write_report(out, scores, chosen, b, teacher, environment(jobs))
    click.echo(f"[replicate] wrote {md} and {js}")


@cli.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", type=click.Choice(["lce", "fp", "keras-fp", "convs"]), default="lce", show_default=True,
              help="lce: Keras/Larq rebuild -> LCE .tflite with binary kernels; fp: the FP model (or a binarized "
                   "checkpoint's teacher) via ONNX -> onnx2tf; keras-fp: the Keras rebuild with every layer float; "
                   "convs: one binary + one FP micro-model per conv shape (OUT/convs/, for `bdmtool bench --convs`).")
@click.option("--out", type=click.Path(file_okay=False), default="export", show_default=True)
@click.option("--name", default=None,
              help="Base name of the .tflite and its sidecar .json [default: METHOD_w1aBITS, + _int8 on the int8 path].")
@click.option("--a8", type=click.Choice(["int8", "bitplanes"]), default=None, show_default="bitplanes",
              help="Kernel for W1A8 layers: eight ±1 bit planes in one LceBconv2d per layer (exact: the .tflite "
                   "draws what PyTorch draws; slow on x86, LCE's ARM kernels are fast) or one int8 CONV_2D per "
                   "layer (fast everywhere, builtin ops only; each output re-quantized to 8 bits: ~4% FID on the "
                   "shipped student). See the README's W1A8 section.")
@click.option("--a4", type=click.Choice(["int8", "bitplanes"]), default=None, show_default="bitplanes",
              help="Kernel for W1A4 layers: four LceBconv2d bit planes (exact) or one int8 CONV_2D per layer (the "
                   "4-bit LSQ grid is a sub-grid of int8; each output is re-quantized to 8 bits, which flips some "
                   "4-bit levels downstream: check its samples with `bdmtool eval`). Zero-padded W1A4 needs int8.")
@click.option("--int8-out", type=click.Choice(["channel", "tensor"]), default=None, show_default="channel",
              help="Output range of each int8 layer: one per output channel (equalized: every channel spans the "
                   "256 levels, then a float rescale; the default) or one for the whole tensor (TFLite's usual).")
@click.option("--tol", type=float, default=None,
              help="Max |d eps| allowed between stages [default: 1e-4; int8 path: 0.25; W1A8 bit planes: 0.1].")
@click.option("--allow-float-layers", is_flag=True,
              help="Export a checkpoint whose progressive schedule left some binary layers float (as float convs, "
                   "with a warning) instead of refusing it.")
@click.option("--per-layer", is_flag=True,
              help="Also report, for every binary layer, max |d| and cosine similarity of its output between "
                   "PyTorch and the .tflite (export_report.json 'per_layer'; converts a probe twin, ~+50%% time).")
@_friendly
def export(ckpt, target, out, name, a8, a4, int8_out, tol, allow_float_layers, per_layer):
    """Export CKPT to a .tflite + sidecar JSON, checking parity at every stage and the binary op inventory."""
    from bdmtool.tools.export import export_checkpoint

    if target == "convs":
        _refuse_unused("to --target convs (it writes one micro-model per conv shape, named by the shape)",
                       "name", "tol", "per_layer", "allow_float_layers")
    elif target == "fp":
        _refuse_unused("to --target fp (onnx2tf's float model has no binary layers)", "per_layer",
                       "allow_float_layers")
    elif target == "keras-fp":
        _refuse_unused("to --target keras-fp (every layer float)", "per_layer", "allow_float_layers")
    result = export_checkpoint(ckpt, out, target=target, name=name, tol=tol, a8=a8, a4=a4, log=click.echo,
                               allow_float_layers=allow_float_layers, per_layer=per_layer, int8_out=int8_out)
    if target == "convs":
        return
    click.echo(f"wrote {result.tflite} ({result.report['file_bytes'] / 1024:.1f} KiB) and {result.sidecar}")


@cli.command(name="eval")
@click.argument("source", type=click.Path(exists=True), default=str(DEFAULT_CKPT))
@click.option("--ref", "reference", default=None,
              help="Reference data: mnist5k | digits | cifar10:DIR | folder:DIR | npz:FILE [default: the checkpoint's data].")
@click.option("--ref-limit", type=int, default=None, help="Use only the first N reference images.")
@click.option("--out", type=click.Path(file_okay=False), default="eval", show_default=True)
@click.option("--n", type=int, default=1000, show_default=True, help="Samples to generate (checkpoint / .tflite).")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--clip-x0/--no-clip-x0", default=True, show_default=True,
              help="Clamp the predicted x0 to [-1, 1] each sampling step (checkpoint / .tflite sources).")
@click.option("--kid", "with_kid", is_flag=True, help="Also compute KID.")
@click.option("--inception-is-weights", type=click.Path(), default=None,
              help="Classic Inception weights with the classifier head, needed for the Inception Score.")
@click.option("--device", default="auto", show_default=True,
              help="Where a checkpoint is sampled: auto (CUDA when torch sees a GPU) | cpu | cuda | cuda:N.")
@_friendly
def eval_(source, reference, ref_limit, out, n, steps, eta, seed, batch_size, clip_x0, with_kid,
          inception_is_weights, device):
    """FID, sFID, precision/recall of SOURCE: a checkpoint, a .tflite, an .npz of samples or an image folder."""
    from bdmtool.tools.evaluate import evaluate
    from bdmtool.trainer.sampling import SampleOptions

    opts = SampleOptions(n=n, steps=steps, eta=eta, seed=seed, batch_size=batch_size, clip_x0=clip_x0)
    kind = Path(source).suffix
    if Path(source).is_dir() or kind == ".npz":
        _refuse_unused(f"to existing samples ({source} is scored as it is; sample a checkpoint or .tflite to choose "
                       "them)", "n", "steps", "eta", "seed", "clip_x0", "device")
    elif kind == ".tflite":
        _refuse_unused(f"to a .tflite ({source} runs on the CPU's LCE interpreter)", "device")
    evaluate(source, out, opts, reference=reference, ref_limit=ref_limit, with_kid=with_kid,
             inception_is_weights=inception_is_weights, log=click.echo, device=device)


@cli.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Packed checkpoint to write.")
@click.option("--tol", type=float, default=1e-4, show_default=True, help="Max |d eps| vs CKPT on random inputs.")
@_friendly
def pack(ckpt, out, tol):
    """Store a binarized checkpoint's binary weights as sign bits + per-channel scales (~10x smaller; samples
    and exports the same)."""
    from bdmtool.tools.pack import pack_checkpoint

    _refuse_overwriting(ckpt, out)
    pack_checkpoint(ckpt, out, tol=tol, log=click.echo)


@cli.command()
@click.argument("ckpts", nargs=-1, type=click.Path(exists=True, dir_okay=False), required=True)
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False), default=None,
              help="FP model to compare with [default: the first student's teacher].")
@click.option("--n", type=int, default=256, show_default=True, help="Images per timestep.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timesteps", default=None, help="Comma-separated timesteps [default: 10,50,100,250,500,750,900,980].")
@click.option("--out", type=click.Path(file_okay=False), default="diagnose", show_default=True)
@_friendly
def diagnose(ckpts, teacher, n, seed, timesteps, out):
    """Per-timestep eps-MSE and DC pass-through (slope, x0 error) of CKPTS next to their FP teacher; JSON + plot."""
    from bdmtool.tools.diagnose import diagnose as run

    try:
        ts = tuple(int(v) for v in timesteps.split(",")) if timesteps else None
    except ValueError:
        raise ValueError(f"--timesteps must be comma-separated integers, got {timesteps!r}") from None
    if ts is not None and len(set(ts)) != len(ts):
        raise ValueError(f"--timesteps lists a timestep twice ({timesteps}); give each once")
    if n < 2:
        raise ValueError("--n must be >= 2 (a slope needs two images)")
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63), got {seed}")
    run(list(ckpts), out, teacher=teacher, n=n, seed=seed, timesteps=ts, log=click.echo)


@cli.command()
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False), required=False)
@click.option("--preset", default=None, help="tiny | tiny-rgb | cifar10 (pixel U-Net), ldm4-bedrooms | ldm8-churches | "
              "ldm8-txt2img (LDM U-Net) or vq-f4 | kl-f8 (LDM autoencoders), instead of CKPT.")
@click.option("--wbits", type=click.Choice(["1", "2", "4", "8", "32"]), default=None,
              help="With --preset [default: 1]; a checkpoint has its own.")
@click.option("--abits", type=click.Choice(["1", "2", "4", "8", "32"]), default=None,
              help="With --preset [default: 4]; a checkpoint has its own.")
@click.option("--method", default=None,
              help="With --preset: which layers stay FP (the method's rule) [default: binarydm]; a checkpoint has its own.")
@click.option("--attention-matmuls", is_flag=True, help="Count attention QK^T/AV as FP FLOPs (the papers do not).")
@click.option("--elementwise", is_flag=True, help="Count norm+activation, quantized-output scales and softmax as FLOPs.")
@click.option("--count-scales", is_flag=True, help="Count per-channel scales of quantized layers in the size.")
@click.option("--per-layer", is_flag=True, help="Print every layer.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write JSON + stacked-bar PNG here.")
@_friendly
def ops(ckpt, preset, wbits, abits, method, attention_matmuls, elementwise, count_scales, per_layer, out):
    """Size, BOPs and OPs (BinaryDM Eq. 16-17) of CKPT or --preset at --wbits/--abits, per layer and total."""
    from bdmtool.tools.ops import account
    from bdmtool.trainer.ops import OpsConvention, format_table

    conv = OpsConvention(attention_matmuls=attention_matmuls, elementwise=elementwise, count_scales=count_scales)
    res = account(ckpt, preset, wbits and int(wbits), abits and int(abits), method, conv, out)
    click.echo(f"{res['model']}  (FP layers: {', '.join(res['fp_patterns']) or 'all'})")
    click.echo(format_table(res, per_layer=per_layer))
    if out:
        click.echo(f"wrote {res['files']['json']} and {res['files']['png']}")


@cli.command(name="inspect")
@click.argument("tflite", type=click.Path(exists=True, dir_okay=False))
@_friendly
def inspect_(tflite):
    """Print a .tflite's op histogram, binary/float parameter bytes, I/O and file size."""
    from bdmtool.exporter.inspect_tflite import format_inventory, inspect_file

    click.echo(format_inventory(inspect_file(tflite)))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--baseline", type=click.Path(dir_okay=False), default=None, help="FP .tflite to compare against.")
@click.option("--convs", type=click.Path(), default=None,
              help="Micro-model folder from `bdmtool export CKPT --target convs` (times every conv alone).")
@click.option("--device", default="local", show_default=True, help="local (this machine, LCE interpreter) or adb:SERIAL.")
@click.option("--out", type=click.Path(file_okay=False), default="bench", show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--runs", type=int, default=20, show_default=True, help="Timed runs per repetition.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Warm-up runs per repetition.")
@click.option("--repeats", type=int, default=3, show_default=True, help="Repetitions (median and spread over them).")
@click.option("--cooldown", type=float, default=0.0, show_default=True, help="Seconds to rest between repetitions.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Phone: seconds one benchmark run may take before it counts as hung (then a one-line error).")
@click.option("--no-pin", is_flag=True, help="Phone: do not pin to the highest-frequency cores with taskset.")
@click.option("--no-xnnpack", is_flag=True, help="Run float ops without XNNPACK (per-op float timings on a phone).")
@click.option("--benchmark-binary", type=click.Path(dir_okay=False), default=None,
              help="lce_benchmark_model for the phone's ABI [default: $BDMTOOL_LCE_BENCHMARK].")
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="A.json B.json", help="Print the difference of two results.json files and exit.")
@_friendly
def bench(model, baseline, convs, device, out, threads, runs, warmup, repeats, cooldown, timeout, no_pin, no_xnnpack,
          benchmark_binary, compare):
    """Time MODEL (binary .tflite) against --baseline and every conv (--convs) on a phone or this host."""
    from bdmtool.android_bench import results
    from bdmtool.android_bench.adb import DeviceError
    from bdmtool.android_bench.bench import run_bench
    from bdmtool.android_bench.options import BenchOptions

    if compare:
        _refuse_unused("with --compare (it only reads the two results files)", "model", "baseline", "convs", "device",
                       "threads", "runs", "warmup", "repeats", "cooldown", "timeout", "no_pin", "no_xnnpack",
                       "benchmark_binary")
        click.echo(results.compare(results.load(compare[0]), results.load(compare[1])), nl=False)
        return
    if device == "local":
        _refuse_unused("to --device local (phone options: this host runs the LCE interpreter in-process)",
                       "timeout", "no_pin", "benchmark_binary")
    opts = BenchOptions(threads=threads, runs=runs, warmup_runs=warmup, repeats=repeats, cooldown_s=cooldown,
                        pin_big_cores=not no_pin, xnnpack=not no_xnnpack, timeout_s=timeout)
    try:
        res = run_bench(model, baseline, device, out, opts, convs=convs, benchmark_binary=benchmark_binary,
                        log=click.echo)
    except DeviceError as e:
        raise _UserError(f"{e} (measurements so far: {Path(out) / 'results.json'})") from None
    click.echo(results.markdown(res), nl=False)


def main() -> None:  # pragma: no cover
    cli(prog_name="bdmtool")


if __name__ == "__main__":  # pragma: no cover - `python -m bdmtool.tools.cli` (torchrun uses this)
    sys.exit(main())
