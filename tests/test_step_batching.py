"""trainer.timesteps_per_forward: stacking k denoising steps into one UNet call is a speed setting only.

For every algorithm, an update with k = 2 (chunks of 2 and 1 of the 3 steps) or k = 3 takes the same
gradients, parameters and diagnostics as the reference codes' one-step-per-call loop (k = 1), to float64
rounding, over two inner epochs (the second away from pi_old, where clipping acts).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlft.algorithms.base import Rollout, step_chunks
from rlft.algorithms.ddpo import DDPO
from rlft.algorithms.prdp import PRDP
from rlft.algorithms.pxpo import PXPO
from rlft.sampling import Sampler, make_scheduler
from tests.helpers import SGDContext, SingleProcessComm

ALGORITHMS = {
    "ddpo_is": lambda: DDPO(estimator="ppo", clip_range=1e-3, num_inner_epochs=2, stat_min_count=2),
    "ddpo_sf": lambda: DDPO(estimator="sf", num_inner_epochs=2, stat_min_count=2),
    "pxpo": lambda: PXPO(estimator="ppo", clip_range=1e-3, num_inner_epochs=2),
    "prdp": lambda: PRDP(beta=1e-2, clip_range=1e-3, num_inner_epochs=2),
}


def test_step_chunks_cover_every_step_once():
    assert step_chunks(3, 2) == [slice(0, 2), slice(2, 3)]
    assert step_chunks(10, 10) == [slice(0, 10)]
    assert step_chunks(4, 1) == [slice(j, j + 1) for j in range(4)]


def _update(tiny_policy, name, k):
    torch.manual_seed(0)
    unet = copy.deepcopy(tiny_policy.unet).double().train()
    sampler = Sampler(make_scheduler("ddim", tiny_policy.scheduler_config), 3, 1.0, 5.0)
    negative = tiny_policy.encode_prompts([""]).double()
    prompts = ["cat", "cat", "dog", "dog"]
    embeds = tiny_policy.encode_prompts(prompts).double()
    algo = ALGORITHMS[name]()
    traj = sampler.sample(
        unet, tiny_policy.decode, embeds, negative, tiny_policy.latent_shape, torch.Generator().manual_seed(1),
        algo.reduce_log_prob,
    )  # fmt: skip
    rewards = torch.tensor([0.3, 0.1, 0.5, 0.9], dtype=torch.float64)
    H, W = traj.images.shape[-2:]
    maps = rewards[:, None, None] * torch.linspace(0, 2, W, dtype=torch.float64).expand(H, W)
    rollout = Rollout(traj, prompts, torch.tensor([0, 0, 1, 1]), rewards, maps)
    rollout.ref_log_probs = traj.log_probs - 0.01  # a reference a little away from pi_old
    ctx = SGDContext(unet, sampler, negative, tbs=2, accum=2, lr=3e-3, timesteps_per_forward=k)
    ctx.algorithm = algo
    algo.prepare(rollout, SingleProcessComm())
    metrics = algo.update(rollout, ctx)
    return ctx.grads, metrics, [p.detach().clone() for p in unet.parameters()]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_stacked_steps_take_the_one_step_loop_gradients(tiny_policy, name):
    grads, metrics, params = _update(tiny_policy, name, 1)
    assert len(grads) == 2 and metrics["train/clipfrac"] > 0  # the second pass clips some terms
    for k in (2, 3):
        got_grads, got_metrics, got_params = _update(tiny_policy, name, k)
        assert len(got_grads) == len(grads)
        for want_step, got_step in zip(grads, got_grads):
            want, got = torch.cat([g.flatten() for g in want_step]), torch.cat([g.flatten() for g in got_step])
            assert want.norm() > 0 and (got - want).norm() <= 1e-10 * want.norm(), (k, (got - want).norm())
        for want, got in zip(params, got_params):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got_metrics.keys() == metrics.keys()
        for key in (m for m in metrics if not m.startswith("perf/")):  # timings differ
            assert got_metrics[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), (k, key)
