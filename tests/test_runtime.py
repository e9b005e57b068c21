"""Where and how a step runs: --device resolution, bf16 autocast training (exact resume, loss near fp32),
channels-last training, and the CUDA path (skipped here with the reason when torch sees no GPU)."""

import pytest
import torch

from bdmtool.trainer.checkpoint import load_checkpoint
from bdmtool.trainer.metrics import read_metrics
from bdmtool.trainer.runtime import has_cxx_compiler, move_to_cpu, resolve_device
from bdmtool.trainer.spec import build_train_spec
from bdmtool.trainer.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU on this machine")


def _spec(micro_overrides, steps, *extra):
    return build_train_spec("tiny", "digits", steps, [*micro_overrides, "data.limit=64", "train.batch_size=8",
                                                       "train.log_every=1", "train.warmup_steps=2",
                                                       "train.threads=1", *extra])


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="train.device"):
        build_train_spec("tiny", "digits", 1, ["train.device=gpu"])
    with pytest.raises(ValueError, match="train.precision"):
        build_train_spec("tiny", "digits", 1, ["train.precision=fp16"])


def test_move_to_cpu_keeps_structure():
    obj = {"a": torch.ones(2), "b": [torch.zeros(1), 3], "c": (torch.ones(1),), "d": None}
    out = move_to_cpu(obj)
    assert set(out) == set(obj) and out["b"][1] == 3 and isinstance(out["c"], tuple) and out["d"] is None


def test_bf16_training_resumes_exactly_and_follows_fp32(tmp_path, micro_overrides):
    """A bf16 run interrupted at step 4 and resumed gives the uninterrupted run's losses bit for bit; its loss
    stays within 5 % of the fp32 run's, and the device is not part of the resume check."""
    full = train(_spec(micro_overrides, 8, "train.precision=bf16", "train.ckpt_every=100", "train.lr=1e-3"),
                 tmp_path / "full", progress=False)
    train(_spec(micro_overrides, 4, "train.precision=bf16", "train.ckpt_every=4", "train.lr=1e-3"),
          tmp_path / "cut", progress=False)
    train(_spec(micro_overrides, 8, "train.precision=bf16", "train.ckpt_every=4", "train.lr=1e-3",
                "train.device=cpu"), tmp_path / "cut", progress=False)
    a = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert a == b and len(a) == 8
    fa, fb = load_checkpoint(full), load_checkpoint(tmp_path / "cut" / "model.ckpt")
    assert all(torch.equal(v, fb["model"][k]) for k, v in fa["model"].items())
    assert all(v.dtype != torch.bfloat16 for v in fa["model"].values())  # weights stay fp32
    train(_spec(micro_overrides, 8, "train.ckpt_every=100", "train.lr=1e-3"), tmp_path / "fp32", progress=False)
    c = [r["loss"] for r in read_metrics(tmp_path / "fp32" / "metrics.jsonl")]
    assert a != c  # bf16 really ran
    assert all(abs(x - y) <= 0.05 * y for x, y in zip(a, c)), (a, c)
    with pytest.raises(ValueError, match="different spec"):  # precision changes results: no silent mix
        train(_spec(micro_overrides, 10, "train.ckpt_every=4", "train.lr=1e-3"), tmp_path / "cut", progress=False)


def test_binary_student_trains_in_bf16(tmp_path, micro_overrides):
    teacher = train(_spec(micro_overrides, 2), tmp_path / "teacher", progress=False)
    spec = build_train_spec(method="binarydm", abits=4, teacher=str(teacher), steps=3,
                            overrides=["train.batch_size=4", "train.threads=1", "train.log_every=1",
                                       "train.precision=bf16", "data.limit=16"])
    train(spec, tmp_path / "student", progress=False)
    rows = read_metrics(tmp_path / "student" / "metrics.jsonl")
    assert len(rows) == 3 and all(r["loss"] == r["loss"] and r["loss"] < 10 for r in rows)


def _student_runner(tmp_path, micro_overrides, method):
    """A 2-step teacher, and ``student(out, steps, *overrides)``: trains a small ``method`` student from it into
    ``tmp_path / out`` (resuming when it exists) and returns its logged losses."""
    teacher = train(_spec(micro_overrides, 2), tmp_path / "teacher", progress=False)

    def student(out, steps, *extra):
        spec = build_train_spec(method=method, teacher=str(teacher), steps=steps,
                                overrides=["train.batch_size=4", "train.threads=1", "train.log_every=1",
                                           "data.limit=16", "train.lr=1e-3", "binarize.ebb_stage2_step=3",
                                           "binarize.progressive_every=1", *extra])
        train(spec, tmp_path / out, progress=False)
        return [r["loss"] for r in read_metrics(tmp_path / out / "metrics.jsonl")]

    return student


needs_compiler = pytest.mark.skipif(not has_cxx_compiler(),
                                    reason="train.kernels=compiled needs a C++ compiler (torch.compile's CPU backend)")


@needs_compiler
@pytest.mark.parametrize("method", ["binarydm", "bidm"])
def test_student_with_compiled_kernels_resumes_exactly_and_follows_eager(tmp_path, micro_overrides, method):
    """train.kernels=compiled: a BinaryDM W1A4 (compiled LSQ) or BiDM W1A1 (compiled RSign) student cut at step 3
    and resumed repeats the uninterrupted run's losses bit for bit; its losses are the eager run's to 1e-4
    relative (only the step / threshold gradient sums run in another order); the kernels are part of the resume
    check."""
    student = _student_runner(tmp_path, micro_overrides, method)

    full = student("full", 6, "train.kernels=compiled", "train.ckpt_every=100")
    student("cut", 3, "train.kernels=compiled", "train.ckpt_every=3")
    assert student("cut", 6, "train.kernels=compiled", "train.ckpt_every=3") == full
    eager = student("eager", 6, "train.ckpt_every=100")
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(full, eager)), (full, eager)
    with pytest.raises(ValueError, match="different spec"):
        student("cut", 8, "train.ckpt_every=3")


@pytest.mark.parametrize("method", ["binarydm", "bidm"])
def test_channels_last_student_resumes_exactly_and_follows_contiguous(tmp_path, micro_overrides, method):
    """train.memory_format=channels_last: a student cut at step 3 and resumed repeats the uninterrupted run's
    losses bit for bit, follows the NCHW run's losses (the first to 1e-5: other convolution kernels, the same
    values; later ones to 1 %, as float-rounding differences flip a few signs), writes contiguous checkpoints,
    and the layout is part of the resume check."""
    student = _student_runner(tmp_path, micro_overrides, method)

    full = student("full", 6, "train.memory_format=channels_last", "train.ckpt_every=100")
    student("cut", 3, "train.memory_format=channels_last", "train.ckpt_every=3")
    assert student("cut", 6, "train.memory_format=channels_last", "train.ckpt_every=3") == full
    nchw = student("nchw", 6, "train.ckpt_every=100")
    assert full != nchw  # the other layout really ran
    assert full[0] == pytest.approx(nchw[0], rel=1e-5)  # the same weights: only convolution rounding differs
    assert all(abs(a - b) <= 0.01 * abs(b) for a, b in zip(full, nchw)), (full, nchw)  # sign flips then grow it
    state = load_checkpoint(tmp_path / "cut" / "state.ckpt")
    assert all(v.is_contiguous() for v in state["model"].values())
    with pytest.raises(ValueError, match="different spec"):
        student("cut", 8, "train.ckpt_every=3")
    with pytest.raises(ValueError, match="train.memory_format"):
        build_train_spec("tiny", "digits", 1, ["train.memory_format=nhwc"])

@pytest.mark.parametrize("method", ["binarydm", "bidm"])
def test_bf16_teacher_resumes_exactly_and_its_targets_follow_fp32(tmp_path, micro_overrides, method):
    """distill.teacher_precision=bf16 (an fp32 student, the teacher's forward in bf16 autocast): a run cut at
    step 3 and resumed repeats the uninterrupted run bit for bit; the teacher's eps and LRM / SPD features reach
    the losses in fp32 and within 2 % (relative norm) of the fp32 teacher's; the losses follow the fp32-teacher
    run's to 2 %; the setting is part of the resume check."""
    from bdmtool.trainer.diffusion import Diffusion
    from bdmtool.trainer.objective import TrainingObjective
    from bdmtool.trainer.train import build_student

    student = _student_runner(tmp_path, micro_overrides, method)
    full = student("full", 6, "distill.teacher_precision=bf16", "train.ckpt_every=100")
    student("cut", 3, "distill.teacher_precision=bf16", "train.ckpt_every=3")
    assert student("cut", 6, "distill.teacher_precision=bf16", "train.ckpt_every=3") == full
    ref = student("fp32", 6, "train.ckpt_every=100")
    assert full != ref and all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(full, ref)), (full, ref)
    with pytest.raises(ValueError, match="different spec"):
        student("cut", 8, "train.ckpt_every=3")
    for never in (dict(), dict(method="baseline", teacher=str(tmp_path / "teacher" / "model.ckpt"))):
        with pytest.raises(ValueError, match="never makes"):  # FP training; a method with no teacher term
            build_train_spec(overrides=["distill.teacher_precision=bf16"], **never)

    spec = build_train_spec(method=method, teacher=str(tmp_path / "teacher" / "model.ckpt"), steps=1,
                            overrides=["train.threads=1", *micro_overrides])
    _, teacher = build_student(spec)
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([10, 300, 600, 900])
    outs = {}
    for prec in ("step", "bf16"):
        s = spec.replace(distill=spec.distill.replace(teacher_precision=prec))
        obj = TrainingObjective(s, Diffusion(s.diffusion), build_student(s)[0], teacher)
        eps = obj.teacher_forward(x, t)
        outs[prec] = (eps, dict(obj.t_tap.features))
        obj.t_tap.clear()
    (e32, f32), (e16, f16) = outs["step"], outs["bf16"]
    assert e16.dtype == torch.float32 and all(v.dtype == torch.float32 for v in f16.values()) and set(f16) == set(f32)
    assert 0 < float((e16 - e32).norm() / e32.norm()) < 0.02
    assert all(float((f16[k] - f32[k]).norm() / f32[k].norm()) < 0.02 for k in f32)


@needs_cuda
def test_cuda_training_and_sampling_match_cpu(tmp_path, micro_overrides):
    """On a GPU: a CUDA run's first loss equals the CPU run's to float tolerance (same batches: CPU
    generators), its checkpoint loads on the CPU, and CUDA samples are close to CPU samples."""
    from bdmtool.trainer.sampling import SampleOptions, sample_checkpoint

    cpu = train(_spec(micro_overrides, 3, "train.device=cpu"), tmp_path / "cpu", progress=False)
    gpu = train(_spec(micro_overrides, 3, "train.device=cuda"), tmp_path / "gpu", progress=False)
    a = read_metrics(tmp_path / "cpu" / "metrics.jsonl")[0]["loss"]
    b = read_metrics(tmp_path / "gpu" / "metrics.jsonl")[0]["loss"]
    assert b == pytest.approx(a, rel=1e-3)
    state = load_checkpoint(tmp_path / "gpu" / "state.ckpt")
    assert all(v.device.type == "cpu" for v in state["model"].values())
    opts = SampleOptions(n=4, steps=5, batch_size=4)
    _, n1 = sample_checkpoint(cpu, tmp_path / "s_cpu", opts, progress=False, device="cpu")
    _, n2 = sample_checkpoint(cpu, tmp_path / "s_gpu", opts, progress=False, device="cuda")
    import numpy as np

    x1, x2 = np.load(n1)["arr_0"].astype(int), np.load(n2)["arr_0"].astype(int)
    assert np.abs(x1 - x2).max() <= 2
    train(_spec(micro_overrides, 5, "train.device=cuda"), tmp_path / "cpu", progress=False)  # resume on the GPU
    assert read_metrics(tmp_path / "cpu" / "metrics.jsonl")[-1]["step"] == 5


def test_thread_policy_decisions():
    from bdmtool.trainer.runtime.threads import decide

    assert decide(2, 0.1, {}).env == {}  # idle: torch's defaults are the fastest alone
    c = decide(2, 1.0, {})
    assert c.env["OMP_NUM_THREADS"] == "1" and "OMP_WAIT_POLICY" not in c.env and "1 thread" in c.note
    c = decide(16, 3.2, {})
    assert c.env["OMP_NUM_THREADS"] == "13" and c.env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert c.env["TF_NUM_INTRAOP_THREADS"] == "13"
    assert decide(2, 2.0, {}).env["OMP_NUM_THREADS"] == "1"  # never fewer than one
    assert decide(2, 1.0, {"OMP_NUM_THREADS": "2"}).env == {}  # the user's setting wins
    assert decide(2, None, {"BDMTOOL_THREADS": "3"}).env["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="BDMTOOL_THREADS"):
        decide(2, None, {"BDMTOOL_THREADS": "many"})


def test_cli_takes_only_the_idle_cores_next_to_a_busy_process(tmp_path):
    """A real busy process on one core: the CLI measures it before torch loads and says what it chose."""
    import os
    import subprocess
    import sys
    import time

    from conftest import bdmtool_cmd
    from bdmtool.trainer.runtime.threads import allowed_cpus

    cpus = allowed_cpus()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "BDMTOOL_THREADS")}
        r = subprocess.run([*bdmtool_cmd(), "sample", "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")],
                           capture_output=True, text=True, timeout=300, env=env)
    finally:
        busy.kill()
        busy.wait()
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cores are busy with other processes" in r.stderr, r.stderr[-2000:]
    assert f"running on {max(1, len(cpus) - 1)} thread" in r.stderr, r.stderr[-2000:]
