"""The flow SDE sampler (rlft/flow_sampling.py): its mean as a -> 0 is FlowMatchEulerDiscreteScheduler's
Euler step, its log-density equals an independent computation (SDE and CPS), a dynamic shift takes
the policy's mu, and with a stochastic window an algorithm trains on the window's steps only."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from rlft.algorithms.base import Rollout
from rlft.algorithms.ddpo import DDPO
from rlft.errors import ConfigError
from rlft.flow_sampling import FlowODE, FlowSDE, flow_step_with_log_prob, shift_mu
from rlft.sd3 import SD3Policy
from tests.helpers import SGDContext, SingleProcessComm

SD35 = {"shift": 3.0}  # SD3.5's scheduler: a static shift of 3


def _inputs(n=3, shape=(4, 6, 6), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=g, dtype=dtype) for _ in range(3)]  # x_t, v, eps


def test_the_sde_mean_tends_to_the_schedulers_euler_step():
    """For each of the 10 shifted steps, with a -> 0 the SDE's mean is scheduler.step's x_t + v dt (a = 0:
    to float32 rounding; a = 1e-3: within O(a^2)), and FlowODE's step is exactly that update."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD35)
    scheduler.set_timesteps(10)
    ode = FlowODE(num_steps=10).setup(SD35)
    assert not ode.stochastic.any()
    x, v, _ = _inputs(dtype=torch.float32)
    for j, t in enumerate(scheduler.timesteps):
        want = scheduler.step(v, t, x).prev_sample
        index = torch.full((3,), j)
        exact = flow_step_with_log_prob(scheduler.sigmas, index, v, x, 0.0, variance_noise=torch.zeros_like(x))
        torch.testing.assert_close(exact.mean, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(exact.std, torch.zeros_like(exact.std)) and torch.equal(exact.prev_sample, exact.mean)
        near = flow_step_with_log_prob(scheduler.sigmas.double(), index, v.double(), x.double(), 1e-3)
        assert (near.mean - want.double()).abs().max() < 1e-5, j
        step = ode.step_with_log_prob(v, t, x)
        torch.testing.assert_close(step.prev_sample, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(step.log_prob, torch.zeros_like(x))
        x = want


def test_the_sde_log_density_by_hand():
    """mu = x + [v + s^2 / (2t) (x + (1 - t) v)] dt, std = s sqrt(|dt|), s = a sqrt(t / (1 - t)) (1 - t at t = 1
    from the next sigma), and log N(x'; mu, std^2) from torch.distributions, per row at different steps."""
    sampler = FlowSDE(num_steps=6, noise_level=0.7).setup(SD35)
    sigmas = sampler.scheduler.sigmas.double()
    x, v, eps = _inputs()
    index = torch.tensor([0, 2, 5])  # the first step (t = 1), a middle one and the last (t' = 0)
    t, t_next = sigmas[index].view(-1, 1, 1, 1), sigmas[index + 1].view(-1, 1, 1, 1)
    assert t[0].item() == 1.0 and t_next[2].item() == 0.0
    dt = t_next - t
    one_minus_t = torch.tensor([1 - sigmas[1].item(), 1 - t[1].item(), 1 - t[2].item()], dtype=torch.float64)
    s = 0.7 * (t.flatten() / one_minus_t).sqrt().view(-1, 1, 1, 1)
    mean = x + (v + s**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = s * (-dt).sqrt()
    x_next = mean + std * eps
    want = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next)
    out = sampler.step_with_log_prob(v, sampler.timesteps[index], x, variance_noise=eps)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.prev_sample, x_next, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, want, rtol=1e-12, atol=1e-12)
    # given x' (the learner's replay), the same density
    again = sampler.step_with_log_prob(v, sampler.timesteps[index], x, prev_sample=x_next)
    torch.testing.assert_close(again.log_prob, want, rtol=1e-12, atol=1e-12)
    assert sampler.stochastic.all()  # every SDE step draws noise, the last included


def test_the_cps_step_by_hand_and_its_last_step_is_deterministic():
    sampler = FlowSDE(num_steps=6, noise_level=0.7, kind="cps").setup(SD35)
    sigmas = sampler.scheduler.sigmas.double()
    x, v, eps = _inputs()
    index = torch.tensor([0, 3, 4])
    t, t_next = sigmas[index].view(-1, 1, 1, 1), sigmas[index + 1].view(-1, 1, 1, 1)
    std = t_next * math.sin(0.7 * math.pi / 2)
    mean = (1 - t_next) * (x - t * v) + (t_next**2 - std**2).sqrt() * (x + (1 - t) * v)
    out = sampler.step_with_log_prob(v, sampler.timesteps[index], x, variance_noise=eps)
    want = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(mean + std * eps)
    torch.testing.assert_close(out.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.log_prob, want, rtol=1e-12, atol=1e-12)
    assert sampler.stochastic.tolist() == [True] * 5 + [False]  # t' = 0: no noise, nothing to train


def test_a_dynamic_shift_takes_the_policys_mu(tiny_sd3_path):
    """Resolution-dependent shifting: mu is the line through (256, 0.5) and (4096, 1.15) at the token
    count, the sampler's sigmas are the scheduler's own set_timesteps(n, mu=mu), and an SD3 policy
    puts the mu of its resolution into its scheduler config."""
    dynamic = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    dynamic |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}
    seq_len = 32 * 32  # a 512 px image: 64x64 latents in 2x2 patches
    mu = shift_mu(dynamic, seq_len)
    assert mu == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840, rel=1e-12)
    want = FlowMatchEulerDiscreteScheduler.from_config(dynamic)
    want.set_timesteps(12, mu=mu)
    got = FlowSDE(num_steps=12).setup({**dynamic, "mu": mu})
    assert torch.equal(got.scheduler.sigmas, want.sigmas) and torch.equal(got.timesteps, want.timesteps)
    # the SD3 policy of a dynamically shifted model gives the mu diffusers' SD3 pipeline computes for its size
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(dynamic)
    policy = SD3Policy(pipe, finetune="full", max_sequence_length=16, resolution=32)
    tokens = (32 // 4 // 2) ** 2  # 32 px, VAE factor 4, patch 2: 16 tokens
    assert policy.scheduler_config["mu"] == pytest.approx(calculate_shift(tokens, 256, 4096, 0.5, 1.15), rel=1e-12)
    FlowSDE(num_steps=4).setup(policy.scheduler_config)
    with pytest.raises(ConfigError, match="carries mu for its latent size"):
        FlowSDE(num_steps=4).setup(dynamic)


def test_the_window_trains_on_its_steps_only(tiny_policy):
    """stochastic_window [1, 3) of 5 steps: only steps 1 and 2 draw noise (the others are Euler steps, log-prob
    0, not trainable), and DDPO's score-function gradient is -1/(B |W|) sum_i sum_{j in W} A_i grad log pi_ij
    by autograd over the window's steps alone (the tiny UNet's output read as a velocity, float64)."""
    torch.manual_seed(0)
    sampler = FlowSDE(num_steps=5, noise_level=0.7, guidance_scale=3.0, stochastic_window=[1, 3]).setup(SD35)
    assert sampler.stochastic.tolist() == [False, True, True, False, False]
    unet = copy.deepcopy(tiny_policy.unet).double().train()
    policy = tiny_policy.with_unet(unet)
    algo = DDPO(estimator="sf", num_inner_epochs=1, per_prompt_stat_tracking=False)
    prompts = ["cat", "cat", "dog", "dog"]
    cond = tiny_policy.encode(prompts).to(dtype=torch.float64)
    traj = sampler.sample(policy, cond, torch.Generator().manual_seed(1), algo.reduce_log_prob)
    assert torch.equal(traj.log_probs[:, [0, 3, 4]], torch.zeros(4, 3, dtype=torch.float64))
    assert (traj.log_probs[:, [1, 2]] != 0).all()
    with torch.no_grad():  # outside the window x_{j+1} is the Euler step of x_j
        v = policy.predict(traj.latents[:, 3], traj.timesteps[3], cond, 3.0)
        sigmas = sampler.scheduler.sigmas.double()
        dt = sigmas[4] - sigmas[3]
        torch.testing.assert_close(traj.latents[:, 4], traj.latents[:, 3] + v * dt, rtol=1e-12, atol=1e-12)
    rewards = torch.tensor([0.3, 0.1, 0.6, 0.5], dtype=torch.float64)
    rollout = Rollout(traj, prompts, torch.tensor([0, 0, 1, 1]), rewards)
    algo.prepare(rollout, SingleProcessComm())
    assert rollout.trainable_steps.tolist() == [1, 2]
    ctx = SGDContext(tiny_policy, unet, sampler, algo, tbs=4, accum=1, lr=0.0)
    algo.update(rollout, ctx)
    params = [p for p in unet.parameters() if p.requires_grad]
    total = 0.0
    for j in (1, 2):
        step = sampler.step(policy, traj.latents[:, j], traj.timesteps[j], cond, prev_sample=traj.latents[:, j + 1])
        total = total + (rollout.advantages.double() * algo.reduce_log_prob(step.log_prob)).sum()
    want = torch.autograd.grad(-total / (4 * 2), params)
    got = torch.cat([g.flatten() for g in ctx.grads[0]])
    want = torch.cat([g.flatten() for g in want])
    assert want.norm() > 0 and (got - want).norm() <= 1e-10 * want.norm(), (got - want).norm() / want.norm()


def test_bad_flow_sampler_values_name_their_key():
    with pytest.raises(ConfigError, match="sampler.kind"):
        FlowSDE(kind="ode")
    with pytest.raises(ConfigError, match="sampler.noise_level"):
        FlowSDE(noise_level=0.0)
    with pytest.raises(ConfigError, match="sampler.noise_level"):
        FlowSDE(noise_level=1.5, kind="cps")
    with pytest.raises(ConfigError, match="sampler.stochastic_window"):
        FlowSDE(num_steps=4, stochastic_window=[2, 6])
