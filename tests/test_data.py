"""Every data source through the one loader interface, and clear errors for missing or corrupt data."""

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from bdmtool.trainer.data import DataError, load_images, save_grid, to_model_range
from bdmtool.trainer.spec import DataConfig


def test_mnist5k_is_padded_to_32_and_balanced():
    x = load_images(DataConfig(source="mnist5k"))
    assert x.shape == (5000, 32, 32, 1) and x.dtype == np.uint8
    assert x[:, :2].max() == 0 and x[:, :, -2:].max() == 0  # zero padding 28 -> 32
    assert x.max() == 255 and 0.1 < (x > 127).mean() < 0.2  # real digit strokes, not noise


def test_digits_resized_and_rgb():
    x = load_images(DataConfig(source="digits", channels=3, resolution=32))
    assert x.shape == (1797, 32, 32, 3) and (x[..., 0] == x[..., 2]).all()
    assert x.max() > 200


def test_folder_recursive_any_size(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a" / "one.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "a" / "b" / "two.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    x = load_images(DataConfig(source="folder", path=str(tmp_path), channels=3))
    assert x.shape == (2, 32, 32, 3)
    x1 = load_images(DataConfig(source="folder", path=str(tmp_path), channels=1))
    assert x1.shape == (2, 32, 32, 1)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images(DataConfig(source="folder", path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no images"):
        load_images(DataConfig(source="folder", path=str(tmp_path)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        load_images(DataConfig(source="folder", path=str(tmp_path)))


def _write_cifar(root, n=4):
    root.mkdir()
    for i in range(1, 6):
        data = np.full((n, 3072), i * 10, dtype=np.uint8)
        data[:, :1024] = 200  # red plane
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [0] * n, "batch_label": f"batch {i}"}, f)


def test_cifar10_pickles_read_with_restricted_unpickler(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    x = load_images(DataConfig(source="cifar10", path=str(tmp_path), channels=3))
    assert x.shape == (20, 32, 32, 3)
    assert (x[..., 0] == 200).all() and x[0, 0, 0, 1] == 10 and x[-1, 0, 0, 2] == 50  # NCHW planes -> NHWC


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/bdmtool_pwned",))


def test_cifar10_refuses_code_in_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Evil()}, f)
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        load_images(DataConfig(source="cifar10", path=str(root), channels=3))
    assert not os.path.exists("/tmp/bdmtool_pwned")


def test_cifar10_missing_batches_say_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load_images(DataConfig(source="cifar10", path=str(tmp_path), channels=3))


@pytest.mark.parametrize("layout", ["nhwc_u8", "nchw_float01", "nhw_minus1_1"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (5, 32, 32, 1), dtype=np.uint8)
    arr = {"nhwc_u8": base, "nchw_float01": base.transpose(0, 3, 1, 2) / 255.0,
           "nhw_minus1_1": base[..., 0] / 127.5 - 1.0}[layout]
    np.savez(tmp_path / "d.npz", arr_0=arr)
    x = load_images(DataConfig(source="npz", path=str(tmp_path / "d.npz"), channels=1))
    assert x.shape == (5, 32, 32, 1)
    assert np.abs(x.astype(int) - base).max() <= 1


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "w.npz", labels=np.zeros(3))
    with pytest.raises(DataError, match="expected one named arr_0"):
        load_images(DataConfig(source="npz", path=str(tmp_path / "w.npz")))
    obj = np.array([{"a": 1}], dtype=object)
    np.save(tmp_path / "o.npy", obj, allow_pickle=True)
    os.rename(tmp_path / "o.npy", tmp_path / "o.npz")
    with pytest.raises(DataError):
        load_images(DataConfig(source="npz", path=str(tmp_path / "o.npz")))


def test_config_requires_path_for_file_sources():
    from bdmtool.trainer.config import ConfigError

    with pytest.raises(ConfigError, match="data.path is required"):
        DataConfig(source="cifar10")


def test_range_and_grid(tmp_path):
    x = load_images(DataConfig(source="digits", limit=10))
    m = to_model_range(x)
    assert m.shape == (10, 1, 32, 32) and m.min() >= -1 and m.max() <= 1
    p = save_grid(x, tmp_path / "g.png", scale=2)
    img = Image.open(p)
    assert img.size == (2 * (4 * 34 + 2), 2 * (3 * 34 + 2))
