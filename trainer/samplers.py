"""Reverse-process samplers: DDPM and DDIM written here, PLMS and DPM-Solver++ reused from diffusers.

A sampler holds only schedule state. ``set_timesteps(n)`` picks the timesteps, ``timesteps`` lists them
in evaluation order (descending), and ``step(eps, i, x, generator)`` maps x_{t_i} to the next state.
``sample_loop(eps_fn, sampler, x_T)`` runs any of them over any epsilon function: a PyTorch model,
a stateful binarized model with timestep caches, or a ``.tflite`` interpreter.

DDIM follows ermongroup/ddim ``generalized_steps`` exactly (abar_{-1} = 1), including its ``uniform`` and
``quad`` timestep skipping (diffusers cannot express ``quad``). ``clip_x0`` (off in the sampler classes,
on in every user-facing path through ``SampleOptions``) clamps the predicted x0 to [-1, 1] and re-derives
eps from it (diffusers' ``clip_sample``); for pixel-space models this stops a DC error in eps, which DDIM
multiplies by sqrt((1 - abar) / abar) ~ 100 at high t, from saturating a sample.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import Diffusion

SKIP_TYPES = ("uniform", "quad")


def ddim_timesteps(num_train: int, steps: int, skip: str = "uniform") -> list[int]:
    """Ascending timestep subsequence of length ~``steps`` (ermongroup/ddim ``runners/diffusion.py``).

    ``uniform``: ``range(0, T, T // steps)`` (T=1000, 100 steps -> 0, 10, ..., 990).
    ``quad``: ``int(s)`` for ``s`` in ``linspace(0, sqrt(0.8 T), steps) ** 2`` -> max 0.8 T; small
    timesteps repeat (100 steps give 96 distinct values) and the repeats are no-op steps, as upstream.
    """
    if not 1 <= steps <= num_train:
        raise ValueError(f"--steps must be in [1, {num_train}] (the model's training timesteps), got {steps}")
    if skip == "uniform":
        return list(range(0, num_train, num_train // steps))
    if skip == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(num_train * 0.8), steps) ** 2]
    raise ValueError(f"unknown timestep skip {skip!r}; choose from {list(SKIP_TYPES)}")


class Sampler(abc.ABC):
    """Schedule state of one reverse process. Call ``set_timesteps`` before ``step``."""

    name = "sampler"

    def __init__(self, diffusion: Diffusion, clip_x0: bool = False):
        self.diffusion = diffusion
        self.abar = diffusion.alphas_cumprod  # float64 [T]
        self.clip_x0 = clip_x0
        self._timesteps: list[int] | None = None

    @property
    def timesteps(self) -> list[int]:
        """Timesteps in evaluation order (descending)."""
        if self._timesteps is None:
            raise RuntimeError(f"{type(self).__name__}.set_timesteps(n) must be called before sampling")
        return self._timesteps

    @abc.abstractmethod
    def set_timesteps(self, n: int) -> None: ...

    @abc.abstractmethod
    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Map x at ``timesteps[i]`` and the predicted noise to the state at ``timesteps[i + 1]``."""

    def _prev_abar(self, i: int) -> float:
        ts = self.timesteps
        return 1.0 if i + 1 >= len(ts) else float(self.abar[ts[i + 1]])


def clip_eps(eps: torch.Tensor, x: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) with x0 = clamp((x - sqrt(1-a) eps) / sqrt(a), -1, 1) and eps re-derived from that x0."""
    x0 = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)
    return x0, (x - a**0.5 * x0) / (1 - a) ** 0.5


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise from ``generator``'s device (the CPU one of sampling.py: the same numbers on every device)."""
    if generator is None or generator.device == x.device:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)


class _SkippingSampler(Sampler):
    """Samplers that run on an ermongroup timestep subsequence (``uniform`` or ``quad``)."""

    def __init__(self, diffusion: Diffusion, skip: str, clip_x0: bool):
        super().__init__(diffusion, clip_x0)
        if skip not in SKIP_TYPES:
            raise ValueError(f"unknown timestep skip {skip!r}; choose from {list(SKIP_TYPES)}")
        self.skip = skip

    def set_timesteps(self, n: int) -> None:
        self._timesteps = ddim_timesteps(self.diffusion.num_timesteps, n, self.skip)[::-1]


class DDIMSampler(_SkippingSampler):
    """DDIM (Song et al. 2021), eq. 12 with sigma = eta * sqrt((1-a')/(1-a) * (1-a/a')).

    x0 = (x - sqrt(1-a) eps)/sqrt(a);  x' = sqrt(a') x0 + sigma z + sqrt(1 - a' - sigma^2) eps.
    eta = 0 is the deterministic probability-flow step; eta = 1 with every timestep equals DDPM with the
    posterior ("fixedsmall") variance.
    """

    name = "ddim"

    def __init__(self, diffusion: Diffusion, eta: float = 0.0, skip: str = "uniform", clip_x0: bool = False):
        super().__init__(diffusion, skip, clip_x0)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta

    def step(self, eps, i, x, generator):
        a, a_prev = float(self.abar[self.timesteps[i]]), self._prev_abar(i)
        if self.clip_x0:  # diffusers' clip_sample: clamp x0 and re-derive eps from it
            x0, eps = clip_eps(eps, x, a)
        else:
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        sigma = self.eta * ((1 - a / a_prev) * (1 - a_prev) / (1 - a)) ** 0.5
        out = a_prev ** 0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * _noise_like(x, generator)
        return out


class DDPMSampler(_SkippingSampler):
    """Ancestral sampling (Ho et al. 2020) on a timestep subsequence (every step by default).

    Posterior mean from the predicted x0; variance ``fixedlarge`` (beta_t, the CIFAR-10 DDPM setting) or
    ``fixedsmall`` (the true posterior variance). No noise is added on the last step.
    """

    name = "ddpm"

    def __init__(self, diffusion: Diffusion, var_type: str = "fixedlarge", skip: str = "uniform",
                 clip_x0: bool = False):
        super().__init__(diffusion, skip, clip_x0)
        if var_type not in ("fixedlarge", "fixedsmall"):
            raise ValueError(f"var_type must be 'fixedlarge' or 'fixedsmall', got {var_type!r}")
        self.var_type = var_type

    def step(self, eps, i, x, generator):
        a, a_prev = float(self.abar[self.timesteps[i]]), self._prev_abar(i)
        beta = 1 - a / a_prev
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
        mean = (a_prev**0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - a_prev) * x) / (1 - a)
        if i + 1 >= len(self.timesteps):
            return mean
        var = beta if self.var_type == "fixedlarge" else beta * (1 - a_prev) / (1 - a)
        return mean + var**0.5 * _noise_like(x, generator)


class DiffusersSampler(Sampler):
    """PLMS (``PNDMScheduler(skip_prk_steps=True)``) or DPM-Solver++ (2M) from diffusers, on our betas.

    ``clip_x0`` hands the scheduler the eps re-derived from the clamped x0 (both solvers are written in
    eps, or convert eps to x0 internally, so this is the same clamp DDIM applies)."""

    def __init__(self, diffusion: Diffusion, kind: str, clip_x0: bool = False):
        super().__init__(diffusion, clip_x0)
        try:
            import diffusers
        except ImportError as e:  # pragma: no cover - diffusers is in the lock file
            raise RuntimeError(f"sampler {kind!r} needs diffusers (pip install diffusers): {e}") from None
        betas = diffusion.betas.float().numpy()
        common = dict(num_train_timesteps=diffusion.num_timesteps, trained_betas=betas)
        if kind == "plms":
            self.scheduler = diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True, **common)
        elif kind == "dpmsolver":
            self.scheduler = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                                   **common)
        else:
            raise ValueError(f"unknown diffusers sampler {kind!r}; choose 'plms' or 'dpmsolver'")
        self.name = kind

    def set_timesteps(self, n: int) -> None:
        self.scheduler.set_timesteps(n)
        self._timesteps = [int(t) for t in self.scheduler.timesteps]

    def step(self, eps, i, x, generator):
        t = self.scheduler.timesteps[i]
        if self.clip_x0:
            eps = clip_eps(eps, x, float(self.abar[int(t)]))[1].to(eps.dtype)
        return self.scheduler.step(eps, t, x).prev_sample  # both are deterministic multistep solvers


SAMPLERS = ("ddim", "ddpm", "plms", "dpmsolver")


def check_sampler_settings(name: str, eta: float, skip: str) -> None:
    """Refuse an eta or a timestep skip the sampler ``name`` would ignore (one line naming the option)."""
    if name in SAMPLERS and name != "ddim" and eta != 0:
        raise ValueError(f"--eta {eta} applies to --sampler ddim only ({name} has no eta); drop it or use ddim")
    if name in ("plms", "dpmsolver") and skip != "uniform":
        raise ValueError(f"--skip {skip} applies to ddim and ddpm only ({name} spaces its own timesteps); drop it")


def make_sampler(name: str, diffusion: Diffusion, eta: float = 0.0, skip: str = "uniform",
                 clip_x0: bool = False) -> Sampler:
    """Build a sampler by name: ``ddim`` (eta, skip, clip_x0), ``ddpm`` (skip, clip_x0), ``plms`` and
    ``dpmsolver`` (clip_x0). A setting the chosen sampler has no use for is refused, not ignored."""
    check_sampler_settings(name, eta, skip)
    if name == "ddim":
        return DDIMSampler(diffusion, eta=eta, skip=skip, clip_x0=clip_x0)
    if name == "ddpm":
        return DDPMSampler(diffusion, skip=skip, clip_x0=clip_x0)
    if name in ("plms", "dpmsolver"):
        return DiffusersSampler(diffusion, name, clip_x0=clip_x0)
    raise ValueError(f"unknown sampler {name!r}; choose from {list(SAMPLERS)}")


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_loop(eps_fn: EpsFn, sampler: Sampler, x_T: torch.Tensor, generator: torch.Generator | None = None,
                progress: bool = False, on_start: Callable[[], None] | None = None) -> torch.Tensor:
    """Run the reverse process from ``x_T``. ``eps_fn(x, t[B]) -> eps``; ``on_start`` resets model state
    (e.g. timestep caches) before the first step. Returns x_0 (unclipped; callers clamp to [-1, 1])."""
    if on_start is not None:
        on_start()
    x = x_T
    ts = sampler.timesteps
    for i, t in enumerate(tqdm(ts, desc=f"{sampler.name} sampling", disable=not progress, leave=False)):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device)
        eps = eps_fn(x, t_batch)
        x = sampler.step(eps.to(x.dtype), i, x, generator)
    return x
