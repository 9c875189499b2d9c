"""Samplers for rectified-flow models (SD3/3.5, FLUX): Flow-GRPO's SDE step with its log-density.

A rectified-flow model predicts a velocity v(x_t, t, c) along x_t = (1 - t) x_0 + t eps, t in [0, 1],
and diffusers samples it with ``FlowMatchEulerDiscreteScheduler`` (the ODE x_{t+dt} = x_t + v dt,
dt < 0, over the scheduler's shifted sigmas). Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, eq. 9)
replaces the ODE by an SDE with the same marginals, so that every step is a Gaussian policy:

    x_{t+dt} = x_t + [v + sigma_t^2 / (2t) (x_t + (1 - t) v)] dt + sigma_t sqrt(|dt|) eps,
    sigma_t  = a sqrt(t / (1 - t)),        a: ``noise_level`` (0.7 by default)

i.e. pi(x_{t+dt} | x_t, c) = N(mu, (sigma_t sqrt(|dt|))^2 I). At t = 1 (the first step, unshifted)
sigma_t is infinite; as in Flow-GRPO's code, 1 - t there uses the next sigma instead.

Its CPS variant (coefficients-preserving sampling, Wang & Yu 2025, "Coefficients-Preserving
Sampling for Reinforcement Learning with Flow Matching", eq. 8; ``kind: cps``) keeps the
coefficients of x_0 and of the noise exact:

    x0_hat = x_t - t v,   x1_hat = x_t + (1 - t) v,   s = t' sin(a pi / 2)   (t' = t + dt)
    x_{t'} = (1 - t') x0_hat + sqrt(t'^2 - s^2) x1_hat + s eps

so its std is s (zero on the last step, t' = 0, which is then deterministic and not trained on).

Both return the element-wise Gaussian log-density in at least fp32 (rlft/sampling.py's
convention: each algorithm picks its own reduction). As a -> 0 the SDE's mean is the Euler step
x_t + v dt of ``FlowMatchEulerDiscreteScheduler.step`` (``tests/test_flow.py``). ``FlowODE``
is that Euler step alone: deterministic, for evaluation and export, never trained on.

Timesteps are the scheduler's floats (sigma x 1000); a step is located by its index in the
sampler's timesteps, so a row's timestep may be any of them (the learner replays steps in any
order). The resolution-dependent shift is the policy's to give: a scheduler config with
``use_dynamic_shifting`` must carry ``mu`` for the policy's latent size (``shift_mu``), which the
sampler passes to ``set_timesteps`` as diffusers' pipelines do; ``sigmas: "linspace"`` there asks for
the unshifted sigmas 1, ..., 1/N that FLUX's pipeline passes (SD3's takes the scheduler's own).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from rlft.errors import ConfigError
from rlft.sampling import Sampler, StepOutput, _expand, _gaussian_log_prob, _promote

KINDS = ("sde", "cps")


def shift_mu(scheduler_config: dict, image_seq_len: int) -> float:
    """mu of a resolution-dependent (dynamic) shift: the line through (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) at the image's token count, as diffusers' FLUX and SD3 pipelines
    compute it; the scheduler then shifts each sigma to e^mu / (e^mu + (1/sigma - 1))."""
    x0, y0 = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("base_shift", 0.5)
    x1, y1 = scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("max_shift", 1.15)
    return y0 + (y1 - y0) / (x1 - x0) * (image_seq_len - x0)


def flow_step_with_log_prob(
    sigmas: Tensor,
    index: Tensor,
    model_output: Tensor,
    sample: Tensor,
    noise_level: float | Tensor = 0.7,
    kind: str = "sde",
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance_noise: Tensor | None = None,
) -> StepOutput:
    """One step from sigma = ``sigmas[index]`` to ``sigmas[index + 1]`` (per row: ``index`` [B] long).

    ``noise_level`` may be one value or one per row ([B, 1, 1, 1]); 0 gives the Euler step (std 0)."""
    model_output, sample = _promote(model_output, sample)
    dtype = sample.dtype
    sigmas = sigmas.to(device=sample.device, dtype=dtype)
    t = _expand(sigmas[index])  # the current time (the sigma of x_t)
    t_next = _expand(sigmas[index + 1])
    dt = t_next - t  # < 0
    a = noise_level.to(dtype) if torch.is_tensor(noise_level) else torch.as_tensor(noise_level, dtype=dtype)
    if kind == "sde":
        # sigma_t = a sqrt(t / (1 - t)); at t = 1, 1 - t uses the next sigma (sigmas[1])
        one_minus_t = 1 - torch.where(t == 1, sigmas[1], t)
        sigma_t = a * (t / one_minus_t).sqrt()
        mean = sample + (model_output + sigma_t**2 / (2 * t) * (sample + (1 - t) * model_output)) * dt
        std = sigma_t * (-dt).sqrt()
    elif kind == "cps":
        std = t_next * torch.sin(a * math.pi / 2)
        x0_hat, x1_hat = sample - t * model_output, sample + (1 - t) * model_output
        mean = (1 - t_next) * x0_hat + (t_next**2 - std**2).clamp(min=0).sqrt() * x1_hat
    else:
        raise ValueError(f"kind '{kind}' must be one of {', '.join(KINDS)}")
    std = std.expand_as(t)
    if prev_sample is None:
        if variance_noise is None:
            variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=dtype)
        prev_sample = mean + std * variance_noise.to(dtype)
    return StepOutput(prev_sample, _gaussian_log_prob(prev_sample, mean, std), mean, std)


class FlowSDE(Sampler):
    """Flow-GRPO's SDE sampler for rectified-flow models (``sampler=flow_sde``; see the module).

    ``noise_level`` is a; ``kind`` is ``sde`` (Flow-GRPO) or ``cps`` (coefficients-preserving).
    ``stochastic_window`` = [start, end): only those steps draw noise and are trained on, the others
    are Euler steps (MixGRPO, Li et al. 2025; Flow-GRPO-Fast)."""

    flow_matching = True

    def __init__(
        self, num_steps: int = 10, noise_level: float = 0.7, kind: Literal["sde", "cps"] = "sde",
        guidance_scale: float = 4.5, batch_size: int = 8, negative_prompt: str = "",
        stochastic_window: list[int] | None = None,
    ):  # fmt: skip
        super().__init__(num_steps, guidance_scale, batch_size, negative_prompt, stochastic_window)
        if kind not in KINDS:
            raise ConfigError("sampler.kind", f"unknown kind '{kind}'", f"set one of {', '.join(KINDS)}")
        if not (math.isfinite(noise_level) and noise_level > 0) or (kind == "cps" and noise_level > 1):
            raise ConfigError(
                "sampler.noise_level",
                f"{noise_level} makes every step deterministic or invalid",
                "policy-gradient finetuning needs a > 0 (Flow-GRPO uses 0.7; cps needs a <= 1)",
            )
        self.noise_level, self.kind = noise_level, kind
        self._timesteps_on: dict = {}  # the timesteps on each device a step was asked on

    def make_scheduler(self, scheduler_config) -> FlowMatchEulerDiscreteScheduler:
        config = dict(scheduler_config)
        self.mu = config.pop("mu", None)
        self.sigmas = config.pop("sigmas", None)  # "linspace": the policy's pipeline passes its own sigmas
        if self.sigmas not in (None, "linspace"):
            raise ValueError(f"unknown sigmas schedule {self.sigmas!r} in the policy's scheduler_config")
        if config.get("use_dynamic_shifting", False) and self.mu is None:
            raise ConfigError(
                "model",
                "the model's scheduler shifts its timesteps by resolution, and its policy gave no mu",
                "a flow policy's scheduler_config carries mu for its latent size (rlft.flow_sampling.shift_mu)",
            )
        config["stochastic_sampling"] = False  # the step is this module's, never the scheduler's own
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def set_timesteps(self) -> None:
        n = self.num_steps  # FLUX's pipelines: sigmas 1, ..., 1/n before the shift (the scheduler's own: 1 ... 1e-3)
        sigmas = np.linspace(1.0, 1 / n, n) if self.sigmas == "linspace" else None
        mu = self.mu if self.scheduler.config.use_dynamic_shifting else None
        self.scheduler.set_timesteps(n, sigmas=sigmas, mu=mu)
        self._timesteps_on = {}

    def step_index(self, t: Tensor, n: int) -> Tensor:
        """The index of each row's timestep among the sampler's  [B] long (on ``t``'s device)."""
        t = torch.as_tensor(t).reshape(-1).expand(n)
        timesteps = self._timesteps_on.get(t.device)
        if timesteps is None:
            timesteps = self._timesteps_on[t.device] = self.timesteps.to(t.device, torch.float64)
        distance, index = (timesteps[None, :] - t[:, None].to(torch.float64)).abs().min(dim=1)
        if not torch.compiler.is_compiling() and t.device.type == "cpu" and bool((distance > 1e-3).any()):
            raise ValueError(f"timesteps {t.tolist()} are not this sampler's ({self.timesteps.tolist()})")
        return index

    def noise_levels(self, index: Tensor) -> Tensor | float:
        """a per row: the noise level inside the window, 0 (the Euler step) outside  [B, 1, 1, 1]."""
        if self.stochastic_window is None:
            return self.noise_level
        start, end = self.stochastic_window
        inside = (index >= start) & (index < end)
        return _expand(inside.to(torch.float64) * self.noise_level)

    def step_with_log_prob(self, model_output, t, sample, prev_sample=None, variance_noise=None) -> StepOutput:
        index = self.step_index(t, sample.shape[0]).to(sample.device)
        a = self.noise_levels(index)
        return flow_step_with_log_prob(
            self.scheduler.sigmas, index, model_output, sample, a, self.kind, prev_sample, variance_noise=variance_noise
        )


class FlowODE(FlowSDE):
    """The Euler step of ``FlowMatchEulerDiscreteScheduler`` (``sampler=flow_ode``): deterministic, for
    evaluation and export (``python -m rlft.sample``); no step is stochastic, so nothing trains on it."""

    untrainable = "the flow ODE draws no noise, so no step is a policy action: train with sampler=flow_sde"
    refused_options = {
        "noise_level": "the ODE draws no noise; for a stochastic flow sampler use sampler=flow_sde",
        "kind": "the ODE has one kind; sampler=flow_sde has sde and cps",
        "stochastic_window": "the ODE has no stochastic steps; sampler=flow_sde has the window",
    }

    def __init__(
        self, num_steps: int = 40, guidance_scale: float = 4.5, batch_size: int = 8, negative_prompt: str = ""
    ):  # fmt: skip
        Sampler.__init__(self, num_steps, guidance_scale, batch_size, negative_prompt, None)
        self.noise_level, self.kind, self._timesteps_on = 0.0, "sde", {}

    def step_with_log_prob(self, model_output, t, sample, prev_sample=None, variance_noise=None) -> StepOutput:
        index = self.step_index(t, sample.shape[0]).to(sample.device)
        zero = torch.zeros_like(sample)  # std 0: x_{t+dt} is the mean, and no random number is drawn
        return flow_step_with_log_prob(
            self.scheduler.sigmas, index, model_output, sample, 0.0, "sde", prev_sample, None, zero
        )
