"""The interface every algorithm implements; the runner never branches on the algorithm.

One epoch, as the runner executes it:

    SAMPLING   rollout = N prompts x B images each, trajectories under the old
               policy (pi_old: the current weights, snapshotted by not training
               yet), log-probs reduced by ``algorithm.reduce_log_prob``; if
               ``needs_reference``, log pi_ref per stochastic step too
    REWARD     scores [B] (and maps [B, H, W] if ``needs_reward_maps``)
    PREPARE    ``algorithm.prepare(rollout, comm)``: advantages / pairs (may
               gather across processes: all processes call it)
    TRAINING   ``algorithm.update(rollout, ctx)``: the paper's update, written
               out with ``ctx.backward_rows`` (the policy's step at (sample,
               step) rows, with gradients), ``ctx.steps`` (without; also pi_ref's)
               and ``ctx.step`` (the optimizer); rlft/algorithms/ppo.py holds
               the PPO schedule DDPO, PXPO and GRPO share
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from rlft.errors import ConfigError
from rlft.learner import Rows
from rlft.sampling import StepOutput, Trajectory


@dataclass
class Rollout:
    """One epoch's samples on this process (B = local batch, S = sampler steps)."""

    trajectory: Trajectory  # latents, old log-probs, timesteps, prompt embeddings, images
    prompts: list[str]  # [B]
    group: Tensor  # epoch-wide id of each image's prompt; images of one prompt share it  [B] long
    rewards: Tensor  # [B] float32
    reward_maps: Tensor | None = None  # [B, H, W] (pixel-wise rewards)
    sample_index: Tensor | None = None  # each sample's position in the epoch (any process count)  [B] long
    ref_log_probs: Tensor | None = None  # reduce(log pi_ref) per stochastic step (0 at the others)  [B, S, ...]
    advantages: Tensor | None = None  # set by Algorithm.prepare; shape is the algorithm's

    @property
    def batch_size(self) -> int:
        return self.trajectory.batch_size

    @property
    def sample_ids(self) -> list[int]:
        """``sample_index`` as ints (0..B-1 where the rollout was built without it)."""
        return list(range(self.batch_size)) if self.sample_index is None else self.sample_index.tolist()

    @property
    def log_probs(self) -> Tensor:
        return self.trajectory.log_probs

    @property
    def trainable_steps(self) -> Tensor:
        """Indices of the stochastic sampler steps  [S'] long."""
        return torch.nonzero(self.trajectory.stochastic).flatten()


class Comm(Protocol):
    """Collectives over processes (identity in a single process)."""

    rank: int
    world_size: int

    def gather(self, tensor: Tensor) -> Tensor: ...  # concatenated in rank order

    def gather_object(self, items: Sequence) -> list: ...


class TrainContext(Protocol):
    """What an update may touch: the policy's whole step at (sample, step) rows (rlft/learner.py), the
    reference policy's, backward and the optimizer step."""

    generator: torch.Generator  # CPU, seeded per (seed, epoch, process): the order of this process's samples
    train_batch_size: int  # per process
    gradient_accumulation_steps: int

    def sample_generator(self, *key: int) -> torch.Generator:
        """A CPU generator seeded by (seed, epoch, *key), e.g. (inner epoch, sample index): a draw made
        per sample with it does not depend on batch sizes or the number of processes."""
        ...

    def steps(self, rollout: Rollout, rows: Rows, reference: bool = False) -> StepOutput:
        """The step x_j -> x_{j+1} at each row under pi_theta (or pi_ref), no gradient: reduced
        log-prob, mean and std  [n, ...]."""
        ...

    def backward_rows(
        self, rollout: Rollout, rows: Rows, loss: Callable[[StepOutput, slice], Tensor], sync: bool = True
    ) -> StepOutput:
        """The step at each row with gradients, in calls of ``trainer.rows_per_call`` rows; ``loss(step, part)``
        of each call is backpropagated at once. Returns every row's step, detached."""
        ...

    def backward(self, loss: Tensor, sync: bool = True) -> None:
        """loss.backward(); ``sync=False`` skips the cross-process gradient reduction (accumulating)."""
        ...

    def step(self) -> float:
        """Clip the gradient norm, optimizer.step(), zero_grad(); returns the pre-clip norm."""
        ...


class Algorithm:
    """Base class: defaults for what the rollout must record, and no-op state."""

    needs_reference: bool = False  # record log pi_ref per stochastic step of every sample (PRDP)
    uses_reference: bool = False  # asks for pi_ref's step during the update (ctx.steps(..., reference=True))
    needs_reward_maps: bool = False  # the reward must give per-pixel maps (PXPO)
    min_images_per_prompt: int = 1  # e.g. 2 for pairwise losses
    log_prob_reduction: str | None = None  # mean | sum over latent dimensions (checked_reduction); None: own method

    def reduce_log_prob(self, log_prob: Tensor) -> Tensor:
        """Element-wise log-density [b, C, h, w] -> what this algorithm trains on: by default its mean (or
        sum) over latent dimensions as ``log_prob_reduction`` says  [b]."""
        if self.log_prob_reduction is None:
            raise NotImplementedError
        return reduce_latent(log_prob, self.log_prob_reduction)

    def check(
        self, samples_per_process: int, train_batch_size: int, gradient_accumulation_steps: int, images_per_prompt: int
    ) -> None:
        """Raise ConfigError when the batch arithmetic cannot work for this algorithm."""

    def check_reward(self, reward_name: str, gives_maps: bool) -> None:
        """Raise ConfigError when the reward cannot feed this algorithm (start-up, before weights load)."""
        if self.needs_reward_maps and not gives_maps:
            raise ConfigError(
                "reward", f"{type(self).__name__} needs per-pixel reward maps; '{reward_name}' gives only scores"
            )

    def prepare(self, rollout: Rollout, comm: Comm) -> dict[str, float]:
        """Compute ``rollout.advantages`` (or pairs); every process calls it."""
        raise NotImplementedError

    def update(self, rollout: Rollout, ctx: TrainContext) -> dict[str, float]:
        """The paper's gradient update(s) on this epoch's data; returns mean diagnostics."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def checked_reduction(how: str) -> str:
    """``algorithm.log_prob_reduction``, refused unless mean or sum."""
    if how not in ("mean", "sum"):
        raise ConfigError("algorithm.log_prob_reduction", f"'{how}' is not one of mean, sum")
    return how


def reduce_latent(log_prob: Tensor, how: str) -> Tensor:
    """Mean (``mean``, the reference codes' convention) or sum (``sum``, the exact density) of an element-wise
    log-density over its latent dimensions  [b, C, h, w] -> [b]."""
    dims = tuple(range(1, log_prob.ndim))
    return log_prob.mean(dim=dims) if how == "mean" else log_prob.sum(dim=dims)


def mean_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Average a list of per-micro-batch diagnostics."""
    if not rows:
        return {}
    return {k: float(sum(r[k] for r in rows) / len(rows)) for k in rows[0]}
