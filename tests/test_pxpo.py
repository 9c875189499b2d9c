"""PXPO: advantages from reward maps, the identity with DDPO-SF, and what a map does to the policy."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from rlft.algorithms.base import Rollout
from rlft.algorithms.ddpo import DDPO
from rlft.algorithms.pxpo import PXPO, map_advantages, pool_to_latent
from rlft.errors import ConfigError
from rlft.sampling import DDIM
from tests.helpers import SGDContext, SingleProcessComm


def test_pooling_and_advantages_by_hand():
    maps = torch.arange(16.0).reshape(1, 4, 4)
    assert torch.equal(pool_to_latent(maps, (2, 2)), torch.tensor([[[2.5, 4.5], [10.5, 12.5]]], dtype=torch.float64))
    with pytest.raises(ValueError, match="do not tile"):
        pool_to_latent(maps, (3, 3))
    # two prompts x two images, 1x2 latent maps
    rbar = torch.tensor([[[1.0, 4.0]], [[3.0, 0.0]], [[5.0, 5.0]], [[1.0, 5.0]]], dtype=torch.float64)
    group = torch.tensor([0, 0, 1, 1])
    a = map_advantages(rbar, group, "prompt_mean", "none")
    want = torch.tensor([[[-1.0, 2.0]], [[1.0, -2.0]], [[2.0, 0.0]], [[-2.0, 0.0]]], dtype=torch.float64)
    assert torch.equal(a, want)
    a = map_advantages(rbar, group, "prompt_mean", "prompt")
    rms0, rms1 = (10 / 4) ** 0.5, (8 / 4) ** 0.5  # root-mean-square of each prompt's centred values
    assert torch.allclose(a[0, 0], torch.tensor([-1.0, 2.0], dtype=torch.float64) / (rms0 + 1e-6))
    assert torch.allclose(a[2, 0], torch.tensor([2.0, 0.0], dtype=torch.float64) / (rms1 + 1e-6))
    a = map_advantages(rbar, group, "none", "global")
    assert torch.allclose(a, rbar / ((rbar.pow(2).mean()).sqrt() + 1e-6))


def test_bad_settings_and_scalar_rewards_fail_with_the_fix():
    with pytest.raises(ConfigError, match="algorithm.baseline"):
        PXPO(baseline="median")
    with pytest.raises(ConfigError, match="algorithm.baseline=none"):
        PXPO().check(samples_per_process=4, train_batch_size=4, gradient_accumulation_steps=1, images_per_prompt=1)
    with pytest.raises(ConfigError, match="broadcast_scalar_reward=true"):
        PXPO().check_reward("jpeg_compressibility", gives_maps=False)
    PXPO(broadcast_scalar_reward=True).check_reward("jpeg_compressibility", gives_maps=False)


def _sampled(tiny_policy, prompts, algo, seed=1, steps=3, dtype=torch.float32, make_sampler=None):
    unet = copy.deepcopy(tiny_policy.unet).to(dtype).train()
    make_sampler = make_sampler or (lambda n: DDIM(n, eta=1.0, guidance_scale=5.0).setup(tiny_policy.scheduler_config))
    sampler = make_sampler(steps)
    cond = tiny_policy.encode(prompts).to(dtype=dtype)
    traj = sampler.sample(tiny_policy.with_unet(unet), cond, torch.Generator().manual_seed(seed), algo.reduce_log_prob)
    return unet, sampler, traj


def _one_step_gradient(policy, algo, rollout, unet, sampler):
    ctx = SGDContext(policy, unet, sampler, algo, tbs=rollout.batch_size, accum=1, lr=0.0)
    algo.prepare(rollout, SingleProcessComm())
    algo.update(rollout, ctx)
    assert len(ctx.grads) == 1
    return torch.cat([g.flatten() for g in ctx.grads[0]])


def test_uniform_map_gradient_equals_ddpo_sf_with_summed_log_prob(family):
    """A uniform reward map makes PXPO (sf) DDPO-SF with log pi summed over latent dimensions: the same
    gradient to float64 rounding (1e-10 relative), with the denoiser and every step in float64 (the UNet
    with DDIM; SD3 with the flow SDE, its 32 px map pooled by the VAE factor to the 8x8 latents)."""
    torch.manual_seed(0)
    tiny_policy, make_sampler = family
    prompts = ["cat"] * 3 + ["dog"] * 3
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([0.3, 0.1, 0.6, 0.5, 0.2, 0.9], dtype=torch.float64)
    pxpo = PXPO(estimator="sf", baseline="prompt_mean", std="prompt")
    unet, sampler, traj = _sampled(tiny_policy, prompts, pxpo, dtype=torch.float64, make_sampler=make_sampler)
    H, W = traj.images.shape[-2:]
    maps = scores[:, None, None].expand(-1, H, W).clone()  # uniform per image
    got = _one_step_gradient(tiny_policy, pxpo, Rollout(traj, prompts, group, scores, maps), unet, sampler)

    ddpo = DDPO(estimator="sf", log_prob_reduction="sum", stat_min_count=3)  # per-prompt stats of this batch
    summed = dataclasses.replace(traj, log_probs=traj.log_probs.flatten(2).sum(dim=2))  # [B, S]
    want = _one_step_gradient(tiny_policy, ddpo, Rollout(summed, prompts, group, scores), unet, sampler)
    assert want.norm() > 0 and got.dtype == torch.float64
    assert (got - want).norm() <= 1e-10 * want.norm(), ((got - want).norm(), want.norm())


def test_left_positive_right_negative_map_moves_each_half_its_own_way(tiny_policy):
    """Reward +1 on the left half and -1 on the right: one small step raises the sampled trajectory's
    log-prob on the left positions and lowers it on the right ones."""
    torch.manual_seed(0)
    prompts = ["cat", "dog", "bird", "fish"]
    algo = PXPO(estimator="sf", baseline="none", std="none")
    unet, sampler, traj = _sampled(tiny_policy, prompts, algo, steps=4)
    H, W = traj.images.shape[-2:]
    maps = torch.ones(len(prompts), H, W)
    maps[:, :, W // 2 :] = -1.0
    rollout = Rollout(traj, prompts, torch.arange(len(prompts)), maps.sum(dim=(1, 2)), maps)
    ctx = SGDContext(tiny_policy, unet, sampler, algo, tbs=len(prompts), accum=1, lr=1e-6)
    algo.prepare(rollout, comm=None)
    algo.update(rollout, ctx)
    steps = rollout.trainable_steps
    with torch.no_grad():
        after = ctx.log_probs(rollout, steps)
    change = after - rollout.log_probs[:, steps]  # [B, T, h, w]
    w = change.shape[-1]
    left, right = change[..., : w // 2].sum(), change[..., w // 2 :].sum()
    assert left > 0 > right, (float(left), float(right))


def test_feedback_map_end_to_end_on_one_prompt_and_seed(tiny_policy, tmp_path):
    """A person likes the left half of one generated image and dislikes the right half (a painted
    0-255 map read by reward=feedback_map). A few PXPO steps on that prompt and noise make the judged
    trajectory more likely on the liked positions and less likely on the disliked ones (checked over 5
    seeds when written; how much the redrawn image moves per half is within noise on this random model)."""
    from PIL import Image

    from rlft.rewards.feedback import FeedbackMap

    torch.manual_seed(0)
    algo = PXPO(estimator="sf", baseline="none", std="prompt")  # experiments/pxpo_feedback.yaml
    unet, sampler, first = _sampled(tiny_policy, ["a cat"], algo, seed=7, steps=4)
    H, W = first.images.shape[-2:]
    painted = torch.full((64, 64), 128, dtype=torch.uint8)  # painted at another resolution, grey = neutral
    painted[:, :32], painted[:, 32:] = 255, 0
    Image.fromarray(painted.numpy(), mode="L").save(tmp_path / "map.png")
    reward = FeedbackMap(root=str(tmp_path))
    metadata = [{"feedback_map": "map.png"}]
    reward.check_metadata(metadata)
    ctx = SGDContext(tiny_policy, unet, sampler, algo, tbs=1, accum=1, lr=1e-6)
    cond = tiny_policy.encode(["a cat"])

    def draw():  # the same prompt and noise every time (trainer.fixed_sample_noise)
        return sampler.sample(ctx.policy, cond, torch.Generator().manual_seed(7), algo.reduce_log_prob)

    first_rollout = Rollout(first, ["a cat"], torch.tensor([0]), torch.zeros(1))
    for _ in range(4):
        traj = draw()
        out = reward(traj.images, ["a cat"], metadata)
        assert out.maps.shape == (1, H, W) and torch.allclose(out.maps.sum(), out.scores.sum())
        rollout = Rollout(traj, ["a cat"], torch.tensor([0]), out.scores, out.maps)
        algo.prepare(rollout, comm=None)
        algo.update(rollout, ctx)
    steps = first_rollout.trainable_steps
    with torch.no_grad():
        after = ctx.log_probs(first_rollout, steps)
    change = after - first.log_probs[:, steps]  # [1, T, h, w]
    w = change.shape[-1]
    assert change[..., : w // 2].sum() > 0 > change[..., w // 2 :].sum()
    with pytest.raises(ConfigError, match="feedback map .* does not exist"):
        reward.check_metadata([{"feedback_map": "nope.png"}])
    with pytest.raises(ConfigError, match="no 'feedback_map' field"):
        reward.check_metadata([{}])


def test_ppo_ratio_is_per_position_and_scalar_rewards_broadcast():
    """estimator=ppo clips each position's ratio exp(log pi^{ij} - log pi_old^{ij}) on its own and sums the
    positions' losses; broadcast_scalar_reward turns scores into uniform maps (DDPO's advantages)."""
    from rlft.learner import Rows
    from rlft.sampling import StepOutput

    algo = PXPO(estimator="ppo", clip_range=0.1)
    adv = torch.tensor([[[1.0, -1.0, 2.0]]])  # [b=1, h=1, w=3]
    new = torch.tensor([[[0.5, 0.5, -0.01]]])  # ratios e^0.5 (clipped for A>0), e^0.5 (A<0: unclipped), ~0.99
    by_hand = 0.0
    for a, r in zip([1.0, -1.0, 2.0], torch.exp(new).flatten().tolist()):
        by_hand += max(-a * r, -a * min(max(r, 0.9), 1.1))

    class _Old:  # the rollout's log pi_old at the row: zero at every position  [B=1, S=1, h, w]
        log_probs = torch.zeros(1, 1, 1, 3)

    rows, step = Rows(torch.tensor([0]), torch.tensor([0])), StepOutput(None, new, None, None)
    got, diagnostics = algo.row_loss(_Old(), rows, step, adv, ctx=None)
    assert got.shape == (1,) and abs(float(got) - by_hand) < 1e-6
    assert float(diagnostics["train/clipfrac"]) == pytest.approx(2 / 3)  # two of the three ratios leave 1 +- 0.1

    class _Traj:  # what prepare reads: the latent grid of the log-prob maps
        log_probs = torch.zeros(4, 2, 2, 2)

    scores = torch.tensor([1.0, 3.0, 2.0, 2.5])
    rollout = Rollout(_Traj(), ["a", "a", "b", "b"], torch.tensor([0, 0, 1, 1]), scores)
    PXPO(broadcast_scalar_reward=True).prepare(rollout, comm=None)
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # (r - mean_c) / std_c per prompt
    assert torch.allclose(rollout.advantages, expected[:, None, None].expand(-1, 2, 2), atol=1e-5)


def test_logged_maps_show_the_signed_advantages_pxpo_trains_on():
    from rlft.loggers import overlay_maps, trained_maps

    reward_maps = torch.rand(2, 8, 8)  # a colour reward: positive everywhere
    advantages = torch.tensor([[[1.0, -1.0], [0.5, 0.0]], [[-2.0, 2.0], [0.0, 0.0]]])  # [B, h, w]
    shown = trained_maps(reward_maps, advantages, (8, 8))
    assert shown.shape == (2, 8, 8) and torch.equal(shown[0, :4, :4], torch.ones(4, 4))
    assert torch.equal(shown[0, :4, 4:], -torch.ones(4, 4)) and torch.equal(shown[1, 4:, :], torch.zeros(4, 8))
    assert trained_maps(reward_maps, torch.zeros(2), (8, 8)) is reward_maps  # scalar advantages: the map
    overlaid = overlay_maps(torch.zeros(2, 3, 8, 8), shown)
    assert overlaid[0, 1, 0, 0] > 0 and overlaid[0, 0, 0, 7] > 0  # green where liked, red where disliked
