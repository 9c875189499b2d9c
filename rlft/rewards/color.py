"""A colour target, per pixel (PXPO's first feedback source; any model, any resolution).

    r^{ij}(x) = (1 - ||x^{ij} - c|| / sqrt(3)) / (H W),     r(x) = sum_{ij} r^{ij}(x)  in [0, 1],

with x^{ij} the RGB value of pixel (i, j) in [0, 1] and c the target colour.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from rlft.errors import ConfigError
from rlft.rewards.base import Reward, RewardOutput

BASIC_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.5, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "orange": (1.0, 0.65, 0.0),
    "purple": (0.5, 0.0, 0.5),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}


class ColorTarget(Reward):
    """Per-pixel closeness to a target colour: a name of ``palette`` or an RGB triple in [0, 1]."""

    name = "color_target"
    gives_maps = True
    palette: Mapping[str, Sequence[float]] = BASIC_COLORS

    def __init__(self, target: str | Sequence[float] = "blue"):
        if isinstance(target, str):
            if target not in self.palette:
                raise ConfigError(
                    "reward.target", f"unknown colour '{target}'", f"use one of {', '.join(self.palette)} or [r, g, b]"
                )
            target = self.palette[target]
        self.target = torch.tensor([float(v) for v in target])
        if self.target.shape != (3,) or not ((0 <= self.target) & (self.target <= 1)).all():
            raise ConfigError("reward.target", f"must be 3 values in [0, 1], got {list(target)}")

    def score(self, images, prompts, metadata) -> RewardOutput:
        dist = (images.float() - self.target.to(images.device)[None, :, None, None]).norm(dim=1)  # [B, H, W]
        closeness = 1 - dist / math.sqrt(3)
        maps = closeness / closeness[0].numel()
        return RewardOutput(maps.sum(dim=(1, 2)), maps)
