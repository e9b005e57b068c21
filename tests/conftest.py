import os
import sys
from pathlib import Path

import pytest

import bdmtool  # noqa: F401  (sets TF_USE_LEGACY_KERAS before any test imports TensorFlow)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

# A U-Net small enough for many CPU training steps in a test: 2 levels, attention at 16x16.
MICRO_UNET = ["unet.ch=32", "unet.ch_mult=[1,2]", "unet.num_res_blocks=1", "unet.attn_resolutions=[16]"]


def pytest_configure(config):
    import torch

    # CI has 2 cores and subprocess tests (torchrun, CLI) run beside pytest: avoid oversubscription.
    torch.set_num_threads(int(os.environ.get("BDMTOOL_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def micro_overrides():
    return list(MICRO_UNET)


def bdmtool_cmd() -> list[str]:
    """How tests run the installed CLI in a subprocess (the same interpreter as pytest)."""
    return [sys.executable, "-m", "bdmtool.tools.cli"]

