"""Reward-finetuning algorithms behind one interface (:class:`rlft.algorithms.base.Algorithm`)."""

from rlft.algorithms.base import Algorithm, Rollout, TrainContext
from rlft.algorithms.ddpo import DDPO

__all__ = ["DDPO", "Algorithm", "Rollout", "TrainContext"]
