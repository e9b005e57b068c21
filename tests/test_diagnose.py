"""The DC pass-through diagnostic: its statistics against hand computations, and the command end to end."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch

from conftest import MICRO_UNET, bdmtool_cmd
from bdmtool.trainer.diagnostics.passthrough import dc_gap, dc_stats, high_t_slope, passthrough_report
from bdmtool.trainer.diffusion import Diffusion
from bdmtool.trainer.spec import DiffusionConfig, build_train_spec
from bdmtool.trainer.train import train

COMMON = ["data.limit=32", "train.batch_size=4", "train.threads=1"]


def test_dc_stats_equal_hand_computation():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(50, 2, 4, 4, generator=g)
    eps_hat = 0.5 * eps + 0.1  # the DC passes at half strength, shifted
    st = dc_stats(eps_hat, eps)
    d = eps.double().mean(dim=(2, 3)).flatten()
    assert math.isclose(st["dc_slope"], 0.5, rel_tol=1e-6) and math.isclose(st["dc_corr"], 1.0, rel_tol=1e-6)
    assert math.isclose(st["dc_rms"], float(((-0.5 * d + 0.1) ** 2).mean().sqrt()), rel_tol=1e-5)
    assert math.isclose(st["mse"], float(((eps_hat.double() - eps.double()) ** 2).mean()), rel_tol=1e-9)
    zero = dc_stats(torch.zeros_like(eps), eps)
    assert zero["dc_slope"] == 0.0 and math.isclose(zero["dc_rms"], float((d**2).mean().sqrt()), rel_tol=1e-9)


def test_slope_error_and_paired_gap_equal_hand_computation():
    """The slope's standard error is OLS's (numpy's polyfit covariance); the gap to a reference is the slope of
    the difference of the two predicted means, with its own (paired) error, smaller than the unpaired one."""
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(200, 1, 4, 4, generator=g)
    shared = 0.05 * torch.randn(200, 1, 1, 1, generator=g)  # an error both models make on the same image
    teacher = 0.85 * eps + shared + 0.01 * torch.randn(eps.shape, generator=g)
    student = 0.65 * eps + shared + 0.01 * torch.randn(eps.shape, generator=g)
    d, dt, ds = (v.double().mean(dim=(2, 3)).flatten().numpy() for v in (eps, teacher, student))
    coef, cov = np.polyfit(d, ds, 1, cov="unscaled")
    resid = ds - np.polyval(coef, d)
    se = math.sqrt(float(cov[0, 0]) * float((resid ** 2).sum()) / (len(d) - 2))
    st = dc_stats(student, eps)
    assert math.isclose(st["dc_slope"], coef[0], rel_tol=1e-9) and math.isclose(st["dc_slope_se"], se, rel_tol=1e-9)
    gap = dc_gap(teacher, student, eps)
    gcoef, gcov = np.polyfit(d, dt - ds, 1, cov="unscaled")
    gres = dt - ds - np.polyval(gcoef, d)
    assert math.isclose(gap["dc_gap"], dc_stats(teacher, eps)["dc_slope"] - st["dc_slope"], rel_tol=1e-9)
    assert math.isclose(gap["dc_gap_se"], math.sqrt(float(gcov[0, 0]) * float((gres ** 2).sum()) / (len(d) - 2)),
                        rel_tol=1e-9)
    assert 0.15 < gap["dc_gap"] < 0.25 and gap["dc_gap_se"] < 0.5 * math.hypot(se, dc_stats(teacher, eps)["dc_slope_se"])


def test_report_of_a_zero_predictor():
    """A model that predicts eps = 0: slope 0, MSE ~ 1, and the x0 DC error is dc_rms * sqrt((1-abar)/abar)."""

    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    diff = Diffusion(DiffusionConfig())
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    class Half(torch.nn.Module):  # passes half of whatever x_t holds
        def forward(self, x, t):
            return 0.5 * x

    rep = passthrough_report({"zero": Zero(), "half": Half()}, diff, images, timesteps=(50, 900), n=32,
                             reference="half")
    assert rep["n"] == 32 and rep["timesteps"] == [50, 900] and list(rep["models"]) == ["zero", "half"]
    for rz, rh in zip(rep["models"]["zero"], rep["models"]["half"]):  # zero's gap to half is half's slope
        assert "dc_gap" not in rh and math.isclose(rz["dc_gap"], rh["dc_slope"], rel_tol=1e-9)
        assert math.isclose(rz["dc_gap_se"], rh["dc_slope_se"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="reference"):
        passthrough_report({"zero": Zero()}, diff, images, timesteps=(50,), n=4, reference="teacher")
    for r in rep["models"]["zero"]:
        abar = float(diff.alphas_cumprod[r["t"]])
        assert r["dc_slope"] == 0.0 and 0.8 < r["mse"] < 1.2
        assert math.isclose(r["x0_dc_rms"], r["dc_rms"] * math.sqrt((1 - abar) / abar), rel_tol=1e-12)
    assert high_t_slope(rep["models"]["zero"]) == 0.0
    assert high_t_slope(rep["models"]["zero"], t_min=10_000) is None  # no NaN in diagnose.json


def test_diagnose_command_on_a_teacher_and_two_students(tmp_path):
    fp = train(build_train_spec("tiny", "digits", 4, [*MICRO_UNET, *COMMON]), tmp_path / "fp", progress=False)
    ckpts = []
    for arm, extra in (("plain", ["binarize.dc_bypass=none"]), ("bypass", ["binarize.dc_bypass=timestep_affine"])):
        spec = build_train_spec(method="baseline", abits=4, teacher=str(fp), steps=3, overrides=[*COMMON, *extra])
        ckpts.append(str(train(spec, tmp_path / arm, progress=False)))
    r = subprocess.run([*bdmtool_cmd(), "diagnose", *ckpts, "--n", "16", "--timesteps", "100,600,950",
                        "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert len(rep["models"]) == 3 and next(iter(rep["models"])).startswith("teacher")  # the students' teacher
    assert all(len(rows) == 3 for rows in rep["models"].values())
    assert (tmp_path / "d" / "diagnose.png").stat().st_size > 10_000 and "DC slope" in r.stdout
    assert rep["reference"].startswith("teacher") and all("dc_gap_se" in row for row in rep["models"][arm_name(rep)])
    assert "largest gap to the teacher at t=600" in r.stdout or "largest gap to the teacher at t=950" in r.stdout
    assert "DC gap ± se" in (tmp_path / "d" / "diagnose.md").read_text()
    bad = subprocess.run([*bdmtool_cmd(), "diagnose", ckpts[0], "--timesteps", "5000", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "--timesteps must lie in" in bad.stderr


def test_recorded_teacher_is_found_from_another_folder(tmp_path, monkeypatch):
    """A spec written in a checkout records its teacher relative to it (bdmtool/assets/...); diagnose run from
    elsewhere finds it above the student, or next to it, and otherwise asks for --teacher in one line."""
    from bdmtool.tools.diagnose import recorded_teacher

    assets = tmp_path / "repo" / "bdmtool" / "assets"
    assets.mkdir(parents=True)
    (assets / "fp.ckpt").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert recorded_teacher(assets / "s.ckpt", "bdmtool/assets/fp.ckpt") == str(assets / "fp.ckpt")
    copy = tmp_path / "copies"
    copy.mkdir()
    (copy / "fp.ckpt").write_bytes(b"x")
    assert recorded_teacher(copy / "s.ckpt", "/gone/fp.ckpt") == str(copy / "fp.ckpt")  # next to the student
    with pytest.raises(ValueError, match="--teacher"):
        recorded_teacher(tmp_path / "elsewhere" / "s.ckpt", "bdmtool/assets/fp.ckpt")


def arm_name(rep: dict) -> str:
    return next(k for k in rep["models"] if k != rep["reference"])
