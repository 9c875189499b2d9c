"""The rollout: sampling with classifier-free guidance and per-step log-probabilities.

Each sampler step is a Gaussian policy

    pi(x_{t-1} | x_t, c) = N(x_{t-1}; mu_theta(x_t, t, c), sigma_t^2 I),

with the guided noise prediction eps = eps_uncond + w (eps_cond - eps_uncond).
``step_with_log_prob`` computes mu and sigma exactly as diffusers' own
``scheduler.step`` does (one function per sampler family: DDIM with eta, and
DDPM with the posterior variance), draws x_{t-1} (or takes a given one) and
returns the *element-wise* Gaussian log-density, so that every algorithm picks
its own reduction (DDPO: mean over latent dimensions; PXPO: sum over channels
per position; PRDP: a sum or mean over dimensions).

DDPM with the posterior variance and DDIM with eta=1 define the same step:
sigma_t^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev) in both,
and the two means agree algebraically (``tests/test_sampling.py`` shows it).

Steps compute in at least float32 (a half-precision UNet's output is promoted)
and keep float64 when given float64, so that the identities in tests/ hold to
float64 rounding.

A step whose variance is exactly zero (DDPM's last step, where abar_prev = 1)
is deterministic: it is not a policy action, its log-prob is reported as 0 and
``Trajectory.stochastic`` marks it so that no algorithm trains on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: Tensor  # x_{t-1}            [B, C, h, w]
    log_prob: Tensor  # log N(x_{t-1}; mu, sigma^2), element-wise, >= fp32  [B, C, h, w]
    mean: Tensor  # mu_theta(x_t, t, c)       [B, C, h, w]
    std: Tensor  # sigma_t, broadcastable    [B, 1, 1, 1]


def _gather(values: Tensor, t: Tensor, fallback: float | Tensor) -> Tensor:
    """values[t] per sample, ``fallback`` where t < 0 (before the first training timestep)."""
    picked = values.to(t.device)[t.clamp(min=0)]
    return torch.where(t >= 0, picked, torch.as_tensor(fallback, dtype=picked.dtype, device=t.device))


def _predict_x0_eps(scheduler, model_output: Tensor, sample: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor]:
    """x0 and eps from the network output (DDIM paper eq. 12 / DDPM eq. 15), clipped as configured."""
    beta_prod_t = 1 - abar_t
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (sample - beta_prod_t.sqrt() * model_output) / abar_t.sqrt()
        eps = model_output
    elif kind == "sample":
        x0 = model_output
        eps = (sample - abar_t.sqrt() * x0) / beta_prod_t.sqrt()
    elif kind == "v_prediction":
        x0 = abar_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
        eps = abar_t.sqrt() * model_output + beta_prod_t.sqrt() * sample
    else:
        raise ValueError(f"prediction_type '{kind}' must be one of epsilon, sample, v_prediction")
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("dynamic thresholding is not supported by step_with_log_prob; set thresholding=False")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return x0, eps


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a step computes in: at least float32 (fp16/bf16 model outputs are promoted), and
    float64 when any input is float64 (identity tests run there)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _promote(*tensors: Tensor) -> list[Tensor]:
    dtype = compute_dtype(*tensors)
    return [t.to(dtype) for t in tensors]


def _gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Element-wise log N(x; mean, std^2) in at least fp32; 0 where std == 0 (a deterministic step)."""
    x, mean, std = _promote(x, mean, std)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    logp = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - LOG_SQRT_2PI
    return torch.where(std > 0, logp, torch.zeros_like(logp))


def _as_batch(timestep: Tensor | int, n: int, device) -> Tensor:
    t = torch.as_tensor(timestep, device=device, dtype=torch.long)
    return t.expand(n) if t.ndim == 0 else t


def _expand(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def ddim_step_with_log_prob(
    scheduler: DDIMScheduler,
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, eqs. 12 and 16) with its log-density.

    ``timestep`` may be one value or one per sample ([B]).
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("run scheduler.set_timesteps(num_steps) before stepping")
    model_output, sample = _promote(model_output, sample)
    dtype = sample.dtype
    t = _as_batch(timestep, sample.shape[0], sample.device)
    # 1. previous timestep: t - T / n
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # 2. alphas: abar_t and abar_{t-1} (final_alpha_cumprod before the first training step)
    abar_t = _expand(_gather(scheduler.alphas_cumprod, t, 1.0)).to(dtype)
    abar_prev = _expand(_gather(scheduler.alphas_cumprod, prev_t, scheduler.final_alpha_cumprod)).to(dtype)
    # 3-4. predicted x0 and eps (eq. 12), clipped as configured
    x0, eps = _predict_x0_eps(scheduler, model_output, sample, abar_t)
    # 5. sigma_t(eta) = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)   (eq. 16)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance.sqrt()
    # 6-7. mu = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps   (eq. 12 without the noise)
    mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).sqrt() * eps
    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=dtype)
        prev_sample = mean + std * variance_noise
    return StepOutput(prev_sample, _gaussian_log_prob(prev_sample, mean, std), mean, std)


def ddpm_step_with_log_prob(
    scheduler: DDPMScheduler,
    model_output: Tensor,
    timestep: Tensor | int,
    sample: Tensor,
    eta: float = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """One ancestral DDPM step (Ho et al. 2020, eqs. 6-7 and 15) with the posterior variance.

    ``eta`` is accepted for a uniform signature and ignored.
    """
    if scheduler.config.variance_type != "fixed_small":
        raise ValueError(
            f"DDPM variance_type '{scheduler.config.variance_type}' has no log-prob here; use 'fixed_small'"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("run scheduler.set_timesteps(num_steps) before stepping")
    model_output, sample = _promote(model_output, sample)
    dtype = sample.dtype
    t = _as_batch(timestep, sample.shape[0], sample.device)
    # previous timestep: the next entry of scheduler.timesteps, -1 after the last
    timesteps = scheduler.timesteps.to(sample.device)
    index = (timesteps[None, :] == t[:, None]).float().argmax(dim=1)
    prev_t = torch.cat([timesteps, timesteps.new_tensor([-1])])[index + 1]
    # 1. alphas and betas of the (possibly skipped) step t -> prev_t
    abar_t = _expand(_gather(scheduler.alphas_cumprod, t, 1.0)).to(dtype)
    abar_prev = _expand(_gather(scheduler.alphas_cumprod, prev_t, 1.0)).to(dtype)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    # 2-3. predicted x0 (eq. 15), clipped as configured
    x0, _ = _predict_x0_eps(scheduler, model_output, sample, abar_t)
    # 4-5. posterior mean mu_t(x_t, x0)   (eq. 7)
    mean = (abar_prev.sqrt() * beta_t / (1 - abar_t)) * x0 + (alpha_t.sqrt() * (1 - abar_prev) / (1 - abar_t)) * sample
    # 6. posterior variance beta~_t = (1 - abar_prev) / (1 - abar_t) * beta_t; zero on the last step
    std = ((1 - abar_prev) / (1 - abar_t) * beta_t).clamp(min=0).sqrt()
    std = torch.where(_expand(prev_t) >= 0, std, torch.zeros_like(std))
    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=sample.device, dtype=dtype)
        prev_sample = mean + std * variance_noise
    return StepOutput(prev_sample, _gaussian_log_prob(prev_sample, mean, std), mean, std)


def step_with_log_prob(scheduler, *args, **kwargs) -> StepOutput:
    """Dispatch on the scheduler family (DDIM or DDPM)."""
    if isinstance(scheduler, DDIMScheduler):
        return ddim_step_with_log_prob(scheduler, *args, **kwargs)
    if isinstance(scheduler, DDPMScheduler):
        return ddpm_step_with_log_prob(scheduler, *args, **kwargs)
    raise TypeError(f"no step_with_log_prob for {type(scheduler).__name__}; use sampler.scheduler=ddim or ddpm")


def make_scheduler(family: str, base_config) -> DDIMScheduler | DDPMScheduler:
    """The sampler family's scheduler, built from the pipeline's scheduler config."""
    if family == "ddim":
        return DDIMScheduler.from_config(base_config)
    if family == "ddpm":
        return DDPMScheduler.from_config(base_config, variance_type="fixed_small")
    raise ValueError(f"sampler.scheduler '{family}' is not one of ddim, ddpm")


# --------------------------------------------------------------------------- rollout


@dataclass
class Trajectory:
    """A batch of sampled trajectories (all tensors on CPU or the run device, batch first)."""

    latents: Tensor  # x_T, ..., x_0                                   [B, S+1, C, h, w] >= fp32
    log_probs: Tensor  # reduce(log pi_old(x_{j+1} | x_j, c)) per step   [B, S, *reduced]
    timesteps: Tensor  # scheduler timestep of step j                    [S] long
    stochastic: Tensor  # False for deterministic steps (not trainable)  [S] bool
    prompt_embeds: Tensor  # text-encoder states of the prompt           [B, L, D]
    images: Tensor  # decoded x_0 in [0, 1]                              [B, 3, H, W] fp32

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]


class Sampler:
    """A scheduler family plus the sampling settings (steps, eta, guidance)."""

    def __init__(self, scheduler, num_steps: int, eta: float, guidance_scale: float):
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.eta = eta
        self.guidance_scale = guidance_scale
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.clone()  # [S]
        probe = torch.zeros(num_steps, 1, 1, 1)
        stds = step_with_log_prob(scheduler, probe, self.timesteps, probe, eta=eta, variance_noise=probe).std
        self.stochastic = stds.flatten() > 0  # [S]

    def guided_noise(self, unet, latents: Tensor, t: Tensor, embeds: Tensor, negative: Tensor) -> Tensor:
        """eps_uncond + w (eps_cond - eps_uncond), one UNet call on the doubled batch, in at least fp32."""
        b = latents.shape[0]
        t = _as_batch(t, b, latents.device)
        x = torch.cat([latents, latents])
        emb = torch.cat([negative.expand(b, -1, -1), embeds])
        eps = unet(x.to(embeds.dtype), torch.cat([t, t]), encoder_hidden_states=emb).sample
        eps_uncond, eps_cond = eps.to(compute_dtype(eps)).chunk(2)
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def log_prob(
        self, unet, latents: Tensor, next_latents: Tensor, t: Tensor, embeds: Tensor, negative: Tensor
    ) -> Tensor:
        """Element-wise log pi(next_latents | latents, c) under ``unet``  [b, C, h, w]."""
        eps = self.guided_noise(unet, latents, t, embeds, negative)
        return step_with_log_prob(self.scheduler, eps, t, latents, eta=self.eta, prev_sample=next_latents).log_prob

    @torch.no_grad()
    def sample(
        self,
        unet,
        decode: Callable[[Tensor], Tensor],
        embeds: Tensor,
        negative: Tensor,
        noise_shape: tuple[int, int, int],
        noise: Tensor | torch.Generator,
        reduce: Callable[[Tensor], Tensor],
        autocast=None,
    ) -> Trajectory:
        """Sample ``len(embeds)`` trajectories.

        ``noise``: each sample's x_T and step noises  [B, S+1, C, h, w] (``rlft.seeding.sample_noise``:
        one generator per sample, so the result does not depend on how samples are batched); or a CPU
        generator from which x_T, then each step's noise, are drawn for the whole batch in turn.
        """
        b, S = embeds.shape[0], len(self.timesteps)
        if isinstance(noise, torch.Generator):  # x_T, then each step's noise, for the whole batch in turn
            noise = torch.stack([torch.randn((b, *noise_shape), generator=noise) for _ in range(S + 1)], dim=1)
        if tuple(noise.shape) != (b, S + 1, *noise_shape):
            raise ValueError(f"noise of shape {tuple(noise.shape)}; expected {(b, S + 1, *noise_shape)}")
        device = embeds.device
        noise = noise.to(device, compute_dtype(embeds))  # fp32, or fp64 for a float64 model
        x = noise[:, 0] * self.scheduler.init_noise_sigma
        latents, log_probs = [x], []
        for j, t in enumerate(self.timesteps):
            with (autocast or nullcontext)():
                eps = self.guided_noise(unet, x, t.to(device), embeds, negative)
            out = step_with_log_prob(self.scheduler, eps, t.to(device), x, eta=self.eta, variance_noise=noise[:, j + 1])
            x = out.prev_sample
            latents.append(x)
            log_probs.append(reduce(out.log_prob))
        with (autocast or nullcontext)():
            images = decode(x)
        return Trajectory(
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=self.timesteps.clone(),
            stochastic=self.stochastic.clone(),
            prompt_embeds=embeds,
            images=images.float(),
        )
