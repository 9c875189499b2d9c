"""Rewards: (images in [0, 1], prompts, metadata) -> scores [B] and optional per-pixel maps [B, H, W].

One file per reward family. Every reward is a :class:`Reward`; ``reward=...``
picks one and :class:`WeightedSum` composes several from config.
"""

from rlft.rewards.base import Reward, RewardOutput, WeightedSum

__all__ = ["Reward", "RewardOutput", "WeightedSum"]
