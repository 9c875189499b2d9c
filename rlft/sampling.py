"""The rollout: sampler families with per-step log-probabilities.

Each sampler step is a Gaussian policy

    pi(x_{t-1} | x_t, c) = N(x_{t-1}; mu_theta(x_t, t, c), sigma_t^2 I),

with the guided model output of ``policy.predict`` (rlft/policy.py). Each family's
``step_with_log_prob`` computes mu and sigma exactly as diffusers' own
``scheduler.step`` does (:class:`DDIM` with eta, :class:`DDPM` with the
posterior variance), draws x_{t-1} (or takes a given one) and
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

import inspect
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from rlft.errors import ConfigError, check_interrupted
from rlft.policy import Conditioning, Policy

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
    eta: float | Tensor = 1.0,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """One DDIM step (Song et al. 2021, eqs. 12 and 16) with its log-density.

    ``timestep`` may be one value or one per sample ([B]); so may ``eta`` ([B, 1, 1, 1]).
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
    std = (eta.to(dtype) if torch.is_tensor(eta) else eta) * variance.sqrt()
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


# --------------------------------------------------------------------------- sampler components


@dataclass
class Trajectory:
    """A batch of sampled trajectories (all tensors on CPU or the run device, batch first)."""

    latents: Tensor  # x_T, ..., x_0                                   [B, S+1, C, h, w] >= fp32
    log_probs: Tensor  # reduce(log pi_old(x_{j+1} | x_j, c)) per step   [B, S, *reduced]
    timesteps: Tensor  # the sampler's timestep of step j               [S]
    stochastic: Tensor  # False for deterministic steps (not trainable)  [S] bool
    cond: Conditioning  # the policy's conditioning of each sample       [B, ...]
    images: Tensor  # decoded x_0 in [0, 1]                              [B, 3, H, W] fp32

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @staticmethod
    def cat(items: list[Trajectory]) -> Trajectory:
        first = items[0]
        return Trajectory(
            latents=torch.cat([t.latents for t in items]),
            log_probs=torch.cat([t.log_probs for t in items]),
            timesteps=first.timesteps,
            stochastic=first.stochastic,
            cond=Conditioning.cat([t.cond for t in items]),
            images=torch.cat([t.images for t in items]),
        )


class Sampler:
    """A sampler family: its scheduler, timesteps and Gaussian step, plus the sampling settings.

    A ``_target_`` component of the ``sampler`` group (``sampler=ddim``, ``sampler=ddpm``; a family
    of one's own is a subclass in any module, ``sampler._target_=my_module.MySampler``). Built from
    the config alone; :meth:`setup` then builds the scheduler from the model's scheduler config.
    A subclass implements :meth:`make_scheduler` and :meth:`step_with_log_prob`; an option it does
    not use goes in ``refused_options`` with the reason, so that setting it fails at start-up.
    """

    refused_options: dict[str, str] = {}
    flow_matching = False  # the family samples rectified-flow models (FlowMatch* schedulers), else diffusion models
    untrainable: str | None = None  # why no step of this family can be trained on (a sampler for evaluation only)

    def __init__(
        self, num_steps: int = 50, guidance_scale: float = 5.0, batch_size: int = 8, negative_prompt: str = "",
        stochastic_window: list[int] | None = None,
    ):  # fmt: skip
        if num_steps < 2:
            raise ConfigError(
                "sampler.num_steps",
                f"must be >= 2, got {num_steps}",
                "the last step of a DDIM or DDPM chain adds no noise, so a one-step chain has nothing to train",
            )
        if batch_size < 1:
            raise ConfigError("sampler.batch_size", f"must be >= 1, got {batch_size}")
        if not math.isfinite(guidance_scale) or guidance_scale < 1.0:
            raise ConfigError("sampler.guidance_scale", f"must be >= 1.0, got {guidance_scale}")
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size  # images per denoiser call while sampling, per process
        self.negative_prompt = negative_prompt
        if stochastic_window is not None:
            window = list(stochastic_window)
            if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
                raise ConfigError(
                    "sampler.stochastic_window",
                    f"{stochastic_window} is not a window [start, end) of the {num_steps} steps",
                    f"set two step indices with 0 <= start < end <= sampler.num_steps, e.g. [0, {num_steps}], "
                    "or null for every step",
                )
            stochastic_window = window
        self.stochastic_window = stochastic_window
        self.scheduler = None

    def in_window(self, t: Tensor, n: int, device) -> Tensor | None:
        """Whether each row's step lies in ``stochastic_window``  [B, 1, 1, 1] (None: every step does)."""
        if self.stochastic_window is None:
            return None
        start, end = self.stochastic_window
        inside = torch.isin(_as_batch(t, n, device), self.timesteps[start:end].to(device=device, dtype=torch.long))
        return _expand(inside)

    # ------------------------------------------------------------------ the family
    def make_scheduler(self, scheduler_config):
        """This family's scheduler from the pipeline's scheduler config."""
        raise NotImplementedError

    def step_with_log_prob(
        self, model_output: Tensor, t: Tensor, sample: Tensor, prev_sample: Tensor | None = None,
        variance_noise: Tensor | None = None,
    ) -> StepOutput:  # fmt: skip
        """One step from x_t (``sample``) given the guided model output: x_{t-1} (drawn with
        ``variance_noise``, or ``prev_sample`` as given), its element-wise log-density, mean and std."""
        raise NotImplementedError

    def set_timesteps(self) -> None:
        """The scheduler's ``num_steps`` inference timesteps (a family may pass more, e.g. a flow shift's mu)."""
        self.scheduler.set_timesteps(self.num_steps)

    def settings(self) -> dict:
        """The component's config (``_target_`` and its values), e.g. for an exported model's record."""
        names = [p for p in inspect.signature(type(self)).parameters if p != "self"]
        cls = type(self)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **{n: getattr(self, n) for n in names}}

    # ------------------------------------------------------------------ shared
    def setup(self, scheduler_config) -> Sampler:
        """Build the scheduler and its timesteps; mark the deterministic steps (not trained on)."""
        name = dict(scheduler_config).get("_class_name") or ""
        if name and name.startswith("FlowMatch") != self.flow_matching:
            kind, other = ("diffusion", "sampler=ddim or sampler=ddpm") if self.flow_matching else (
                "rectified-flow", "sampler=flow_sde (sampler=flow_ode to evaluate)")  # fmt: skip
            what = f"its scheduler {name} makes it a {kind} model"
            raise ConfigError("sampler", f"{type(self).__name__} cannot sample this model: {what}", f"use {other}")
        self.scheduler = self.make_scheduler(scheduler_config)
        self.set_timesteps()
        self.timesteps = self.scheduler.timesteps.clone()  # [S]
        probe = torch.zeros(self.num_steps, 1, 1, 1)
        stds = self.step_with_log_prob(probe, self.timesteps, probe, variance_noise=probe).std
        self.stochastic = stds.flatten() > 0  # [S]
        return self

    def step(
        self, policy: Policy, x: Tensor, t: Tensor, cond: Conditioning, prev_sample: Tensor | None = None,
        variance_noise: Tensor | None = None,
    ) -> StepOutput:  # fmt: skip
        """policy.predict, then :meth:`step_with_log_prob`: one guided step of the policy."""
        y = policy.predict(x, t, cond, self.guidance_scale)
        return self.step_with_log_prob(y, t, x, prev_sample=prev_sample, variance_noise=variance_noise)

    @torch.no_grad()
    def sample(
        self,
        policy: Policy,
        cond: Conditioning,
        noise: Tensor | torch.Generator,
        reduce: Callable[[Tensor], Tensor],
        autocast=None,
    ) -> Trajectory:
        """Sample ``len(cond)`` trajectories.

        ``noise``: each sample's x_T and step noises  [B, S+1, C, h, w] (``rlft.seeding.sample_noise``:
        one generator per sample, so the result does not depend on how samples are batched); or a CPU
        generator from which x_T, then each step's noise, are drawn for the whole batch in turn.
        """
        if self.scheduler is None:
            raise RuntimeError("call sampler.setup(policy.scheduler_config) before sampling")
        b, S, shape = len(cond), len(self.timesteps), policy.latent_shape
        if isinstance(noise, torch.Generator):  # x_T, then each step's noise, for the whole batch in turn
            noise = torch.stack([torch.randn((b, *shape), generator=noise) for _ in range(S + 1)], dim=1)
        if tuple(noise.shape) != (b, S + 1, *shape):
            raise ValueError(f"noise of shape {tuple(noise.shape)}; expected {(b, S + 1, *shape)}")
        device = cond.device
        noise = noise.to(device, compute_dtype(*cond.inputs.values()))  # fp32, or fp64 for a float64 model
        x = noise[:, 0] * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow schedulers start at N(0, I)
        latents, log_probs = [x], []
        for j, t in enumerate(self.timesteps):
            check_interrupted()
            with (autocast or nullcontext)():
                y = policy.predict(x, t.to(device), cond, self.guidance_scale)
            out = self.step_with_log_prob(y, t.to(device), x, variance_noise=noise[:, j + 1])
            x = out.prev_sample
            latents.append(x)
            log_probs.append(reduce(out.log_prob))
        with (autocast or nullcontext)():
            images = policy.decode(x)
        return Trajectory(
            latents=torch.stack(latents, dim=1),
            log_probs=torch.stack(log_probs, dim=1),
            timesteps=self.timesteps.clone(),
            stochastic=self.stochastic.clone(),
            cond=cond,
            images=images.float(),
        )


class DDIM(Sampler):
    """DDIM with eta (``sampler=ddim``): eta = 1 gives DDPM's posterior variance, DDPO's setting.

    ``stochastic_window`` = [start, end) (every sampler has it): only steps start..end-1 draw noise;
    the others are the family's deterministic step (here DDIM with eta = 0) and no algorithm trains
    on them (MixGRPO's window, Li et al. 2025; Flow-GRPO-Fast). On the toy model the early steps
    decide the layout while the last steps, whose std is smallest, carry most of the log-density's
    gradient; a window keeps the update on the former (experiments/README.md). ``null``: every step.
    """

    def __init__(
        self, num_steps: int = 50, eta: float = 1.0, guidance_scale: float = 5.0, batch_size: int = 8,
        negative_prompt: str = "", stochastic_window: list[int] | None = None,
    ):  # fmt: skip
        super().__init__(num_steps, guidance_scale, batch_size, negative_prompt, stochastic_window)
        if not 0.0 < eta <= 1.0:
            raise ConfigError(
                "sampler.eta",
                f"{eta} makes every DDIM step deterministic or invalid",
                "policy-gradient finetuning needs 0 < eta <= 1; DDPO uses 1.0",
            )
        self.eta = eta

    def make_scheduler(self, scheduler_config) -> DDIMScheduler:
        return DDIMScheduler.from_config(scheduler_config)

    def step_with_log_prob(self, model_output, t, sample, prev_sample=None, variance_noise=None) -> StepOutput:
        inside = self.in_window(t, sample.shape[0], sample.device)
        eta = self.eta if inside is None else inside.to(torch.float64) * self.eta  # eta 0 outside the window
        return ddim_step_with_log_prob(
            self.scheduler, model_output, t, sample, eta, prev_sample=prev_sample, variance_noise=variance_noise
        )


class DDPM(Sampler):
    """Ancestral DDPM with the posterior variance (``sampler=ddpm``, PRDP's sampler)."""

    refused_options = {
        "eta": "DDPM's step variance is the posterior's, eta is DDIM's; for eta use sampler=ddim sampler.eta=..."
    }

    def make_scheduler(self, scheduler_config) -> DDPMScheduler:
        return DDPMScheduler.from_config(scheduler_config, variance_type="fixed_small")

    def step_with_log_prob(self, model_output, t, sample, prev_sample=None, variance_noise=None) -> StepOutput:
        inside = self.in_window(t, sample.shape[0], sample.device)
        if inside is None:
            return ddpm_step_with_log_prob(
                self.scheduler, model_output, t, sample, prev_sample=prev_sample, variance_noise=variance_noise
            )
        step = ddpm_step_with_log_prob(self.scheduler, model_output, t, sample, variance_noise=variance_noise)
        std = torch.where(inside, step.std, torch.zeros_like(step.std))  # the posterior mean outside the window
        if prev_sample is None:
            prev_sample = step.mean + std * variance_noise if variance_noise is not None else step.prev_sample
            prev_sample = torch.where(inside, prev_sample, step.mean)
        return StepOutput(prev_sample, _gaussian_log_prob(prev_sample, step.mean, std), step.mean, std)
