"""trainer.rows_per_call: how many (sample, step) rows share one UNet call is a speed setting only.

For every algorithm, an update with 1 row per call, 3 (calls that cut across steps), 6 (a micro-batch's
3 steps) or all rows takes the same gradients, parameters and diagnostics as the reference codes' loop
(the default, train_batch_size rows: one step of a micro-batch per call), to float64 rounding, over two
inner epochs (the second away from pi_old, where clipping acts).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlft.algorithms.base import Rollout
from rlft.algorithms.ddpo import DDPO
from rlft.algorithms.prdp import PRDP
from rlft.algorithms.pxpo import PXPO
from rlft.learner import Rows
from rlft.sampling import DDIM
from tests.helpers import SGDContext, SingleProcessComm

ALGORITHMS = {
    "ddpo_is": lambda: DDPO(estimator="ppo", clip_range=1e-3, num_inner_epochs=2, stat_min_count=2),
    "ddpo_sf": lambda: DDPO(estimator="sf", num_inner_epochs=2, stat_min_count=2),
    "pxpo": lambda: PXPO(estimator="ppo", clip_range=1e-3, num_inner_epochs=2),
    "prdp": lambda: PRDP(beta=1e-2, clip_range=1e-3, num_inner_epochs=2),
}


def test_rows_are_step_major_and_round_trip():
    rows = Rows.of(torch.tensor([5, 7]), torch.tensor([[0, 2], [1, 0]]))
    assert rows.index.tolist() == [5, 7, 5, 7] and rows.step.tolist() == [0, 1, 2, 0]
    values = torch.arange(4.0)
    assert Rows.unflatten(values, 2).tolist() == [[0.0, 2.0], [1.0, 3.0]]


def _update(tiny_policy, name, rows_per_call):
    torch.manual_seed(0)
    unet = copy.deepcopy(tiny_policy.unet).double().train()
    sampler = DDIM(3, eta=1.0, guidance_scale=5.0).setup(tiny_policy.scheduler_config)
    prompts = ["cat", "cat", "dog", "dog"]
    cond = tiny_policy.encode(prompts).to(dtype=torch.float64)
    algo = ALGORITHMS[name]()
    traj = sampler.sample(tiny_policy.with_unet(unet), cond, torch.Generator().manual_seed(1), algo.reduce_log_prob)
    rewards = torch.tensor([0.3, 0.1, 0.5, 0.9], dtype=torch.float64)
    H, W = traj.images.shape[-2:]
    maps = rewards[:, None, None] * torch.linspace(0, 2, W, dtype=torch.float64).expand(H, W)
    rollout = Rollout(traj, prompts, torch.tensor([0, 0, 1, 1]), rewards, maps)
    rollout.ref_log_probs = traj.log_probs - 0.01  # a reference a little away from pi_old
    ctx = SGDContext(tiny_policy, unet, sampler, algo, tbs=2, accum=2, lr=3e-3, rows_per_call=rows_per_call)
    algo.prepare(rollout, SingleProcessComm())
    metrics = algo.update(rollout, ctx)
    return ctx.grads, metrics, [p.detach().clone() for p in unet.parameters()]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_any_row_budget_takes_the_one_step_loop_gradients(tiny_policy, name):
    grads, metrics, params = _update(tiny_policy, name, None)
    assert len(grads) == 2 and metrics["train/clipfrac"] > 0  # the second pass clips some terms
    for k in (1, 3, 6, 1000):
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
