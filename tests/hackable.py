"""A reward that is easy to hack, written outside the package as README "Extend rlft" shows:
the mean brightness of the image. A policy raises it by washing every image out, which the toy
world's held-out toy_alignment (background colour, object colours) sees fall."""

from __future__ import annotations

from rlft.rewards.base import Reward, RewardOutput


class Brightness(Reward):
    """r(x) = mean over pixels and channels of x, in [0, 1]."""

    name = "brightness"

    def score(self, images, prompts, metadata):
        return RewardOutput(images.float().mean(dim=(1, 2, 3)).cpu())
