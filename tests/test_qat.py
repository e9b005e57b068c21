"""Quantization-aware training from an FP teacher, for every method: it learns, resumes exactly, samples."""

import pytest
import torch

from conftest import MICRO_UNET
from bdmtool.trainer.binarize import apply_schedule_, calibrate_
from bdmtool.trainer.checkpoint import load_checkpoint
from bdmtool.trainer.diffusion import Diffusion
from bdmtool.trainer.distill import feature_sites, lrm_fit
from bdmtool.trainer.metrics import read_metrics
from bdmtool.trainer.objective import TrainingObjective
from bdmtool.trainer.sampling import SampleOptions, sample_checkpoint
from bdmtool.trainer.spec import DistillConfig, build_train_spec
from bdmtool.trainer.train import build_model, build_student, make_batch, train, DistEnv

COMMON = ["data.limit=64", "train.batch_size=8", "train.log_every=1", "train.threads=1"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    spec = build_train_spec("tiny", "digits", 60, [*MICRO_UNET, *COMMON, "train.lr=2e-3", "train.warmup_steps=5"])
    return str(train(spec, out, progress=False))


def _qat_spec(teacher, method, abits=None, steps=20, *extra):
    return build_train_spec(method=method, abits=abits, teacher=teacher, steps=steps,
                            overrides=[*COMMON, "train.lr=1e-3", "train.warmup_steps=2", *extra])


def _eval_loss(spec, model, teacher_model, batch):
    spec = spec.replace(distill=DistillConfig())  # eps-MSE only (the TBS cache pass still runs)
    obj = TrainingObjective(spec, Diffusion(spec.diffusion), model, teacher_model)
    with torch.no_grad():
        return float(obj(model, *batch, spec.train.steps)["mse"])


@pytest.mark.parametrize("method,abits", [("binarydm", 4), ("binarydm", 8), ("baseline", 32), ("baseline", 4),
                                          ("bidm", 1), ("xnor", 1), ("xnorpp", 1), ("dorefa", 1),
                                          ("reactnet", 1), ("reste", 1), ("bbcu", 1)])
def test_twenty_step_qat_lowers_the_loss(tmp_path, teacher, method, abits):
    """Each method's binarizers learn. Run on the papers' recipe (no float DC path): its tables move ~100x faster
    than the weights, and 20 steps with 2 warm-up steps measure their transient, not the method (on the
    baseline-32 micro student 0.053 -> 0.025 without the path, 0.047 affine, 0.049 skip; docs/methods.md)."""
    spec = _qat_spec(teacher, method, abits, 20, "binarize.dc_bypass=none")
    start, tmodel = build_student(spec)
    images = torch.from_numpy(__import__("bdmtool.trainer.data", fromlist=["x"]).load_images(spec.data))
    first = make_batch(images, spec, 0, DistEnv())
    calibrate_(start, Diffusion(spec.diffusion).q_sample(*first), first[1])
    train(spec, tmp_path, progress=False)
    end = build_model(spec)
    end.load_state_dict(load_checkpoint(tmp_path / "state.ckpt")["model"])
    for m in (start, end):
        apply_schedule_(m, spec.binarize, spec.train.steps, spec.train.steps)  # same structure for both
    batch = make_batch(images, spec, 10_000, DistEnv())  # a batch not used in training
    before, after = _eval_loss(spec, start, tmodel, batch), _eval_loss(spec, end, tmodel, batch)
    assert after < 0.9 * before, (method, abits, before, after)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 20 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if method == "binarydm":
        assert "loss_lrm" in rows[0] and "loss_ebb" in rows[0]
    if method == "bidm":
        assert "loss_spd" in rows[0]


def test_qat_resume_is_exact_across_ebb_switch_and_progressive(tmp_path, teacher):
    extra = ["binarize.ebb_stage2_step=3", "binarize.progressive_every=1", "train.ckpt_every=3"]
    train(_qat_spec(teacher, "binarydm", 4, 6, *extra), tmp_path / "ref", progress=False)
    train(_qat_spec(teacher, "binarydm", 4, 3, *extra), tmp_path / "run", progress=False)
    s3 = load_checkpoint(tmp_path / "run" / "state.ckpt")
    train(_qat_spec(teacher, "binarydm", 4, 6, *extra), tmp_path / "run", progress=False)
    ref = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")]
    got = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert got == pytest.approx(ref, rel=1e-6)
    s6 = load_checkpoint(tmp_path / "run" / "state.ckpt")
    # LRM projections are computed on the first batch and never change (and survive the resume).
    assert s3["distill"]["sites"] == s6["distill"]["sites"]
    for a, b in zip(s3["distill"]["proj"], s6["distill"]["proj"]):
        assert torch.equal(a, b)
    spec = _qat_spec(teacher, "binarydm", 4, 6, *extra)
    student, tmodel = build_student(spec)
    images = torch.from_numpy(__import__("bdmtool.trainer.data", fromlist=["x"]).load_images(spec.data))
    x0, t, noise = make_batch(images, spec, 0, DistEnv())
    feats = {}
    hooks = [tmodel.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o))
             for n in feature_sites(tmodel)]
    with torch.no_grad():
        tmodel(Diffusion(spec.diffusion).q_sample(x0, t, noise), t)
    for h in hooks:
        h.remove()
    expect = lrm_fit(feats, 4, "channel")
    assert list(expect) == s6["distill"]["sites"]
    for e, p in zip(expect.values(), s6["distill"]["proj"]):
        assert torch.allclose(e, p, atol=1e-6)
    assert all(not bool(v) for k, v in s6["model"].items() if k.endswith("second_basis"))  # stage 2 reached


def test_binarized_checkpoint_samples_deterministically(tmp_path, teacher):
    train(_qat_spec(teacher, "bidm", 1, 2), tmp_path / "bidm", progress=False)
    opts = SampleOptions(n=3, steps=4, seed=7)
    sample_checkpoint(tmp_path / "bidm" / "model.ckpt", tmp_path / "a", opts, progress=False)
    sample_checkpoint(tmp_path / "bidm" / "model.ckpt", tmp_path / "b", opts, progress=False)
    import numpy as np

    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert a.shape == (3, 32, 32, 1) and (a == b).all()  # the timestep cache is reset for every run


@pytest.mark.parametrize("method,abits", [("bidm", 1), ("dorefa", 1), ("reste", 1), ("binarydm", 4)])
def test_packed_checkpoint_samples_like_the_original(tmp_path, teacher, method, abits):
    """bdmtool pack: binary weights as sign bits + per-channel mean|W| (EBB stage-1 layers stay float); the
    packed file is much smaller and samples the same images; --no-ema on it is refused (one set of weights)."""
    import numpy as np

    from bdmtool.tools.pack import pack_checkpoint
    from bdmtool.trainer.checkpoint import CheckpointError

    # The image check runs on the affine DC path: with the per-pixel skip (the default) the 3-step micro W1A1
    # students' 4-step trajectories pass within an ulp of a sign boundary and one flip changes a whole image,
    # although pack reproduces eps to 1e-6 (checked on the default recipe at the end).
    src = train(_qat_spec(teacher, method, abits, 3, "binarize.dc_bypass=timestep_affine"), tmp_path / method,
                progress=False)
    info = pack_checkpoint(src, tmp_path / "packed.ckpt", log=lambda s: None)
    assert info["layers"] > 10 and info["bytes"] < 0.5 * src.stat().st_size and info["max_abs_diff"] <= 1e-4
    opts = SampleOptions(n=2, steps=4, seed=3)
    for f, out in ((src, "a"), (tmp_path / "packed.ckpt", "b")):
        sample_checkpoint(f, tmp_path / out, opts, progress=False)
    a, b = (np.load(tmp_path / f"{k}.npz")["arr_0"].astype(int) for k in "ab")
    assert np.abs(a - b).max() <= 2  # mean|W| recomputed from +-mean|W| may differ by an ulp: pixel rounding
    with pytest.raises(CheckpointError, match="state.ckpt"):
        sample_checkpoint(tmp_path / "packed.ckpt", tmp_path / "c", opts, use_ema=False, progress=False)
    default = train(_qat_spec(teacher, method, abits, 3), tmp_path / "default", progress=False)
    assert pack_checkpoint(default, tmp_path / "packed_default.ckpt", log=lambda s: None)["max_abs_diff"] <= 1e-4


def test_teacher_must_be_full_precision_and_match(tmp_path, teacher):
    train(_qat_spec(teacher, "xnor", 1, 1), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="itself binarized"):
        train(_qat_spec(str(tmp_path / "x" / "model.ckpt"), "bidm", 1, 1), tmp_path / "y", progress=False)
    from bdmtool.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="needs --teacher"):
        build_train_spec(method="bidm")


@pytest.mark.ddp
def test_two_process_qat_matches_one_process(tmp_path, teacher):
    import os
    import subprocess
    import sys

    sets = [*COMMON, "train.lr=1e-3", "train.warmup_steps=2"]
    train(_qat_spec(teacher, "bidm", 1, 3), tmp_path / "single", progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "bdmtool.tools.cli", "train", "--method", "bidm", "--teacher", teacher, "--steps", "3",
           "--out", str(tmp_path / "ddp")]
    for o in sets:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ra, rb = read_metrics(tmp_path / "single" / "metrics.jsonl"), read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert ra[0]["loss_mse"] == pytest.approx(rb[0]["loss_mse"], rel=1e-5)  # same weights, same global batch
    # SPD normalises by the norm of each process's whole batch (as the official code), so it is close, not equal
    assert [x["loss"] for x in ra] == pytest.approx([x["loss"] for x in rb], rel=2e-2)


@pytest.mark.parametrize("mode", ["abs", "signed"])
def test_ebb_regulariser_matches_a_hand_computation(tmp_path, teacher, mode):
    """tau * mean(|sigma_II|) (default) or tau * mean(sigma_II) (Eq. 9 as printed) over the stage-1 EBB layers,
    recomputed by hand from the layers' parameters; the loss term the objective adds is exactly that."""
    from bdmtool.trainer.binarize import binary_layers
    from bdmtool.trainer.distill import ebb_regulariser

    spec = _qat_spec(teacher, "binarydm", 4, 20, f"distill.ebb_reg={mode}")
    model, _ = build_student(spec)
    ebb = [m for m in binary_layers(model) if m.sigma2 is not None and bool(m.second_basis)]
    assert ebb
    with torch.no_grad():  # give sigma_II both signs so the two modes differ
        for i, m in enumerate(ebb):
            m.sigma2.copy_(torch.linspace(-0.3, 0.2, m.sigma2.numel()).reshape(m.sigma2.shape) * (i + 1))
    values = [float(v) for m in ebb for v in m.sigma2.detach().flatten()]
    hand = sum(abs(v) if mode == "abs" else v for v in values) / len(values)
    assert float(ebb_regulariser(model, mode)) == pytest.approx(hand, rel=1e-6)
    ebb[0].second_basis.fill_(False)  # a layer in stage 2 no longer counts
    rest = [float(v) for m in ebb[1:] for v in m.sigma2.detach().flatten()]
    assert float(ebb_regulariser(model, mode)) == pytest.approx(
        sum(abs(v) if mode == "abs" else v for v in rest) / len(rest), rel=1e-6)


@pytest.mark.parametrize("kd", [0.0, 0.5, 1.0])
def test_output_distillation_mixes_the_noise_and_the_teachers_eps(tmp_path, teacher, kd):
    """distill.kd_weight: loss = (1 - kd) * MSE(eps, noise) + kd * MSE(eps, eps_teacher), both recomputed here from
    the student's and the teacher's own forwards on the same x_t; 0 leaves the papers' objective untouched."""
    from bdmtool.trainer.binarize import reset_state

    spec = _qat_spec(teacher, "baseline", 4, 20, "distill.lrm_weight=0", "distill.ebb_tau=0",
                     f"distill.kd_weight={kd}")
    model, tmodel = build_student(spec)
    images = torch.from_numpy(__import__("bdmtool.trainer.data", fromlist=["x"]).load_images(spec.data))
    x0, t, noise = make_batch(images, spec, 3, DistEnv())
    diffusion = Diffusion(spec.diffusion)
    obj = TrainingObjective(spec, diffusion, model, tmodel)
    obj.prepare(x0, t, noise)
    with torch.no_grad():
        terms = obj(model, x0, t, noise, 5)
        x_t = diffusion.q_sample(x0, t, noise)
        eps_s = model(x_t, t)
        reset_state(model)
        eps_t = tmodel(x_t, t)
    mse, to_teacher = float(torch.mean((eps_s - noise) ** 2)), float(torch.mean((eps_s - eps_t) ** 2))
    assert float(terms["mse"]) == pytest.approx(mse, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx((1 - kd) * mse + kd * to_teacher, rel=1e-5)
    assert ("kd" in terms) == (kd > 0) and (kd == 0 or float(terms["kd"]) == pytest.approx(to_teacher, rel=1e-5))
    assert to_teacher < mse  # the teacher's eps is a far closer target than the noise: the two terms differ


def test_output_distillation_needs_a_binarized_student(teacher):
    from bdmtool.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="kd_weight"):
        build_train_spec("tiny", "digits", 2, [*COMMON, "distill.kd_weight=0.5"])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        _qat_spec(teacher, "baseline", 4, 2, "distill.kd_weight=2")


def test_bidm_cache_pass_stops_at_its_last_site_and_changes_nothing(teacher):
    """The t + delta pass only fills the TBS cache: it ends at the last cached site (the layers after it never run)
    and three training steps are bitwise the same as with the whole forward."""
    spec = _qat_spec(teacher, "bidm", 1, 3)
    images = torch.from_numpy(__import__("bdmtool.trainer.data", fromlist=["x"]).load_images(spec.data))
    params, calls = [], []
    for stop in (True, False):
        torch.manual_seed(0)
        model, tmodel = build_student(spec)
        model.tbs_cache.stop_when_filled = stop
        seen = []
        hook = model.get_submodule("conv_out").register_forward_hook(lambda *a: seen.append(1))  # the last layer
        obj = TrainingObjective(spec, Diffusion(spec.diffusion), model, tmodel)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        obj.prepare(*make_batch(images, spec, 0, DistEnv()))
        seen.clear()
        for step in range(3):
            loss = obj(model, *make_batch(images, spec, step, DistEnv()), step)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        hook.remove()
        params.append([p.detach().clone() for p in model.parameters()])
        calls.append(len(seen))
    assert calls == [3, 6]  # the student's output layer: once per step when the cache pass stops early, else twice
    assert all(torch.equal(a, b) for a, b in zip(*params))
