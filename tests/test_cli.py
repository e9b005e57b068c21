"""The CLI is thin and friendly: help lists the commands, bad input is one line, the main paths work."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from bdmtool.tools.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_every_command():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("train", "sample", "import", "demo"):
        assert cmd in r.output


@pytest.mark.parametrize("args,message", [
    (["train", "--out", "x", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train", "--out", "x", "--set", "binarize.abits=4"], "no 'binarize' section; binarize.* applies to a "
                                                             "binarized student: add --method"),
    (["train", "--out", "x", "--preset", "huge"], "unknown U-Net preset 'huge'"),
    (["train", "--out", "x", "--data", "cifar10:/nonexistent"], "CIFAR-10 batches missing"),
    (["sample", "/nonexistent.ckpt"], "does not exist"),
])
def test_bad_input_is_one_line_error_without_traceback(tmp_path, args, message):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output


def test_train_then_sample_writes_grid_and_npz(tmp_path, micro_overrides):
    args = ["train", "--data", "digits", "--steps", "3", "--out", tmp_path / "run"]
    for o in [*micro_overrides, "data.limit=32", "train.batch_size=4"]:
        args += ["--set", o]
    r = run(*args)
    assert r.exit_code == 0, r.output
    r = run("sample", tmp_path / "run" / "model.ckpt", "--n", 6, "--steps", 4, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (6, 32, 32, 1) and arr.dtype == np.uint8
    assert Image.open(tmp_path / "s.png").size[0] > 64
