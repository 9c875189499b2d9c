"""step_with_log_prob against diffusers' own scheduler.step, and DDPM == DDIM(eta=1).

Equalities are checked in float64 (inputs and the schedulers' alpha tables), where both sides agree to
float64 rounding (1e-12 relative); step_with_log_prob keeps float64 when given float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rlft.sampling import DDIM, DDPM, ddim_step_with_log_prob, ddpm_step_with_log_prob
from rlft.seeding import sample_noise

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


F64 = dict(rtol=1e-12, atol=1e-12)  # float64 rounding, with headroom for the O(1)-sized values


def _normal_log_prob(x, mean, std):
    return -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def _float64(sched):
    """The scheduler with its alpha tables in float64, so that diffusers' step computes in float64 too."""
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    for name in ("final_alpha_cumprod", "one"):
        if isinstance(getattr(sched, name, None), torch.Tensor):
            setattr(sched, name, getattr(sched, name).double())
    return sched


def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_matches_diffusers(eta, prediction_type):
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    sched = _float64(sched)
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 7, 19]]:
        x, eps, noise = (_randn(3, 4, 8, 8, generator=g) for _ in range(3))
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        out = ddim_step_with_log_prob(sched, eps, t, x, eta=eta, variance_noise=noise)
        assert out.prev_sample.dtype == out.log_prob.dtype == torch.float64
        torch.testing.assert_close(out.prev_sample, ref, **F64)
        # the log-density is that of N(mean, std^2), element-wise
        want = _normal_log_prob(out.prev_sample, out.mean, out.std.expand_as(x))
        torch.testing.assert_close(out.log_prob, want, **F64)


def test_ddim_per_sample_timesteps_equal_scalar_calls():
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    t = sched.timesteps[[0, 4, 9]]
    x, eps, nxt = (_randn(3, 4, 8, 8, generator=g) for _ in range(3))
    batched = ddim_step_with_log_prob(sched, eps, t, x, prev_sample=nxt).log_prob
    for i in range(3):
        single = ddim_step_with_log_prob(sched, eps[i : i + 1], t[i], x[i : i + 1], prev_sample=nxt[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single.log_prob, **F64)


def test_ddpm_step_matches_diffusers_with_same_generator():
    sched = _float64(DDPMScheduler(**SD_BETAS, clip_sample=False))
    sched.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    for t in sched.timesteps[[0, 10, 18]]:
        x, eps = _randn(2, 4, 8, 8, generator=g), _randn(2, 4, 8, 8, generator=g)
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        out = ddpm_step_with_log_prob(sched, eps, t, x, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(out.prev_sample, ref, **F64)


def test_ddpm_last_step_is_deterministic():
    sched = _float64(DDPMScheduler(**SD_BETAS, clip_sample=False))
    sched.set_timesteps(20)
    t = sched.timesteps[-1]
    g = torch.Generator().manual_seed(2)
    x, eps = _randn(2, 4, 8, 8, generator=g), _randn(2, 4, 8, 8, generator=g)
    out = ddpm_step_with_log_prob(sched, eps, t, x)
    assert float(out.std.max()) == 0.0 and float(out.log_prob.abs().max()) == 0.0
    # diffusers clamps this step's variance to 1e-20 and adds noise of std 1e-10: equal up to that
    torch.testing.assert_close(out.prev_sample, sched.step(eps, t, x).prev_sample, rtol=0, atol=1e-9)
    sampler = DDPM(20, guidance_scale=5.0).setup(sched.config)
    assert sampler.stochastic.tolist() == [True] * 19 + [False]


def test_ddpm_equals_ddim_with_eta_one():
    """Same mean and same sigma on every step (DDIM with abar_final = 1 so that the last steps agree too):
    two different formulas (DDIM eq. 12 with eta = 1, DDPM eq. 7) that agree to float64 rounding."""
    ddim = _float64(DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True))
    ddpm = _float64(DDPMScheduler(**SD_BETAS, clip_sample=False))
    ddim.set_timesteps(25)
    ddpm.set_timesteps(25)
    assert torch.equal(ddim.timesteps, ddpm.timesteps)
    g = torch.Generator().manual_seed(3)
    for t in ddim.timesteps:
        x, eps = _randn(2, 4, 8, 8, generator=g), _randn(2, 4, 8, 8, generator=g)
        a = ddim_step_with_log_prob(ddim, eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x))
        b = ddpm_step_with_log_prob(ddpm, eps, t, x, variance_noise=torch.zeros_like(x))
        torch.testing.assert_close(a.mean, b.mean, **F64)
        torch.testing.assert_close(a.std, b.std, **F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_recorded_log_probs_equal_recomputed(tiny_policy, dtype):
    """The rollout's log pi_old(x_{j+1} | x_j) equals Sampler.step on the recorded latents, recomputed
    one sample at a time (other kernel shapes, as a training micro-batch would be).

    float64: to float64 rounding. float32 is the path every run takes, and the point here: DDPO's ratio
    exp(log pi - log pi_old) at theta_old must be 1 well inside its clip range (1e-4 with the mean over
    dimensions), so the mean log-prob may differ by at most 1e-5. Measured, the largest of the 3 x 6
    differences: 4.8e-7 and 6.0e-7 with oneDNN on and off (2 threads), 6.0e-7 and 4.8e-7 with 1 thread
    (2-core AMD EPYC, torch 2.14.1); float64: 2.2e-15."""
    import copy

    p = tiny_policy
    policy = p.with_unet(copy.deepcopy(p.unet).to(dtype))
    sampler = DDIM(6, eta=1.0, guidance_scale=5.0).setup(p.scheduler_config)
    cond = p.encode(["cat", "dog", "cow"]).to(dtype=dtype)
    mean = lambda lp: lp.mean(dim=(1, 2, 3))  # noqa: E731
    noise = sample_noise([(0, i) for i in range(3)], 6, p.latent_shape)
    traj = sampler.sample(policy, cond, noise, mean)
    assert traj.latents.shape == (3, 7, *p.latent_shape) and traj.log_probs.shape == (3, 6)
    assert traj.latents.dtype == traj.log_probs.dtype == dtype
    assert traj.images.shape == (3, 3, 32, 32) and 0 <= float(traj.images.min()) <= float(traj.images.max()) <= 1
    with torch.no_grad():
        again = torch.stack(
            [
                torch.cat(
                    [
                        mean(sampler.step(policy, traj.latents[i : i + 1, j], traj.timesteps[j].expand(1),
                                          cond[i : i + 1], prev_sample=traj.latents[i : i + 1, j + 1]).log_prob)
                        for i in range(3)
                    ]
                )
                for j in range(6)
            ],
            dim=1,
        )  # fmt: skip
    if dtype == torch.float64:
        torch.testing.assert_close(again, traj.log_probs, rtol=1e-10, atol=1e-12)
    else:
        assert (again - traj.log_probs).abs().max() <= 1e-5, (again - traj.log_probs).abs().max()


def test_per_sample_noise_does_not_depend_on_the_batch(tiny_policy):
    """Noise drawn per sample (rlft.seeding): sampling 4 prompts in one batch or as 1 + 3 gives the same
    trajectories, to float rounding of the different kernel shapes (float64 here: 1e-10)."""
    import copy

    p = tiny_policy
    policy = p.with_unet(copy.deepcopy(p.unet).double())
    sampler = DDIM(4, eta=1.0, guidance_scale=5.0).setup(p.scheduler_config)
    cond = p.encode(["cat", "dog", "cow", "owl"]).to(dtype=torch.float64)
    keys = [(0, 1, 0, i) for i in range(4)]
    draw = lambda rows: sampler.sample(  # noqa: E731
        policy, cond[rows], sample_noise(keys[rows], 4, p.latent_shape), lambda x: x
    )
    whole, parts = draw(slice(0, 4)), [draw(slice(0, 1)), draw(slice(1, 4))]
    torch.testing.assert_close(torch.cat([t.latents for t in parts]), whole.latents, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([t.log_probs for t in parts]), whole.log_probs, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(whole.latents[0], whole.latents[1])  # each sample has its own noise


def test_a_stochastic_window_is_eta_inside_and_deterministic_ddim_outside():
    """sampler.stochastic_window = [2, 5) of 8 steps: those steps are DDIM(eta)'s, the others DDIM(eta=0)'s
    (diffusers' step, the same inputs), marked not trainable, with log-density 0."""
    config = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction").config
    sampler = DDIM(8, eta=1.0, stochastic_window=[2, 5]).setup(config)
    assert sampler.stochastic.tolist() == [False, False, True, True, True, False, False, False]
    ref = _float64(DDIMScheduler.from_config(config))
    ref.set_timesteps(8)
    sampler.scheduler = _float64(sampler.scheduler)
    g = torch.Generator().manual_seed(3)
    x, v, noise = (_randn(8, 4, 8, 8, generator=g) for _ in range(3))
    t = sampler.timesteps  # one row per step, in one call
    out = sampler.step_with_log_prob(v, t, x, variance_noise=noise)
    for j in range(8):
        eta = 1.0 if 2 <= j < 5 else 0.0
        want = ref.step(v[j : j + 1], t[j], x[j : j + 1], eta=eta, variance_noise=noise[j : j + 1]).prev_sample
        torch.testing.assert_close(out.prev_sample[j : j + 1], want, **F64)
        assert (out.std[j] > 0).all() == (eta > 0) and (out.log_prob[j] == 0).all() == (eta == 0)


@pytest.mark.parametrize("window", [[3, 3], [0, 9], [-1, 2], [1]])
def test_a_window_outside_the_steps_is_refused(window):
    from rlft.errors import ConfigError

    with pytest.raises(ConfigError, match="sampler.stochastic_window"):
        DDIM(8, stochastic_window=window)


def test_a_ddpm_window_keeps_the_posterior_mean_outside_it():
    config = DDPMScheduler(**SD_BETAS, clip_sample=False).config
    windowed = DDPM(6, stochastic_window=[0, 2]).setup(config)
    plain = DDPM(6).setup(config)
    assert windowed.stochastic.tolist() == [True, True, False, False, False, False]
    g = torch.Generator().manual_seed(4)
    x, eps, noise = (_randn(6, 4, 8, 8, generator=g) for _ in range(3))
    t = plain.timesteps
    got = windowed.step_with_log_prob(eps, t, x, variance_noise=noise)
    want = plain.step_with_log_prob(eps, t, x, variance_noise=noise)
    torch.testing.assert_close(got.prev_sample[:2], want.prev_sample[:2], **F64)
    torch.testing.assert_close(got.log_prob[:2], want.log_prob[:2], **F64)
    torch.testing.assert_close(got.prev_sample[2:], want.mean[2:], **F64)
    assert (got.std[2:] == 0).all() and (got.log_prob[2:] == 0).all()
