"""step_with_log_prob against diffusers' own scheduler.step, and DDPM == DDIM(eta=1)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rlft.sampling import Sampler, ddim_step_with_log_prob, ddpm_step_with_log_prob, make_scheduler

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def _normal_log_prob(x, mean, std):
    return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(eta, prediction_type):
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 7, 19]]:
        x = torch.randn(3, 4, 8, 8, generator=g)
        eps = torch.randn(3, 4, 8, 8, generator=g)
        noise = torch.randn(3, 4, 8, 8, generator=g)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        out = ddim_step_with_log_prob(sched, eps, t, x, eta=eta, variance_noise=noise)
        torch.testing.assert_close(out.prev_sample, ref, rtol=1e-5, atol=1e-6)
        # the log-density is that of N(mean, std^2), element-wise
        torch.testing.assert_close(out.log_prob, _normal_log_prob(out.prev_sample, out.mean, out.std.expand_as(x)))


def test_ddim_per_sample_timesteps_equal_scalar_calls():
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    t = sched.timesteps[[0, 4, 9]]
    x, eps, nxt = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    batched = ddim_step_with_log_prob(sched, eps, t, x, prev_sample=nxt).log_prob
    for i in range(3):
        single = ddim_step_with_log_prob(sched, eps[i : i + 1], t[i], x[i : i + 1], prev_sample=nxt[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single.log_prob)


def test_ddpm_step_matches_diffusers_with_same_generator():
    sched = DDPMScheduler(**SD_BETAS, clip_sample=False)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 10, 18]]:
        x = torch.randn(2, 4, 8, 8, generator=g)
        eps = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        out = ddpm_step_with_log_prob(sched, eps, t, x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(out.prev_sample, ref, rtol=1e-5, atol=1e-6)


def test_ddpm_last_step_is_deterministic():
    sched = DDPMScheduler(**SD_BETAS, clip_sample=False)
    sched.set_timesteps(20)
    t = sched.timesteps[-1]
    x, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = ddpm_step_with_log_prob(sched, eps, t, x)
    assert float(out.std.max()) == 0.0 and float(out.log_prob.abs().max()) == 0.0
    torch.testing.assert_close(out.prev_sample, sched.step(eps, t, x).prev_sample, atol=1e-6, rtol=1e-5)
    sampler = Sampler(make_scheduler("ddpm", sched.config), 20, 1.0, 5.0)
    assert sampler.stochastic.tolist() == [True] * 19 + [False]


def test_ddpm_equals_ddim_with_eta_one():
    """Same mean and same sigma on every step (DDIM with abar_final = 1 so that the last steps agree too)."""
    ddim = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True)
    ddpm = DDPMScheduler(**SD_BETAS, clip_sample=False)
    ddim.set_timesteps(25)
    ddpm.set_timesteps(25)
    assert torch.equal(ddim.timesteps, ddpm.timesteps)
    g = torch.Generator().manual_seed(3)
    for t in ddim.timesteps:
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        a = ddim_step_with_log_prob(ddim, eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x))
        b = ddpm_step_with_log_prob(ddpm, eps, t, x, variance_noise=torch.zeros_like(x))
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.std, b.std, rtol=1e-4, atol=1e-7)


def test_recorded_log_probs_equal_recomputed(tiny_policy):
    """The rollout's log pi_old(x_{j+1} | x_j) equals Sampler.log_prob on the recorded latents."""
    p = tiny_policy
    sampler = Sampler(make_scheduler("ddim", p.scheduler_config), 6, 1.0, 5.0)
    embeds = p.encode_prompts(["cat", "dog", "cow"])
    neg = p.encode_prompts([""])
    traj = sampler.sample(
        p.unet,
        p.decode,
        embeds,
        neg,
        p.latent_shape,
        torch.Generator().manual_seed(0),
        lambda lp: lp.sum(dim=(1, 2, 3)),
    )
    assert traj.latents.shape == (3, 7, *p.latent_shape) and traj.log_probs.shape == (3, 6)
    assert traj.images.shape == (3, 3, 32, 32) and 0 <= float(traj.images.min()) <= float(traj.images.max()) <= 1
    with torch.no_grad():
        for j in range(6):
            lp = sampler.log_prob(
                p.unet, traj.latents[:, j], traj.latents[:, j + 1], traj.timesteps[j].expand(3), embeds, neg
            ).sum(dim=(1, 2, 3))
            torch.testing.assert_close(lp, traj.log_probs[:, j], rtol=1e-4, atol=1e-3)
