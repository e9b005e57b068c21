"""FP training: the loss goes down, a killed run resumes exactly, and 2-process DDP equals 1 process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import bdmtool_cmd
from bdmtool.trainer.checkpoint import CheckpointError, load_checkpoint
from bdmtool.trainer.metrics import read_metrics
from bdmtool.trainer.spec import build_train_spec
from bdmtool.trainer.train import train
from bdmtool.trainer.unet import UNet


def _spec(micro_overrides, steps, *extra):
    return build_train_spec("tiny", "digits", steps, [*micro_overrides, "data.limit=64", "train.batch_size=8",
                                                       "train.log_every=1", "train.warmup_steps=2",
                                                       "train.threads=1", *extra])


def test_loss_decreases_and_artifacts_written(tmp_path, micro_overrides):
    spec = _spec(micro_overrides, 40, "train.lr=1e-3", "train.ckpt_every=20")
    out = train(spec, tmp_path, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    first, last = sum(r["loss"] for r in rows[:8]) / 8, sum(r["loss"] for r in rows[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 40 and ckpt["optimizer"] is None and ckpt["spec"]["unet"]["ch_mult"] == [1, 2]
    state = load_checkpoint(tmp_path / "state.ckpt")
    assert state["optimizer"] is not None and state["ema"] is not None
    assert (tmp_path / "loss.png").stat().st_size > 5000
    assert json.loads((tmp_path / "spec.json").read_text())["train"]["steps"] == 40


def test_killed_run_resumes_with_identical_losses(tmp_path, micro_overrides):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(_spec(micro_overrides, 8, "train.ckpt_every=100"), ref_dir, progress=False)
    ref = {r["step"]: r["loss"] for r in read_metrics(ref_dir / "metrics.jsonl")}

    # A real process, killed with SIGKILL after its step-3 checkpoint while it is still training.
    args = ["train", "--preset", "tiny", "--data", "digits", "--steps", "1000", "--out", str(run_dir)]
    for o in [*micro_overrides, "data.limit=64", "train.batch_size=8", "train.log_every=1", "train.warmup_steps=2",
              "train.threads=1", "train.ckpt_every=3"]:
        args += ["--set", o]
    proc = subprocess.Popen(bdmtool_cmd() + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:
        steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] if (run_dir / "metrics.jsonl").exists() else []
        if steps and max(steps) >= 5:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(run_dir / "state.ckpt")["step"]
    assert killed_at in (3, 6), killed_at

    train(_spec(micro_overrides, 8, "train.ckpt_every=3"), run_dir, progress=False)  # same spec, finite budget
    got = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")}
    assert sorted(got) == list(range(1, 9))
    for s in range(killed_at + 1, 9):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, got[s], ref[s])
    a, b = load_checkpoint(ref_dir / "state.ckpt"), load_checkpoint(run_dir / "state.ckpt")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k


def test_checkpoint_before_first_log_line(tmp_path, micro_overrides):
    train(_spec(micro_overrides, 2, "train.log_every=10", "train.ckpt_every=1"), tmp_path, progress=False)
    assert load_checkpoint(tmp_path / "model.ckpt")["step"] == 2 and len(read_metrics(tmp_path / "metrics.jsonl")) == 1


def test_resume_refuses_a_different_spec(tmp_path, micro_overrides):
    train(_spec(micro_overrides, 2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="different spec"):
        train(_spec(micro_overrides, 4, "train.lr=5e-3"), tmp_path, progress=False)


def test_cosine_lr_and_its_budget_is_part_of_the_resume_check(tmp_path, micro_overrides):
    from bdmtool.trainer.train import lr_at

    spec = _spec(micro_overrides, 10, "train.lr=1e-3", "train.lr_decay=cosine", "train.lr_final_ratio=0.1")
    lrs = [lr_at(s, spec) for s in range(10)]
    assert lrs[0] == 5e-4 and lrs[1] == 1e-3 and abs(lrs[-1] - 1e-4) < 1e-12  # warm-up 2, then 1e-3 -> 1e-4
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    train(spec, tmp_path, progress=False)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["lr"] for r in rows] == lrs
    with pytest.raises(ValueError, match="different spec"):  # a longer budget would stretch the decay mid-run
        train(_spec(micro_overrides, 20, "train.lr=1e-3", "train.lr_decay=cosine", "train.lr_final_ratio=0.1"),
              tmp_path, progress=False)


def test_init_starts_fp_training_from_a_checkpoint(tmp_path, micro_overrides):
    """--init: the model starts from the checkpoint's EMA weights, with its U-Net, schedule and data."""
    from bdmtool.trainer.train import build_student, load_model

    first = train(_spec(micro_overrides, 3), tmp_path / "a", progress=False)
    spec = build_train_spec(init=str(first), steps=2, overrides=["train.threads=1", "train.batch_size=8"])
    assert spec.init == str(first)
    ref = load_model(first)[0].state_dict()
    model, _ = build_student(spec)
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    assert spec.unet.ch_mult == (1, 2) and spec.data.source == "digits" and spec.data.limit == 64
    train(spec, tmp_path / "b", progress=False)
    r = subprocess.run([*bdmtool_cmd(), "train", "--init", str(tmp_path / "a" / "state.ckpt"), "--method", "xnor",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "--init is for full-precision" in r.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "state.ckpt"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable bdmtool checkpoint"):
        load_checkpoint(p)
    torch.save({"format": "bdmtool-checkpoint", "format_version": 99}, p)
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(p)


@pytest.mark.ddp
def test_two_process_ddp_equals_one_process(tmp_path, micro_overrides):
    sets = [*micro_overrides, "data.limit=64", "train.batch_size=8", "train.log_every=1", "train.threads=1",
            "train.warmup_steps=2"]
    train(_spec(micro_overrides, 3), tmp_path / "single", progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bdmtool.tools.cli", "train", "--preset", "tiny", "--data", "digits", "--steps", "3",
           "--out", str(tmp_path / "ddp")]
    for o in sets:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_checkpoint(tmp_path / "single" / "state.ckpt"), load_checkpoint(tmp_path / "ddp" / "state.ckpt")
    assert b["step"] == 3
    la = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)  # each step's global-batch loss: same data, same weights
    # Adam turns float-rounding noise in near-zero gradients into lr-sized steps, so compare whole updates:
    torch.manual_seed(0)
    init = UNet(_spec(micro_overrides, 3).unet).state_dict()
    da = torch.cat([(a["model"][k] - init[k]).flatten() for k in init])
    db = torch.cat([(b["model"][k] - init[k]).flatten() for k in init])
    assert float((da - db).norm() / da.norm()) < 1e-2
    assert float((da - db).abs().le(1e-6).float().mean()) > 0.99
