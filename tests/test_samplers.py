"""Schedule and sampler math against independent formulas and exact analytic cases."""

import numpy as np
import pytest
import torch

from bdmtool.trainer.diffusion import Diffusion, beta_schedule
from bdmtool.trainer.samplers import (DDIMSampler, DDPMSampler, ddim_timesteps, make_sampler, sample_loop)
from bdmtool.trainer.spec import DiffusionConfig

D = Diffusion(DiffusionConfig())  # float64 tables


@pytest.fixture(autouse=True)
def _float64():
    """These math checks run in float64; restore the default so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_linear_schedule_values():
    b = beta_schedule(DiffusionConfig())
    assert b.shape == (1000,) and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999)
    ldm = beta_schedule(DiffusionConfig(schedule="ldm_linear", beta_start=0.0015, beta_end=0.0195))
    assert ldm[0] == pytest.approx(0.0015) and ldm[-1] == pytest.approx(0.0195)
    assert np.allclose(np.sqrt(ldm), np.linspace(np.sqrt(0.0015), np.sqrt(0.0195), 1000))
    cos = beta_schedule(DiffusionConfig(schedule="cosine"))
    assert (cos > 0).all() and cos.max() <= 0.999


def test_q_sample_marginal_statistics():
    x0 = torch.full((20000, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = D.q_sample(x0, t, torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)))
    abar = float(D.alphas_cumprod[300])
    assert float(xt.mean()) == pytest.approx(0.7 * abar**0.5, abs=0.02)
    assert float(xt.var()) == pytest.approx(1 - abar, rel=0.03)


def test_uniform_and_quad_spacing_match_ermongroup():
    assert ddim_timesteps(1000, 100, "uniform") == list(range(0, 1000, 10))
    assert ddim_timesteps(1000, 50, "uniform")[:3] == [0, 20, 40]
    quad = ddim_timesteps(1000, 100, "quad")
    assert len(quad) == 100 and quad[:8] == [0, 0, 0, 0, 1, 2, 2, 3]
    assert quad[-1] == 800 and len(set(quad)) == 96  # ermongroup: max 0.8T, 96 distinct at 100 steps
    assert quad == sorted(quad)
    with pytest.raises(ValueError, match="unknown timestep skip"):
        ddim_timesteps(1000, 10, "cubic")


def _toy_eps(x, t):  # a smooth, t-dependent, nonlinear stand-in for a network
    return torch.tanh(x * 0.9 + t[:, None] / 1000.0) * 0.8


def test_ddim_eta0_all_steps_is_the_deterministic_ode_euler_step():
    """DDIM(eta=0) == Euler on d(x/sqrt(a)) = eps d(sqrt(1/a - 1)) (Song et al. 2021, eq. 14)."""
    s = DDIMSampler(D, eta=0.0)
    s.set_timesteps(1000)
    assert s.timesteps == list(range(999, -1, -1))
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    out = sample_loop(_toy_eps, s, x_T)
    abar = D.alphas_cumprod
    xbar = x_T / abar[999].sqrt()
    for t in range(999, -1, -1):
        a = abar[t]
        a_prev = abar[t - 1] if t > 0 else torch.tensor(1.0)
        eps = _toy_eps(xbar * a.sqrt(), torch.full((4,), float(t)))
        xbar = xbar + ((1 / a_prev - 1).sqrt() - (1 / a - 1).sqrt()) * eps
    assert torch.allclose(out, xbar, atol=1e-10)


def test_ddim_eta1_all_steps_equals_ddpm_posterior_variance():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(2))
    ddim, ddpm = DDIMSampler(D, eta=1.0), DDPMSampler(D, var_type="fixedsmall")
    ddim.set_timesteps(1000)
    ddpm.set_timesteps(1000)
    # DDPM adds no noise on its last step; DDIM's sigma is 0 there too (a_prev = 1) -> same RNG use.
    assert torch.allclose(sample_loop(_toy_eps, ddim, x_T, g1), sample_loop(_toy_eps, ddpm, x_T, g2), atol=1e-8)


def test_ddim_matches_diffusers_scheduler():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(20)
    s = DDIMSampler(D, eta=0.0)
    s.set_timesteps(20)
    assert s.timesteps == [int(t) for t in sched.timesteps]
    x = torch.randn(3, 4, dtype=torch.float32)
    ref = x.clone()
    for i, t in enumerate(s.timesteps):
        tb = torch.full((3,), float(t))
        x = s.step(_toy_eps(x.double(), tb).float(), i, x, None)
        ref = sched.step(_toy_eps(ref.double(), tb).float(), t, ref, eta=0.0).prev_sample
    assert torch.allclose(x.float(), ref, atol=1e-5)


@pytest.mark.parametrize("name,steps", [("ddim", 20), ("ddpm", 1000), ("plms", 20), ("dpmsolver", 15)])
def test_every_sampler_recovers_a_point_mass_with_the_exact_eps(name, steps):
    """For data = a single point x*, the exact eps is (x - sqrt(a) x*)/sqrt(1-a); every sampler must land on x*."""
    target = torch.tensor([[0.5, -0.25, 0.9]], dtype=torch.float32)

    def exact_eps(x, t):
        a = D.alphas_cumprod[t.long()].to(x.dtype)[:, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    sampler = make_sampler(name, D)
    sampler.set_timesteps(steps)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    out = sample_loop(exact_eps, sampler, x_T, torch.Generator().manual_seed(1))
    assert torch.allclose(out, target.expand_as(out), atol=2e-2), (name, out)


def test_sampler_misuse_errors():
    with pytest.raises(RuntimeError, match="set_timesteps"):
        DDIMSampler(D).timesteps
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", D)
    with pytest.raises(ValueError, match="eta must be"):
        DDIMSampler(D, eta=-1)


def test_clip_x0_clamps_the_prediction_and_is_off_by_default():
    s = DDIMSampler(D, eta=0.0)
    c = DDIMSampler(D, eta=0.0, clip_x0=True)
    for smp in (s, c):
        smp.set_timesteps(10)
    x = torch.full((1, 2), 3.0)
    eps = torch.zeros(1, 2)  # predicted x0 = x / sqrt(a) >> 1
    a, a_prev = float(D.alphas_cumprod[900]), float(D.alphas_cumprod[800])
    assert s.timesteps[0] == 900 and not s.clip_x0
    assert torch.allclose(s.step(eps, 0, x, None), a_prev**0.5 * x / a**0.5)
    x0 = torch.ones(1, 2)
    eps_c = (x - a**0.5 * x0) / (1 - a) ** 0.5
    assert torch.allclose(c.step(eps, 0, x, None), a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps_c)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "plms", "dpmsolver"])
def test_clip_x0_in_every_sampler_is_the_step_on_the_eps_of_the_clamped_x0(name):
    """clip_x0 in every sampler: the clipped step equals the unclipped step fed the eps re-derived from
    clamp(x0, -1, 1), and it changes the result when the predicted x0 is out of range."""
    from bdmtool.trainer.samplers import clip_eps

    def first_step(clip, eps):
        s = make_sampler(name, D, clip_x0=clip)
        s.set_timesteps(10)
        return s.step(eps, 0, x, torch.Generator().manual_seed(0)), s

    x = torch.full((1, 1, 2, 2), 3.0)
    eps = torch.zeros_like(x) - 0.5  # predicted x0 = (x + 0.5 sqrt(1-a)) / sqrt(a) >> 1
    clipped, s = first_step(True, eps)
    a = float(D.alphas_cumprod[s.timesteps[0]])
    x0_c, eps_c = clip_eps(eps, x, a)
    assert torch.allclose(x0_c, torch.ones_like(x))
    assert torch.allclose(clipped, first_step(False, eps_c)[0])
    assert not torch.allclose(clipped, first_step(False, eps)[0])


def test_user_facing_sampling_clips_by_default():
    from bdmtool.trainer.sampling import SampleOptions

    assert SampleOptions().clip_x0 and not SampleOptions(clip_x0=False).clip_x0


def test_interrupted_sampling_continues_with_the_same_images(tmp_path, micro_overrides, monkeypatch):
    """Kept batches + the generator state after each: a sampling run stopped in its third batch and started
    again samples only what is missing and writes the uninterrupted run's images (eta=1: the per-step noise
    continues across batches); another option never reuses them."""
    import numpy as np

    import bdmtool.trainer.sampling as S
    from bdmtool.trainer.checkpoint import atomic_save, make_checkpoint
    from bdmtool.trainer.spec import build_train_spec
    from bdmtool.trainer.unet import UNet

    torch.set_default_dtype(torch.float32)  # a real model (the fixture restores float64 afterwards)
    spec = build_train_spec("tiny", "digits", 1, micro_overrides)
    ckpt = tmp_path / "m.ckpt"
    atomic_save(make_checkpoint(spec, 0, UNet(spec.unet).state_dict()), ckpt)
    opts = S.SampleOptions(n=6, steps=3, eta=1.0, batch_size=2, seed=3)
    _, ref = S.sample_checkpoint(ckpt, tmp_path / "ref", opts, progress=False)

    real, calls = S.sample_loop, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "sample_loop", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.sample_checkpoint(ckpt, tmp_path / "run", opts, progress=False)
    kept = sorted(p.name for p in (tmp_path / "run.partial").glob("batch_*.npz"))
    assert kept == ["batch_0.npz", "batch_1.npz"]
    calls.clear()
    monkeypatch.setattr(S, "sample_loop", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    _, got = S.sample_checkpoint(ckpt, tmp_path / "run", opts, progress=False)
    assert len(calls) == 1  # only the missing batch
    assert np.array_equal(np.load(got)["arr_0"], np.load(ref)["arr_0"])
    assert not (tmp_path / "run.partial").exists()

    S.PartialSamples(tmp_path / "x.partial", {"seed": 1}).save(0, np.zeros((2, 8, 8, 1), np.uint8), torch.zeros(4))
    assert S.PartialSamples(tmp_path / "x.partial", {"seed": 2}).load(0) is None  # another key: discarded
