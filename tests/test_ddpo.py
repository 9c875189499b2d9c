"""DDPO's loss, advantages and schedule pinned to hand-computed values and identities."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.algorithms.base import Rollout
from rlft.algorithms.ddpo import DDPO, ppo_clip_loss
from rlft.algorithms.stat_tracking import PerPromptStatTracker
from rlft.policy import Conditioning
from rlft.sampling import StepOutput, Trajectory
from rlft.seeding import seeded_generator
from tests.helpers import SingleProcessComm


def test_ppo_clip_loss_hand_values():
    eps = 0.1
    adv = torch.tensor([1.0, 1.0, -2.0, -2.0])
    # ratios 1.5, 0.5, 1.5, 0.5
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    loss = ppo_clip_loss(adv, logp, torch.zeros(4), eps)
    # A>0: max(-1.5, -1.1) = -1.1 ; max(-0.5, -0.9) = -0.5
    # A<0: max(3.0, 2.2) = 3.0    ; max(1.0, 1.8) = 1.8
    torch.testing.assert_close(loss, torch.tensor([-1.1, -0.5, 3.0, 1.8]))


def test_ppo_gradient_equals_score_function_gradient_at_old_policy():
    """At theta = theta_old the clipped surrogate's gradient is DDPO_SF's: -A grad log pi (float64)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(7, generator=g, dtype=torch.float64)
    logp = torch.nn.functional.logsigmoid(x @ theta)
    (g_ppo,) = torch.autograd.grad(ppo_clip_loss(adv, logp, logp.detach(), 1e-4).mean(), theta)
    logp = torch.nn.functional.logsigmoid(x @ theta)
    (g_sf,) = torch.autograd.grad((-adv * logp).mean(), theta)
    torch.testing.assert_close(g_ppo, g_sf, rtol=1e-12, atol=0)


def test_stat_tracker_batch_fallback_then_buffer():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    r1 = torch.tensor([1.0, 3.0, 10.0, 20.0], dtype=torch.float64)
    adv = tracker.update(["a", "a", "b", "b"], r1)
    # fewer than min_count per prompt: batch statistics (population std + 1e-6)
    mean, std = 8.5, math.sqrt(((1 - 8.5) ** 2 + (3 - 8.5) ** 2 + (10 - 8.5) ** 2 + (20 - 8.5) ** 2) / 4) + 1e-6
    torch.testing.assert_close(adv, (r1 - mean) / std, rtol=1e-12, atol=0)
    adv2 = tracker.update(["a", "b"], torch.tensor([5.0, 0.0]))
    # 'a' now has [1, 3, 5]: mean 3, std sqrt(8/3); 'b' has [10, 20, 0]: mean 10, std sqrt(200/3)
    expected = [(5 - 3) / (math.sqrt(8 / 3) + 1e-6), (0 - 10) / (math.sqrt(200 / 3) + 1e-6)]
    torch.testing.assert_close(adv2, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    tracker.update(["a", "a"], torch.tensor([7.0, 9.0]))
    assert list(tracker.stats["a"]) == [3.0, 5.0, 7.0, 9.0]  # bounded buffer keeps the last 4


def test_stat_tracker_bounds_prompts_and_round_trips():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1, max_prompts=3)
    for i in range(5):
        tracker.update([f"p{i}"], torch.tensor([float(i)]))
    assert list(tracker.stats) == ["p2", "p3", "p4"]
    clone = PerPromptStatTracker(buffer_size=2, min_count=1, max_prompts=3)
    clone.load_state_dict(tracker.state_dict())
    assert {k: list(v) for k, v in clone.stats.items()} == {k: list(v) for k, v in tracker.stats.items()}


class _RecordingContext:
    """A TrainContext whose 'policy' is a parameter per (sample, step): records the schedule."""

    def __init__(self, B, S, tbs, accum):
        self.theta = torch.zeros(B, S, dtype=torch.float64, requires_grad=True)
        self.generator = torch.Generator().manual_seed(0)
        self.train_batch_size, self.gradient_accumulation_steps = tbs, accum
        self.calls, self.backwards, self.steps, self.syncs = [], 0, 0, []

    def sample_generator(self, *key):
        return seeded_generator(0, *key)

    def backward_rows(self, rollout, rows, loss, sync=True):
        self.calls.append((rows.index.clone(), rows.step.clone()))
        log_prob = self.theta[rows.index, rows.step]
        self.backward(loss(StepOutput(None, log_prob, None, None), slice(0, len(rows))), sync)
        return StepOutput(None, log_prob.detach(), None, None)

    def backward(self, loss, sync=True):
        loss.backward()
        self.backwards += 1
        self.syncs.append(sync)

    def step(self):
        self.steps += 1
        return 1.0


def _rollout(B=8, S=6, stochastic=None):
    stochastic = torch.ones(S, dtype=torch.bool) if stochastic is None else stochastic
    traj = Trajectory(
        torch.zeros(B, S + 1, 1, 1, 1, dtype=torch.float64),
        torch.zeros(B, S, dtype=torch.float64),
        torch.arange(S),
        stochastic,
        Conditioning({"encoder_hidden_states": torch.zeros(B, 1, 1)}),
        torch.zeros(B, 3, 2, 2),
    )
    rollout = Rollout(traj, [f"p{i // 2}" for i in range(B)], torch.arange(B) // 2, torch.arange(B).double())
    return rollout


def test_ddpo_schedule_inner_epochs_timestep_fraction_accumulation():
    B, S = 8, 6
    algo = DDPO(timestep_fraction=0.5, num_inner_epochs=2, stat_min_count=1)
    rollout = _rollout(B, S, stochastic=torch.tensor([True, True, True, True, True, False]))
    algo.prepare(rollout, SingleProcessComm())
    ctx = _RecordingContext(B, S, tbs=2, accum=2)
    metrics = algo.update(rollout, ctx)
    trainable = 5
    per_epoch = B * int(trainable * 0.5)  # samples x trained steps each
    assert sum(len(i) for i, _ in ctx.calls) == 2 * per_epoch
    assert ctx.steps == 2 * (B // 2) // 2 == metrics["train/optimizer_steps"]
    # never the deterministic step; each sample's steps in one inner epoch are distinct
    seen = {}
    for index, step in ctx.calls[: len(ctx.calls) // 2]:
        assert int(step.max()) < 5
        for i, s in zip(index.tolist(), step.tolist()):
            seen.setdefault(i, []).append(s)
    assert all(len(v) == len(set(v)) == 2 for v in seen.values()) and len(seen) == B
    # gradients synchronised only on the last backward before each optimizer step
    assert sum(ctx.syncs) == ctx.steps


def test_ddpo_gradient_is_minus_advantage_over_normaliser():
    """One inner epoch, all steps: d loss / d logp(i, t) = -A_i / (num_steps * accum * tbs) at ratio 1."""
    B, S = 4, 3
    algo = DDPO(estimator="sf", per_prompt_stat_tracking=False)
    rollout = _rollout(B, S)
    algo.prepare(rollout, SingleProcessComm())
    ctx = _RecordingContext(B, S, tbs=2, accum=1)
    algo.update(rollout, ctx)
    adv = rollout.advantages.clamp(-5, 5)
    expected = (-adv / (S * 1 * 2)).unsqueeze(1).expand(B, S)
    torch.testing.assert_close(ctx.theta.grad, expected, rtol=1e-12, atol=0)


def test_ddpo_rejects_bad_values():
    from rlft.errors import ConfigError

    with pytest.raises(ConfigError, match="timestep_fraction"):
        DDPO(timestep_fraction=0.0)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        DDPO().check(samples_per_process=12, train_batch_size=4, gradient_accumulation_steps=2, images_per_prompt=1)
