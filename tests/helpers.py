"""Test-only components, addressed from the command line with `reward._target_=tests.helpers...`."""

from __future__ import annotations

import torch

from rlft.rewards.base import Reward, RewardOutput


class NaNForPrompt(Reward):
    """Mean brightness, but NaN for every image of ``prompt`` (a reward that breaks)."""

    name = "nan_for_prompt"

    def __init__(self, prompt: str = "cat"):
        self.prompt = prompt

    def score(self, images, prompts, metadata) -> RewardOutput:
        scores = images.mean(dim=(1, 2, 3))
        bad = torch.tensor([p == self.prompt for p in prompts])
        return RewardOutput(torch.where(bad, torch.full_like(scores, float("nan")), scores))


class SGDContext:
    """TrainContext over a real UNet: records each optimizer step's gradient, then takes a plain SGD step."""

    def __init__(self, unet, sampler, negative, tbs, accum, lr):
        self.unet, self.sampler, self.negative = unet, sampler, negative
        self.generator = torch.Generator().manual_seed(0)
        self.train_batch_size, self.gradient_accumulation_steps = tbs, accum
        self.lr = lr
        self.grads, self.params_before = [], []
        self.algorithm = None

    def log_prob(self, rollout, index, step):
        traj = rollout.trajectory
        lp = self.sampler.log_prob(
            self.unet,
            traj.latents[index, step],
            traj.latents[index, step + 1],
            traj.timesteps[step],
            traj.prompt_embeds[index],
            self.negative,
        )
        return self.algorithm.reduce_log_prob(lp)

    def backward(self, loss, sync=True):
        loss.backward()

    def step(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.params_before.append([p.detach().clone() for p in params])
        self.grads.append([p.grad.detach().clone() for p in params])
        with torch.no_grad():
            for p in params:
                p -= self.lr * p.grad
                p.grad = None
        return 0.0


def all_log_probs(ctx, rollout, steps):
    """log pi_theta of every sample at every step in ``steps``, through ``ctx`` (with the graph)  [B, T, ...]."""
    B = rollout.batch_size
    return torch.stack([ctx.log_prob(rollout, torch.arange(B), s.expand(B)) for s in steps], dim=1)
