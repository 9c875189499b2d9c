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
