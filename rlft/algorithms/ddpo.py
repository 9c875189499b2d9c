r"""DDPO: Denoising Diffusion Policy Optimization (Black et al., 2023, arXiv 2305.13301).

The denoising chain is an MDP whose actions are the sampler steps
x_{t-1} ~ pi_theta(. | x_t, c). With the reward r(x_0, c) and the per-prompt
normalised advantage A (``stat_tracking``), DDPO_IS (section 4.3) minimises,
per sampled step t,

    L_t(theta) = max( -A * rho_t,  -A * clip(rho_t, 1 - eps, 1 + eps) ),
    rho_t      = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c)
               = exp(log pi_theta - log pi_old),

and DDPO_SF (the score-function estimator, eq. 4) minimises L_t = -A * log pi_theta.

``kl_coef`` = beta > 0 adds the closed-form per-step KL to the pretrained policy pi_ref that GRPO
uses (rlft/algorithms/grpo.py), a control on drift and reward hacking:

    L_t += beta * KL(pi_theta(. | x_t) || pi_ref(. | x_t)) = beta * mean_d (mu_theta - mu_ref)^2 / (2 sigma_t^2)

beta = 0 (the default) is DDPO exactly: pi_ref is neither kept nor read.

Log-prob convention (as ddpo-pytorch): log pi is the Gaussian log-density
*averaged* over the latent dimensions, so rho is the geometric mean of the
per-dimension ratios; eps = 1e-4 goes with that convention
(``log_prob_reduction=sum`` gives the exact density). Advantages are
clipped to [-adv_clip_max, adv_clip_max].

Schedule per epoch: the PPO schedule of rlft/algorithms/ppo.py (inner epochs,
per-sample step shuffles, ``timestep_fraction``, gradient accumulation).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from rlft.algorithms.base import Comm, Rollout, TrainContext, checked_reduction
from rlft.algorithms.ppo import PPOAlgorithm, ppo_clip_loss
from rlft.algorithms.stat_tracking import PerPromptStatTracker
from rlft.errors import ConfigError
from rlft.learner import Rows
from rlft.sampling import StepOutput, compute_dtype

__all__ = ["DDPO", "ppo_clip_loss"]


class DDPO(PPOAlgorithm):
    def __init__(
        self,
        estimator: Literal["ppo", "sf"] = "ppo",
        clip_range: float = 1e-4,
        adv_clip_max: float = 5.0,
        timestep_fraction: float = 1.0,
        num_inner_epochs: int = 1,
        per_prompt_stat_tracking: bool = True,
        stat_buffer_size: int = 16,
        stat_min_count: int = 16,
        stat_max_prompts: int = 100_000,
        log_prob_reduction: Literal["mean", "sum"] = "mean",
        kl_coef: float = 0.0,
    ):
        if estimator not in ("ppo", "sf"):
            raise ConfigError("algorithm.estimator", f"'{estimator}' is not one of ppo, sf")
        super().__init__(
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            timestep_fraction=timestep_fraction,
            num_inner_epochs=num_inner_epochs,
            kl_weight=kl_coef,
            kl_key="kl_coef",
        )
        for key, value in (("stat_buffer_size", stat_buffer_size), ("stat_min_count", stat_min_count)):
            if value < 1:
                raise ConfigError(f"algorithm.{key}", f"must be >= 1, got {value}")
        self.estimator = estimator
        self.log_prob_reduction = checked_reduction(log_prob_reduction)
        self.tracker = (
            PerPromptStatTracker(stat_buffer_size, stat_min_count, stat_max_prompts)
            if per_prompt_stat_tracking
            else None
        )

    # ------------------------------------------------------------------ advantages
    def prepare(self, rollout: Rollout, comm: Comm) -> dict[str, float]:
        rewards = comm.gather(rollout.rewards)  # global  [N]
        if self.tracker is not None:
            prompts = comm.gather_object(rollout.prompts)
            advantages = self.tracker.update(prompts, rewards)
        else:
            advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
        b = rollout.batch_size
        local = advantages[comm.rank * b : (comm.rank + 1) * b]  # this process's  [B]
        rollout.advantages = local.to(compute_dtype(rollout.log_probs))  # fp32 (fp64 in identity tests)
        return {"train/advantage_abs": float(advantages.abs().mean())}

    # ------------------------------------------------------------------ the loss of one (sample, step)
    def row_loss(
        self, rollout: Rollout, rows: Rows, step: StepOutput, advantages: Tensor, ctx: TrainContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_t (section 4.3): the clipped ratio objective, or -A log pi for the score-function estimator;
        plus kl_coef * KL_t to pi_ref when kl_coef > 0."""
        loss, diagnostics = self.policy_loss(rollout, rows, step, advantages, self.estimator)
        return self.with_kl_to_reference(loss, diagnostics, rollout, rows, step, ctx)

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
