"""Foreign checkpoints map onto bdmtool's U-Net exactly (random weights; real files cannot be downloaded here)."""

import json

import pytest
import torch

from _pesser_reference import Model as PesserModel
from bdmtool.trainer.interop import InteropError, diffusers_key_to_ours, import_weights, infer_unet_config
from bdmtool.trainer.spec import UNetConfig
from bdmtool.trainer.train import load_model


def _randomize(model: torch.nn.Module) -> None:
    # Non-trivial GroupNorm affine params and biases so that a wrong mapping cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)


def test_pesser_cifar10_checkpoint_layout_imports_exactly(tmp_path):
    cfg = UNetConfig.from_name("cifar10")
    ref = PesserModel(ch=cfg.ch, out_ch=3, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                      attn_resolutions=cfg.attn_resolutions, dropout=0.1, in_channels=3, resolution=32).eval()
    _randomize(ref)
    sd = ref.state_dict()
    assert len(sd) == 328 and sum(v.numel() for v in sd.values()) == 35_746_307  # the real file's key/param count
    src = tmp_path / "model-790000.ckpt"
    torch.save(sd, src)

    out = import_weights(src, tmp_path / "cifar10.ckpt")
    model, spec, _ = load_model(out)
    assert spec.unet == cfg  # config inferred from shapes = the cifar10 preset

    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.0, 999.0])
    with torch.no_grad():
        assert torch.allclose(model(x, t), ref(x, t), atol=1e-5, rtol=0)


def test_ddim_training_checkpoint_list_with_module_prefix(tmp_path):
    ref = PesserModel(ch=32, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), in_channels=1,
                      resolution=32).eval()
    _randomize(ref)
    ema = {k: v.clone() for k, v in ref.state_dict().items()}
    model_sd = {f"module.{k}": torch.zeros_like(v) for k, v in ema.items()}
    torch.save([model_sd, {}, 3, 1000, ema], tmp_path / "ckpt.pth")  # ermongroup ddim: EMA is element 4
    model, spec, _ = load_model(import_weights(tmp_path / "ckpt.pth", tmp_path / "out.ckpt"))
    assert spec.unet.ch_mult == (1, 2) and spec.unet.in_channels == 1 and spec.data.source == "mnist5k"
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([500.0])
    with torch.no_grad():
        assert torch.allclose(model(x, t), ref(x, t), atol=1e-5, rtol=0)


def _diffusers_unet(**kw):
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(32, 64, 64),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_eps=1e-6, norm_num_groups=32, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
               act_fn="silu", dropout=0.0)
    cfg.update(kw)
    return diffusers.UNet2DModel(**cfg).eval()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_diffusers_unet2d_folder_imports_exactly(tmp_path, safe):
    ref = _diffusers_unet()
    _randomize(ref)
    ref.save_pretrained(tmp_path / "ddpm", safe_serialization=safe)
    (tmp_path / "ddpm" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
         "num_train_timesteps": 1000}))
    model, spec, _ = load_model(import_weights(tmp_path / "ddpm", tmp_path / "out.ckpt"))
    assert spec.unet.ch_mult == (1, 2, 2) and spec.unet.attn_resolutions == (16,)
    assert spec.diffusion.schedule == "linear" and spec.diffusion.timesteps == 1000
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 750])
    with torch.no_grad():
        assert torch.allclose(model(x, t), ref(x, t).sample, atol=1e-5, rtol=0)


def test_diffusers_up_blocks_are_reversed():
    # 4 levels: diffusers up_blocks.0 (lowest resolution) is pesser up.3; attention follows the same rule.
    assert diffusers_key_to_ours("up_blocks.0.resnets.2.conv1.weight", 4) == "up.3.block.2.conv1.weight"
    assert diffusers_key_to_ours("up_blocks.2.attentions.1.to_out.0.bias", 4) == "up.1.attn.1.proj_out.bias"
    assert diffusers_key_to_ours("up_blocks.1.upsamplers.0.conv.weight", 4) == "up.2.upsample.conv.weight"
    assert diffusers_key_to_ours("mid_block.attentions.0.query.weight", 4) == "mid.attn_1.q.weight"
    assert diffusers_key_to_ours("down_blocks.1.resnets.0.conv_shortcut.weight", 4) == "down.1.block.0.nin_shortcut.weight"


def test_multi_head_diffusers_attention_is_refused_with_reason(tmp_path):
    ref = _diffusers_unet(attention_head_dim=8)  # diffusers' default: 8 channels per head -> several heads
    ref.save_pretrained(tmp_path / "multi")
    with pytest.raises(InteropError, match="single-head"):
        import_weights(tmp_path / "multi", tmp_path / "out.ckpt")


def test_unreadable_or_foreign_files_give_clear_errors(tmp_path):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(InteropError, match="tensor-only torch file"):
        import_weights(bad, tmp_path / "o.ckpt")
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(InteropError, match="conv_in.weight"):
        import_weights(bad, tmp_path / "o.ckpt")
    with pytest.raises(InteropError, match="does not exist"):
        import_weights(tmp_path / "missing", tmp_path / "o.ckpt")


def test_infer_config_matches_presets():
    from bdmtool.trainer.unet import UNet

    for name in ("tiny", "tiny-rgb"):
        cfg = UNetConfig.from_name(name)
        assert infer_unet_config(UNet(cfg).state_dict(), dropout=cfg.dropout) == cfg
