r"""GRPO for diffusion: group-relative advantages, the per-step PPO clip and a closed-form KL to pi_ref
(Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eqs. 4-6; DanceGRPO, Xue et al. 2025, ran it on SD v1.4).

For the G images of one prompt c with rewards r_1..r_G (eq. 4),

    A_i = (r_i - mean(r_1..r_G)) / (std + 1e-4),   clipped to +-adv_clip_max,

std the population std of the group (``std=group``) or of the whole epoch's
rewards (``std=global``, Flow-GRPO's SD3.5 settings). Per sampled step t of
image i (eq. 6), with rho = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c),

    L_{i,t} = max(-A_i rho, -A_i clip(rho, 1 - eps, 1 + eps)) + beta * KL_t(pi_theta || pi_ref),

and, both steps being Gaussians of the same std sigma_t (the sampler's), the
KL in closed form per latent dimension d, averaged over the dimensions (the
mean convention of DDPO's log-prob; flow_grpo's code averages the same way):

    KL_t = mean_d (mu_theta,d - mu_ref,d)^2 / (2 sigma_t^2).

The ratio uses the log-prob averaged over latent dimensions as DDPO does
(``log_prob_reduction=sum`` for the exact density), and the update is the PPO
schedule of rlft/algorithms/ppo.py: inner epochs, step shuffles,
``timestep_fraction``, gradient accumulation. With beta = 0 the loss is DDPO's
clipped objective with these advantages (tests/test_grpo.py). pi_ref's mean is
recomputed at each trained row (no gradient), so beta > 0 costs one more
denoiser forward per row and nothing is stored per epoch.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rlft.algorithms.base import Comm, Rollout, TrainContext, checked_reduction
from rlft.algorithms.ppo import PPOAlgorithm
from rlft.errors import ConfigError
from rlft.learner import Rows
from rlft.sampling import StepOutput, compute_dtype


def group_advantages(rewards: Tensor, group: Tensor, global_std: Tensor | None = None, eps: float = 1e-4) -> Tensor:
    """(r_i - mean of i's group) / (population std of i's group + eps), or / (``global_std`` + eps)  [N]."""
    advantages = torch.empty_like(rewards)
    for g in torch.unique(group):
        mine = group == g
        scale = rewards[mine].std(unbiased=False) if global_std is None else global_std
        advantages[mine] = (rewards[mine] - rewards[mine].mean()) / (scale + eps)
    return advantages


class GRPO(PPOAlgorithm):
    min_images_per_prompt = 2  # a group of one has no relative advantage

    def __init__(
        self,
        clip_range: float = 1e-4,
        beta: float = 0.01,
        std: Literal["group", "global"] = "group",
        adv_clip_max: float = 5.0,
        timestep_fraction: float = 1.0,
        num_inner_epochs: int = 1,
        log_prob_reduction: Literal["mean", "sum"] = "mean",
    ):
        super().__init__(
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            timestep_fraction=timestep_fraction,
            num_inner_epochs=num_inner_epochs,
            kl_weight=beta,
            kl_key="beta",
        )
        if std not in ("group", "global"):
            raise ConfigError("algorithm.std", f"'{std}' is not one of group, global")
        self.std = std
        self.log_prob_reduction = checked_reduction(log_prob_reduction)

    def prepare(self, rollout: Rollout, comm: Comm) -> dict[str, float]:
        """A_i over each prompt's images (a prompt's images are on one process; ``std=global`` gathers
        every process's rewards for the epoch's std)."""
        rewards = rollout.rewards.double()
        global_std = comm.gather(rollout.rewards).double().std(unbiased=False) if self.std == "global" else None
        advantages = group_advantages(rewards, rollout.group, global_std)
        rollout.advantages = advantages.to(compute_dtype(rollout.log_probs))  # fp32 (fp64 in identity tests)
        return {"train/advantage_abs": float(advantages.abs().mean())}

    def row_loss(
        self, rollout: Rollout, rows: Rows, step: StepOutput, advantages: Tensor, ctx: TrainContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped ratio objective plus beta * KL_t at each row."""
        loss, diagnostics = self.policy_loss(rollout, rows, step, advantages, "ppo")
        return self.with_kl_to_reference(loss, diagnostics, rollout, rows, step, ctx)
