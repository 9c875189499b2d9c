r"""DDPO: Denoising Diffusion Policy Optimization (Black et al., 2023, arXiv 2305.13301).

The denoising chain is an MDP whose actions are the sampler steps
x_{t-1} ~ pi_theta(. | x_t, c). With the reward r(x_0, c) and the per-prompt
normalised advantage A (``stat_tracking``), DDPO_IS (section 4.3) minimises,
per sampled step t,

    L_t(theta) = max( -A * rho_t,  -A * clip(rho_t, 1 - eps, 1 + eps) ),
    rho_t      = pi_theta(x_{t-1} | x_t, c) / pi_old(x_{t-1} | x_t, c)
               = exp(log pi_theta - log pi_old),

and DDPO_SF (the score-function estimator, eq. 4) minimises L_t = -A * log pi_theta.

Log-prob convention (as ddpo-pytorch): log pi is the Gaussian log-density
*averaged* over the latent dimensions, so rho is the geometric mean of the
per-dimension ratios; eps = 1e-4 goes with that convention
(``log_prob_reduction=sum`` gives the exact density). Advantages are
clipped to [-adv_clip_max, adv_clip_max].

Schedule per epoch: ``num_inner_epochs`` passes over this process's samples;
each pass shuffles the samples and, independently per sample (from the sample's
own generator, so that batch sizes and processes do not change it), the trainable
steps, keeps the first ``int(timestep_fraction * S)`` of them, and accumulates
gradients over those steps and over ``gradient_accumulation_steps``
micro-batches of ``train_batch_size`` samples before one optimizer step.
``trainer.timesteps_per_forward`` = k stacks k of a micro-batch's steps into one
UNet call and one backward of their summed loss (the same gradient, k times the
activations).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rlft.algorithms.base import Algorithm, Comm, Rollout, TrainContext, mean_metrics, step_chunks, step_log_probs
from rlft.algorithms.stat_tracking import PerPromptStatTracker
from rlft.errors import ConfigError
from rlft.sampling import compute_dtype


def ppo_clip_loss(advantages: Tensor, log_prob: Tensor, old_log_prob: Tensor, clip_range: float) -> Tensor:
    """max(-A rho, -A clip(rho, 1-eps, 1+eps)), element-wise (CleanRL's pg_loss1 / pg_loss2)."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(pg_loss1, pg_loss2)


class DDPO(Algorithm):
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
    ):
        if log_prob_reduction not in ("mean", "sum"):
            raise ConfigError("algorithm.log_prob_reduction", f"'{log_prob_reduction}' is not one of mean, sum")
        if estimator not in ("ppo", "sf"):
            raise ConfigError("algorithm.estimator", f"'{estimator}' is not one of ppo, sf")
        if not 0.0 < timestep_fraction <= 1.0:
            raise ConfigError("algorithm.timestep_fraction", f"must be in (0, 1], got {timestep_fraction}")
        for key, value in (("clip_range", clip_range), ("adv_clip_max", adv_clip_max)):
            if not value > 0:
                raise ConfigError(f"algorithm.{key}", f"must be > 0, got {value}")
        for key, value in (("stat_buffer_size", stat_buffer_size), ("stat_min_count", stat_min_count)):
            if value < 1:
                raise ConfigError(f"algorithm.{key}", f"must be >= 1, got {value}")
        if num_inner_epochs < 1:
            raise ConfigError("algorithm.num_inner_epochs", f"must be >= 1, got {num_inner_epochs}")
        self.estimator = estimator
        self.log_prob_reduction = log_prob_reduction
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.timestep_fraction = timestep_fraction
        self.num_inner_epochs = num_inner_epochs
        self.tracker = (
            PerPromptStatTracker(stat_buffer_size, stat_min_count, stat_max_prompts)
            if per_prompt_stat_tracking
            else None
        )

    def reduce_log_prob(self, log_prob: Tensor) -> Tensor:
        """Mean (or sum) over latent dimensions  [b, C, h, w] -> [b]."""
        dims = tuple(range(1, log_prob.ndim))
        return log_prob.mean(dim=dims) if self.log_prob_reduction == "mean" else log_prob.sum(dim=dims)

    def per_sample(self, loss: Tensor) -> Tensor:
        """Each sample's loss from the element-wise surrogate (one element per sample here)  [b]."""
        return loss

    def check(
        self, samples_per_process: int, train_batch_size: int, gradient_accumulation_steps: int, images_per_prompt: int
    ) -> None:
        micro_batches = samples_per_process // train_batch_size
        if micro_batches % gradient_accumulation_steps:
            raise ConfigError(
                "trainer.gradient_accumulation_steps",
                f"{gradient_accumulation_steps} does not divide the {micro_batches} micro-batches per process "
                f"({samples_per_process} samples / train_batch_size {train_batch_size})",
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

    # ------------------------------------------------------------------ update
    def update(self, rollout: Rollout, ctx: TrainContext) -> dict[str, float]:
        g = ctx.generator
        steps = rollout.trainable_steps  # [S']
        num_train_steps = max(1, int(len(steps) * self.timestep_fraction))
        tbs, accum = ctx.train_batch_size, ctx.gradient_accumulation_steps
        num_micro = rollout.batch_size // tbs
        advantages = rollout.advantages.clamp(-self.adv_clip_max, self.adv_clip_max)
        diagnostics = []
        for inner in range(self.num_inner_epochs):
            perm = torch.randperm(rollout.batch_size, generator=g)  # [B]
            step_order = torch.stack(  # independent step shuffles, one generator per sample  [B, S']
                [
                    steps[torch.randperm(len(steps), generator=ctx.sample_generator(inner, i))]
                    for i in rollout.sample_ids
                ]
            )
            chunks = step_chunks(num_train_steps, ctx.timesteps_per_forward)
            for m in range(num_micro):
                index = perm[m * tbs : (m + 1) * tbs]  # [b]
                boundary = (m + 1) % accum == 0
                for c, chunk in enumerate(chunks):
                    step = step_order[index, chunk]  # [b, k]
                    log_prob = step_log_probs(ctx, rollout, index, step)  # [b, k, ...]
                    old_log_prob = rollout.log_probs[index[:, None], step].to(log_prob.device)
                    adv = advantages[index].unsqueeze(1).to(log_prob.device)  # [b, 1, ...]
                    if self.estimator == "ppo":
                        elementwise = ppo_clip_loss(adv, log_prob, old_log_prob, self.clip_range)
                    else:
                        elementwise = -adv * log_prob
                    loss = self.per_sample(elementwise.flatten(0, 1)).view(step.shape).mean(dim=0)  # per step  [k]
                    ctx.backward(loss.sum() / (num_train_steps * accum), sync=boundary and c == len(chunks) - 1)
                    with torch.no_grad():
                        ratio = torch.exp(log_prob - old_log_prob)
                        for j in range(step.shape[1]):
                            diagnostics.append(
                                {
                                    "train/loss": float(loss[j]),
                                    "train/approx_kl": float(0.5 * ((log_prob[:, j] - old_log_prob[:, j]) ** 2).mean()),
                                    "train/clipfrac": float(
                                        ((ratio[:, j] - 1.0).abs() > self.clip_range).float().mean()
                                    ),
                                }
                            )
                if boundary:
                    diagnostics[-1]["train/grad_norm"] = ctx.step()
        out = mean_metrics([{k: v for k, v in d.items() if k != "train/grad_norm"} for d in diagnostics])
        norms = [d["train/grad_norm"] for d in diagnostics if "train/grad_norm" in d]
        out["train/grad_norm"] = sum(norms) / len(norms)
        out["train/optimizer_steps"] = float(len(norms))
        return out

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict() if self.tracker else None}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
