"""U-Net shapes and sizes for each preset."""

import pytest
import torch

from bdmtool.trainer.spec import UNET_PRESETS, UNetConfig
from bdmtool.trainer.unet import UNet, count_parameters, timestep_embedding


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_preset_shapes(name):
    cfg = UNetConfig.from_name(name)
    model = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.resolution, cfg.resolution)
    with torch.no_grad():
        y = model(x, torch.tensor([3, 900]))
    assert y.shape == (2, cfg.out_channels, cfg.resolution, cfg.resolution)
    assert torch.isfinite(y).all()


def test_parameter_counts():
    assert count_parameters(UNet(UNetConfig.from_name("cifar10"))) == 35_746_307  # pesser CIFAR-10 DDPM
    assert count_parameters(UNet(UNetConfig.from_name("tiny"))) <= 2_000_000
    assert count_parameters(UNet(UNetConfig.from_name("tiny-rgb"))) <= 2_000_000


def test_structure_follows_config():
    cfg = UNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8))
    m = UNet(cfg)
    assert len(m.down) == 3 and len(m.up) == 3
    assert [len(l.attn) for l in m.down] == [0, 2, 2] and [len(l.attn) for l in m.up] == [0, 3, 3]
    assert [len(l.block) for l in m.up] == [3, 3, 3]
    assert not hasattr(m.down[2], "downsample") and not hasattr(m.up[0], "upsample")


def test_timestep_embedding_formula():
    e = timestep_embedding(torch.tensor([0.0, 10.0]), 8)
    assert torch.allclose(e[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    freqs = torch.exp(-torch.log(torch.tensor(1e4)) * torch.arange(4) / 3)
    assert torch.allclose(e[1, :4], torch.sin(10 * freqs)) and torch.allclose(e[1, 4:], torch.cos(10 * freqs))


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects input \[B, 1, 32, 32\]"):
        UNet(UNetConfig.from_name("tiny"))(torch.randn(1, 3, 32, 32), torch.tensor([1]))
