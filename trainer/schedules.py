"""Named beta schedules (numpy only, no torch: the exporter's sidecar uses them too).

Schedules may be added but never changed once committed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .spec import DiffusionConfig


def _linear(cfg: DiffusionConfig) -> np.ndarray:
    """DDPM linear schedule (Ho et al. 2020): beta_t = linspace(beta_start, beta_end, T)."""
    return np.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=np.float64)


def _ldm_linear(cfg: DiffusionConfig) -> np.ndarray:
    """Latent-diffusion "linear": linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2."""
    return np.linspace(math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end), cfg.timesteps, dtype=np.float64) ** 2


def _quad(cfg: DiffusionConfig) -> np.ndarray:
    """ermongroup/ddim "quad": the same as ``ldm_linear`` (linear in sqrt(beta))."""
    return _ldm_linear(cfg)


def _cosine(cfg: DiffusionConfig) -> np.ndarray:
    """Nichol & Dhariwal 2021 cosine schedule (s = 0.008, betas clipped at 0.999); ignores beta_start/end."""
    s, n = 0.008, cfg.timesteps
    f = np.cos(((np.arange(n + 1, dtype=np.float64) / n) + s) / (1 + s) * math.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0.0, 0.999)


BETA_SCHEDULES: dict[str, Callable[[DiffusionConfig], np.ndarray]] = {
    "linear": _linear,
    "ldm_linear": _ldm_linear,
    "quad": _quad,
    "cosine": _cosine,
}


def beta_schedule(cfg: DiffusionConfig) -> np.ndarray:
    """Return float64 betas [T] for the named schedule. Schedules may be added but never changed."""
    if cfg.schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {cfg.schedule!r}; choose from {sorted(BETA_SCHEDULES)}")
    return BETA_SCHEDULES[cfg.schedule](cfg)
