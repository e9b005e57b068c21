"""Typed configs: presets, validation messages naming the key, strict round-trips and overrides."""

import pytest

from bdmtool.trainer.config import ConfigError
from bdmtool.trainer.spec import UNET_PRESETS, TrainSpec, UNetConfig, build_train_spec


@pytest.mark.parametrize("name", sorted(UNET_PRESETS))
def test_presets_round_trip(name):
    cfg = UNetConfig.from_name(name)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_are_errors_with_valid_keys_listed():
    with pytest.raises(ConfigError, match=r"unknown UNetConfig key\(s\) \['unet.chanels'\]"):
        TrainSpec.from_dict({"unet": {"chanels": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        TrainSpec().with_overrides(["train.learning_rate=1e-4"])


def test_overrides_are_typed_and_validated():
    spec = TrainSpec().with_overrides(["train.lr=1e-4", "unet.ch_mult=[1,2]", "train.ema_decay=0.99"])
    assert spec.train.lr == 1e-4 and spec.unet.ch_mult == (1, 2) and spec.train.ema_decay == 0.99
    with pytest.raises(ConfigError, match=r"train.ema_decay must be in \(0, 1\), got 1.5"):
        TrainSpec().with_overrides(["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        TrainSpec().with_overrides(["train.steps=lots"])
    with pytest.raises(ConfigError, match="diffusion.schedule must be one of"):
        TrainSpec().with_overrides(["diffusion.schedule=sigmoid"])
    with pytest.raises(ConfigError, match="key=value"):
        TrainSpec().with_overrides(["train.lr"])


def test_cross_field_checks_name_the_fix():
    with pytest.raises(ConfigError, match="divisible by unet.num_groups"):
        UNetConfig(ch=48)
    with pytest.raises(ConfigError, match="attn_resolutions \\[12\\]"):
        UNetConfig(attn_resolutions=(12,))
    with pytest.raises(ConfigError, match="data.channels=3"):
        build_train_spec("tiny", "digits", overrides=["data.channels=3"])
    with pytest.raises(ConfigError, match="unknown U-Net preset 'huge'"):
        build_train_spec("huge")


def test_configs_are_frozen_and_hashable():
    cfg = UNetConfig()
    with pytest.raises(AttributeError):
        cfg.ch = 64
    assert hash(cfg) == hash(UNetConfig.from_dict(cfg.to_dict()))


def test_compiled_kernels_without_a_compiler_is_a_config_error(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler on PATH.*train.kernels=eager"):
        build_train_spec("tiny", "digits", 1, ["train.kernels=compiled"])
