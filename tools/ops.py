"""``bdmtool ops``: size / BOPs / OPs of a checkpoint or a preset (pixel U-Net, LDM U-Net, LDM autoencoder)."""

from __future__ import annotations

from pathlib import Path


def account(ckpt: str | Path | None = None, preset: str | None = None, wbits: int = 1, abits: int = 4,
            method: str = "binarydm", convention=None, out: str | Path | None = None) -> dict:
    from bdmtool.trainer.layers import unet_example_inputs
    from bdmtool.trainer.ldm_autoencoder import Autoencoder, AutoencoderConfig
    from bdmtool.trainer.ldm_unet import LDMUNet, LDMUNetConfig
    from bdmtool.trainer.ops import LDM_FP_PATTERNS, OpsConvention, count, plot_blocks, write_json
    from bdmtool.trainer.spec import UNET_PRESETS, BinarizeConfig, UNetConfig
    from bdmtool.trainer.unet import UNet

    convention = convention or OpsConvention()
    if ckpt is not None:
        from bdmtool.trainer.checkpoint import read_spec

        spec = read_spec(ckpt)
        model = UNet(spec.unet)  # shapes only: weights do not change sizes or OPs
        b = spec.binarize
        fp_patterns = tuple(b.keep_fp) if b else ()
        wbits, abits = (1, b.abits) if b else (32, 32)
        inputs = unet_example_inputs(spec.unet)
        name = Path(ckpt).stem
    elif preset in LDMUNetConfig.PRESETS:
        model = LDMUNet(LDMUNetConfig.from_name(preset))
        fp_patterns = LDM_FP_PATTERNS.get(method, LDM_FP_PATTERNS["binarydm"])
        inputs = model.example_inputs()
        name = preset
    elif preset in AutoencoderConfig.PRESETS:
        model = Autoencoder(AutoencoderConfig.from_name(preset))
        fp_patterns = ("encoder.conv_in", "decoder.conv_out")
        inputs = model.example_inputs()
        name = preset
    elif preset in UNET_PRESETS:
        cfg = UNetConfig.from_name(preset)
        model = UNet(cfg)
        fp_patterns = tuple(BinarizeConfig.from_method(method).keep_fp)
        inputs = unet_example_inputs(cfg)
        name = preset
    else:
        what = f"unknown --preset {preset!r}" if preset else "give a checkpoint or --preset"
        raise ValueError(f"{what}: one of {sorted(UNET_PRESETS)} (pixel U-Net) or "
                         f"{sorted(LDMUNetConfig.PRESETS)} (LDM U-Net) or {sorted(AutoencoderConfig.PRESETS)} (LDM autoencoders)")
    result = count(model, inputs, wbits, abits, fp_patterns, convention)
    result["model"] = name
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"{name}_w{wbits}a{abits}"
        result["files"] = {"json": str(out / f"{tag}.json"), "png": str(out / f"{tag}.png")}
        write_json(result, out / f"{tag}.json")
        plot_blocks(result, out / f"{tag}.png")
    return result
