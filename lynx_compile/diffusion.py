"""Minimal DDPM / DDIM machinery for training and sampling the small benchmark DiTs.

Kept here, without a diffusers dependency, so the training script, the quality harness and the
tests share one definition of the noise schedule, the loss and the sampler: a quality figure is
only comparable across variants if every variant sees exactly the same noising and sampling.

Conventions (DDPM, Ho et al. 2020; DDIM, Song et al. 2021): ``T`` discrete steps, ``t`` in
``[0, T)``, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; the model predicts ``eps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EpsModel = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``model(x_t, t, y) -> eps``: the DiT ``forward`` signature."""


@dataclass(frozen=True)
class NoiseSchedule:
    betas: Tensor
    """(T,) float64 per-step noise variances."""

    @property
    def steps(self) -> int:
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> Tensor:
        """abar_t = prod_{s <= t} (1 - beta_s), (T,) float64, strictly decreasing."""
        return torch.cumprod(1.0 - self.betas, dim=0)

    @classmethod
    def linear(cls, steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's schedule; beta_start / beta_end are given for 1000 steps and rescaled for others
        so the total noise added stays the same."""
        scale = 1000 / steps
        return cls(torch.linspace(scale * beta_start, scale * beta_end, steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's schedule: abar follows cos^2, so less of the schedule is spent on
        near-pure noise. ``max_beta`` avoids the singular beta = 1 at the last step."""
        f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + offset) / (1 + offset) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas)

    @classmethod
    def named(cls, kind: str, steps: int = 1000) -> NoiseSchedule:
        if kind == "linear":
            return cls.linear(steps)
        if kind == "cosine":
            return cls.cosine(steps)
        raise ValueError(f"noise schedule: expected 'linear' or 'cosine', got {kind!r}")

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast against ``like`` (B, ...)."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().to(like.dtype).reshape(shape), (1 - abar).sqrt().to(like.dtype).reshape(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Sample of q(x_t | x_0) for per-sample integer timesteps ``t`` (B,)."""
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise


def denoising_loss(
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: Tensor,
    y: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Epsilon-prediction MSE. Pass ``t`` and ``noise`` to evaluate every model on the same draws
    (held-out loss); otherwise they are drawn from ``generator`` (training)."""
    if t is None:
        t = torch.randint(0, schedule.steps, (x0.shape[0],), generator=generator).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator).to(x0)
    return F.mse_loss(model(schedule.add_noise(x0, noise, t), t, y), noise)


def guided_eps(model: EpsModel, x: Tensor, t: Tensor, y: Tensor, guidance_scale: float, null_class: int | None) -> Tensor:
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond), in one batched call.
    ``guidance_scale == 1`` is the plain conditional model (no extra evaluation)."""
    if guidance_scale == 1.0:
        return model(x, t, y)
    if null_class is None:
        raise ValueError("classifier-free guidance needs null_class (the label index of 'no class')")
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def ddim_timesteps(schedule: NoiseSchedule, steps: int) -> list[int]:
    """The timesteps ``ddim_sample`` visits, noisiest first: ``steps`` evenly spaced over ``[0, T)``."""
    if not 1 <= steps <= schedule.steps:
        raise ValueError(f"ddim_sample: steps must be in [1, {schedule.steps}], got {steps}")
    return torch.linspace(schedule.steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()


@torch.no_grad()
def ddim_sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    noise: Tensor,
    y: Tensor,
    *,
    steps: int = 50,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    clip_x0: bool = True,
) -> Tensor:
    """Deterministic DDIM (eta = 0) from the starting noise ``noise`` = x_T, in ``steps`` evenly
    spaced steps. Deterministic so that variants started from the same noise can be compared
    sample by sample. ``clip_x0`` clamps each x_0 estimate to the data range [-1, 1]."""
    abar = schedule.alphas_cumprod
    timesteps = ddim_timesteps(schedule, steps)
    x = noise
    for i, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = guided_eps(model, x, t_batch, y, guidance_scale, null_class)
        a_t = abar[t].item()
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            # Keep eps consistent with the clipped x0 so the update stays on the DDIM path.
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        a_next = abar[timesteps[i + 1]].item() if i + 1 < len(timesteps) else 1.0
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    return x


__all__ = ["EpsModel", "NoiseSchedule", "ddim_sample", "ddim_timesteps", "denoising_loss", "guided_eps"]
