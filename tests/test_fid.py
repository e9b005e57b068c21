"""FID / sFID / precision-recall: the real Inception network on small MNIST sets, and the maths on toys."""

import json
import subprocess

import numpy as np
import pytest
import torch

from conftest import bdmtool_cmd
from bdmtool.trainer import fid


def test_resize_matches_tf1_legacy_bilinear():
    """The TF-compatible resize equals TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) to
    float32 rounding (< 1e-3 on the 0-255 scale); plain bilinear interpolation does not."""
    import tensorflow as tf

    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    ours = fid.resize_tf1(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    ref = tf.compat.v1.image.resize_bilinear(x, (299, 299), align_corners=False, half_pixel_centers=False).numpy()
    assert np.abs(ours - ref).max() < 1e-3
    plain = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299), mode="bilinear",
                                            align_corners=False).permute(0, 2, 3, 1).numpy()
    assert np.abs(plain - ref).max() > 10


def test_frechet_distance_of_known_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
    expect = 1 + 4 + (1 + 4 - 2 * 2) + (4 + 1 - 2 * 2) + 0
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expect)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_on_point_clouds():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((600, 2))
    same = rng.standard_normal((600, 2))
    p, r = fid.precision_recall(real, same)
    assert p > 0.9 and r > 0.9
    far = rng.standard_normal((600, 2)) + 50
    assert fid.precision_recall(real, far) == (0.0, 0.0)
    collapsed = rng.standard_normal((600, 2)) * 0.1  # mode collapse: realistic but not diverse
    p, r = fid.precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.3
    # Hand-checkable, k=1: real {0,1,2,3} have squared radius 1; fake {0.5,10,20,30} have 90.25, 90.25, 100, 100.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [20.0], [30.0]])
    p, r = fid.precision_recall(real, fake, k=1)
    assert p == 0.25  # only 0.5 lies in a real ball
    assert r == 1.0  # every real point lies in the ball around 0.5


@pytest.fixture(scope="module")
def mnist_feats():
    from bdmtool.trainer.data import load_mnist5k

    imgs = load_mnist5k()[:120]
    return imgs, fid.inception_features(imgs[:60], progress=False)


@pytest.mark.slow
def test_fid_self_zero_and_monotone_in_noise(mnist_feats):
    imgs, ref_f = mnist_feats
    mu, s = fid.gaussian(ref_f.pool3)
    assert fid.frechet_distance(mu, s, mu, s) < 1e-6
    rng = np.random.default_rng(0)
    other = imgs[60:120]
    fids, sfids = [], []
    for sigma in (0, 24, 48, 96):
        noisy = np.clip(other.astype(np.float64) + rng.normal(0, sigma, other.shape), 0, 255).astype(np.uint8)
        f = fid.inception_features(noisy, progress=False)
        fids.append(fid.frechet_distance(*fid.gaussian(f.pool3), mu, s))
        sfids.append(fid.frechet_distance(*fid.gaussian(f.spatial), *fid.gaussian(ref_f.spatial)))
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(sfids, sfids[1:])), sfids
    assert ref_f.pool3.shape == (60, 2048) and ref_f.spatial.shape == (60, 2023)


@pytest.mark.slow
def test_reference_cache_and_eval_cli_on_npz(tmp_path, mnist_feats):
    imgs, _ = mnist_feats
    env_cache = tmp_path / "cache"
    ref1 = fid.reference_stats(imgs[:40], {"reference": "toy"}, env_cache / "fid", progress=False)
    ref2 = fid.reference_stats(imgs[:40], {"reference": "toy"}, env_cache / "fid", progress=False)
    assert ref1.key == ref2.key and np.array_equal(ref1.mu, ref2.mu)
    assert len(list((env_cache / "fid").glob("fid_ref_*.npz"))) == 1
    ref3 = fid.reference_stats(imgs[:40], {"reference": "toy", "resolution": 28}, None, progress=False)
    assert ref3.key != ref1.key  # another description never reuses cached statistics

    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=imgs[90:120])
    import os

    r = subprocess.run([*bdmtool_cmd(), "eval", str(samples), "--ref", "mnist5k", "--ref-limit", "40", "--out",
                        str(tmp_path / "ev"), "--kid"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "BDMTOOL_CACHE": str(env_cache)})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_samples"] == 30 and m["n_reference"] == 40 and m["fid"] > 0 and m["sfid"] > 0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and "kid" in m
    assert m["inception_score"] is None and "unavailable" in m["inception_score_note"]
    assert m["reference"]["reference"] == "mnist5k" and m["sample_source"]["kind"] == "npz"
    assert (tmp_path / "ev" / "grid.png").is_file()
    r = subprocess.run([*bdmtool_cmd(), "eval", str(samples), "--ref", "cifar10:/nonexistent", "--out",
                        str(tmp_path / "ev2")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "BDMTOOL_CACHE": str(env_cache)})
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nonexistent" in r.stderr
