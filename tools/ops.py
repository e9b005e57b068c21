"""``bdmtool ops``: size / BOPs / OPs of a checkpoint or a preset (pixel U-Net, LDM U-Net, LDM autoencoder)."""

from __future__ import annotations

from pathlib import Path


def account(ckpt: str | Path | None = None, preset: str | None = None, wbits: int | None = None,
            abits: int | None = None, method: str | None = None, convention=None,
            out: str | Path | None = None) -> dict:
    """Size and OPs of ``ckpt`` (its own bits and FP layers; ``wbits`` / ``abits`` / ``method`` given with it
    must agree with it) or of ``preset`` at ``wbits`` / ``abits`` (default 1 / 4) under ``method``'s FP-layer
    rule (default binarydm)."""
    from bdmtool.trainer.layers import unet_example_inputs
    from bdmtool.trainer.ldm_autoencoder import Autoencoder, AutoencoderConfig
    from bdmtool.trainer.ldm_unet import LDMUNet, LDMUNetConfig
    from bdmtool.trainer.ops import LDM_FP_PATTERNS, OpsConvention, count, plot_blocks, write_json
    from bdmtool.trainer.spec import UNET_PRESETS, BinarizeConfig, UNetConfig
    from bdmtool.trainer.unet import UNet

    convention = convention or OpsConvention()
    if ckpt is not None:
        if preset is not None:
            raise ValueError("give a checkpoint or --preset, not both")
        model, inputs, fp_patterns, wbits, abits = _checkpoint_model(ckpt, wbits, abits, method)
        name = Path(ckpt).stem
    elif preset in LDMUNetConfig.PRESETS:
        method = method or "binarydm"
        if method not in LDM_FP_PATTERNS:
            raise ValueError(f"--method {method!r} has no FP-layer rule for the LDM U-Net: one of {sorted(LDM_FP_PATTERNS)}")
        model = LDMUNet(LDMUNetConfig.from_name(preset))
        fp_patterns = LDM_FP_PATTERNS[method]
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
        fp_patterns = tuple(BinarizeConfig.from_method(method or "binarydm").keep_fp)
        inputs = unet_example_inputs(cfg)
        name = preset
    else:
        what = f"unknown --preset {preset!r}" if preset else "give a checkpoint or --preset"
        raise ValueError(f"{what}: one of {sorted(UNET_PRESETS)} (pixel U-Net) or "
                         f"{sorted(LDMUNetConfig.PRESETS)} (LDM U-Net) or {sorted(AutoencoderConfig.PRESETS)} (LDM autoencoders)")
    if ckpt is None:
        wbits, abits = wbits or 1, abits or 4
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


def _checkpoint_model(ckpt, wbits, abits, method):
    """The U-Net of ``ckpt`` (shapes only: weights change neither sizes nor OPs), example inputs, its FP layers and
    bits; ``wbits`` / ``abits`` / ``method`` given by the user must be the checkpoint's own."""
    from bdmtool.trainer.checkpoint import read_spec
    from bdmtool.trainer.layers import unet_example_inputs
    from bdmtool.trainer.spec import UNET_PRESETS, UNetConfig
    from bdmtool.trainer.unet import UNet

    spec = read_spec(ckpt)
    b = spec.binarize
    own = {"--wbits": 1 if b else 32, "--abits": b.abits if b else 32, "--method": b.method if b else "fp"}
    like = next((n for n in UNET_PRESETS if UNetConfig.from_name(n) == spec.unet), "PRESET")
    for flag, given in (("--wbits", wbits), ("--abits", abits), ("--method", method)):
        if given is not None and given != own[flag]:
            raise ValueError(f"{ckpt} is a {own['--method']} W{own['--wbits']}A{own['--abits']} checkpoint: {flag} "
                             f"{given} does not apply to it; drop {flag}, or count --preset {like} {flag} {given} instead")
    return (UNet(spec.unet), unet_example_inputs(spec.unet), tuple(b.keep_fp) if b else (), own["--wbits"],
            own["--abits"])
