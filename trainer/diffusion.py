"""The forward diffusion process: named beta schedules, ``q_sample`` and the epsilon-prediction loss.

The network and the process are separate objects (as in improved-diffusion): ``Diffusion`` never owns a
model, ``training_losses(model, x0, t, noise)`` takes it as an argument and returns a dict of loss terms.
"""

from __future__ import annotations

import torch

from .schedules import BETA_SCHEDULES, beta_schedule  # noqa: F401  (re-exported)
from .spec import DiffusionConfig


class Diffusion:
    """Gaussian forward process with precomputed float64 quantities (cast on use)."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.betas = torch.from_numpy(beta_schedule(cfg))
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_timesteps = cfg.timesteps

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t.long()].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def training_losses(self, model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """epsilon-MSE (mean over C, H, W and the batch). Returns ``{"mse", "eps_pred", "x_t"}``.

        ``eps_pred`` and ``x_t`` are returned (not loss terms) so distillation can reuse the forward pass.
        """
        x_t = self.q_sample(x0, t, noise)
        eps = model(x_t, t)
        return {"mse": torch.mean((eps - noise) ** 2), "eps_pred": eps, "x_t": x_t}
