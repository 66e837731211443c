import math

import pytest
import torch

from lynx_compile.diffusion import NoiseSchedule, ddim_sample, denoising_loss, guided_eps


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_is_monotone_and_ends_near_pure_noise(kind):
    schedule = NoiseSchedule.named(kind)
    abar = schedule.alphas_cumprod
    assert schedule.steps == 1000
    assert ((schedule.betas > 0) & (schedule.betas < 1)).all()
    assert (abar[1:] < abar[:-1]).all()
    assert abar[0] > 0.99 and abar[-1] < 1e-3


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="linear"):
        NoiseSchedule.named("quadratic")


def test_add_noise_at_t0_is_nearly_identity_and_matches_variance():
    schedule = NoiseSchedule.linear()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4096, 1, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    x_t = schedule.add_noise(x0, noise, torch.zeros(x0.shape[0], dtype=torch.long))
    assert (x_t - x0).abs().max() < 0.05  # sqrt(1 - abar_0) = 0.01 times N(0, 1) noise
    # At the last step the signal is gone: x_T has unit variance whatever x0 was.
    x_last = schedule.add_noise(torch.ones_like(x0), noise, torch.full((x0.shape[0],), 999))
    assert abs(x_last.var().item() - 1) < 0.05 and abs(x_last.mean().item()) < 0.05


def _oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """The perfect eps model for a known x0: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    abar = schedule.alphas_cumprod

    def model(x_t, t, y):
        a = abar[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0[: x_t.shape[0]]) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("steps", [1, 10, 50])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddim_with_oracle_recovers_x0(kind, steps):
    schedule = NoiseSchedule.named(kind)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    out = ddim_sample(_oracle(schedule, x0), schedule, noise, y, steps=steps)
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_ddim_is_deterministic_and_rejects_bad_steps():
    schedule = NoiseSchedule.linear()
    model = lambda x, t, y: 0.1 * x  # noqa: E731
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(ddim_sample(model, schedule, noise, y, steps=5), ddim_sample(model, schedule, noise, y, steps=5))
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(model, schedule, noise, y, steps=0)


def test_guidance_combines_conditional_and_unconditional():
    null = 10
    model = lambda x, t, y: x * (y != null).to(x.dtype).reshape(-1, 1, 1, 1)  # noqa: E731  cond = x, uncond = 0
    x = torch.ones(3, 1, 2, 2)
    t = torch.zeros(3, dtype=torch.long)
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(guided_eps(model, x, t, y, 3.0, null), 3 * x)
    torch.testing.assert_close(guided_eps(model, x, t, y, 1.0, None), x)
    with pytest.raises(ValueError, match="null_class"):
        guided_eps(model, x, t, y, 2.0, None)


def test_denoising_loss_is_zero_for_the_oracle_and_reproducible():
    schedule = NoiseSchedule.linear()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(16, 1, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    y = torch.zeros(16, dtype=torch.long)
    assert denoising_loss(_oracle(schedule, x0), schedule, x0, y, generator=gen).item() < 1e-20
    model = lambda x, t, y: torch.zeros_like(x)  # noqa: E731  loss = E[eps^2] = 1
    first = denoising_loss(model, schedule, x0, y, generator=torch.Generator().manual_seed(3))
    second = denoising_loss(model, schedule, x0, y, generator=torch.Generator().manual_seed(3))
    assert first == second and math.isclose(first.item(), 1.0, rel_tol=0.5)
