r"""The PPO schedule that DDPO (Black et al. 2023, section 4.3), PXPO and GRPO share.

Per epoch, ``num_inner_epochs`` passes over this process's samples; each pass
shuffles the samples and, independently per sample (from the sample's own
generator, so that batch sizes and processes do not change it), the trainable
steps, keeps the first ``int(timestep_fraction * S)`` of them, and accumulates
gradients over those steps and over ``gradient_accumulation_steps``
micro-batches of ``train_batch_size`` samples before one optimizer step:

    L = 1 / (b T accum) * sum_{micro-batches} sum_{i in micro-batch} sum_{t kept for i} loss_i,t

An algorithm of this kind says only what ``loss_i,t`` is (:meth:`PPOAlgorithm.row_loss`),
from the recomputed step (log-prob, mean, std) at row (i, t), the rollout's old
log-prob there and its advantage. The rows of a micro-batch reach the denoiser in
calls of ``trainer.rows_per_call`` (rlft/learner.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlft.algorithms.base import Algorithm, Rollout, TrainContext
from rlft.errors import ConfigError
from rlft.learner import Rows
from rlft.sampling import StepOutput


def ppo_clip_loss(advantages: Tensor, log_prob: Tensor, old_log_prob: Tensor, clip_range: float) -> Tensor:
    """max(-A rho, -A clip(rho, 1-eps, 1+eps)), element-wise (CleanRL's pg_loss1 / pg_loss2)."""
    ratio = torch.exp(log_prob - old_log_prob)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(pg_loss1, pg_loss2)


def ppo_diagnostics(log_prob: Tensor, old_log_prob: Tensor, clip_range: float) -> dict[str, Tensor]:
    """Per-row approx KL, 0.5 (log pi - log pi_old)^2, and the clipped fraction, each averaged over the
    row's remaining dimensions  [n]."""
    diff = (log_prob - old_log_prob).reshape(len(log_prob), -1)
    return {
        "train/approx_kl": 0.5 * (diff**2).mean(dim=1),
        "train/clipfrac": ((torch.exp(diff) - 1.0).abs() > clip_range).to(diff.dtype).mean(dim=1),
    }


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per dimension, averaged over each row's dimensions  [n]."""
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.reshape(len(kl), -1).mean(dim=1)


class PPOAlgorithm(Algorithm):
    """The schedule above; a subclass sets ``rollout.advantages`` in ``prepare`` and defines ``row_loss``."""

    def __init__(
        self, *, clip_range: float, adv_clip_max: float, timestep_fraction: float, num_inner_epochs: int,
        kl_weight: float = 0.0, kl_key: str = "kl_coef",
    ):  # fmt: skip
        """``kl_weight``: the weight of the KL to pi_ref (:meth:`with_kl_to_reference`), configured as
        ``algorithm.<kl_key>`` (GRPO's beta, DDPO's kl_coef); 0 drops the term and pi_ref."""
        if not kl_weight >= 0:
            raise ConfigError(f"algorithm.{kl_key}", f"must be >= 0, got {kl_weight}", "0 drops the KL term")
        self.kl_weight = kl_weight
        self.uses_reference = kl_weight > 0  # the KL term reads pi_ref's step mean
        if not 0.0 < timestep_fraction <= 1.0:
            raise ConfigError("algorithm.timestep_fraction", f"must be in (0, 1], got {timestep_fraction}")
        for key, value in (("clip_range", clip_range), ("adv_clip_max", adv_clip_max)):
            if not value > 0:
                raise ConfigError(f"algorithm.{key}", f"must be > 0, got {value}")
        if num_inner_epochs < 1:
            raise ConfigError("algorithm.num_inner_epochs", f"must be >= 1, got {num_inner_epochs}")
        self.clip_range = clip_range
        self.adv_clip_max = adv_clip_max
        self.timestep_fraction = timestep_fraction
        self.num_inner_epochs = num_inner_epochs

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

    def policy_loss(
        self, rollout: Rollout, rows: Rows, step: StepOutput, advantages: Tensor, estimator: str = "ppo"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The element-wise surrogate at the rows, with their log pi_old from the rollout: the clipped ratio
        objective (``ppo``) or -A log pi (``sf``, the score-function estimator); and the ratio diagnostics."""
        old = rollout.log_probs[rows.index, rows.step].to(step.log_prob)
        if estimator == "ppo":
            loss = ppo_clip_loss(advantages, step.log_prob, old, self.clip_range)
        else:
            loss = -advantages * step.log_prob
        return loss, ppo_diagnostics(step.log_prob.detach(), old, self.clip_range)

    def with_kl_to_reference(
        self, loss: Tensor, diagnostics: dict, rollout: Rollout, rows: Rows, step: StepOutput, ctx: TrainContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """loss + kl_weight * KL_t(pi_theta || pi_ref) at the rows (pi_ref's step without gradients), logged
        as train/kl_ref; the loss unchanged when kl_weight = 0 (pi_ref is then never read)."""
        if self.kl_weight > 0:
            ref = ctx.steps(rollout, rows, reference=True)
            kl = gaussian_kl(step.mean, ref.mean.to(step.mean), step.std)
            loss = loss + self.kl_weight * kl
            diagnostics["train/kl_ref"] = kl.detach()
        return loss, diagnostics

    def row_loss(
        self, rollout: Rollout, rows: Rows, step: StepOutput, advantages: Tensor, ctx: TrainContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Each row's loss_i,t  [n] and per-row diagnostics  {name: [n]}, from the recomputed ``step``
        (with gradients) and the rows' ``advantages`` (clipped to +-adv_clip_max)."""
        raise NotImplementedError

    def update(self, rollout: Rollout, ctx: TrainContext) -> dict[str, float]:
        g = ctx.generator
        steps = rollout.trainable_steps  # [S']
        num_train_steps = max(1, int(len(steps) * self.timestep_fraction))
        tbs, accum = ctx.train_batch_size, ctx.gradient_accumulation_steps
        num_micro = rollout.batch_size // tbs
        advantages = rollout.advantages.clamp(-self.adv_clip_max, self.adv_clip_max)
        sums: dict[str, float] = {}
        n_rows, norms = 0, []
        for inner in range(self.num_inner_epochs):
            perm = torch.randperm(rollout.batch_size, generator=g)  # [B]
            step_order = torch.stack(  # independent step shuffles, one generator per sample  [B, S']
                [
                    steps[torch.randperm(len(steps), generator=ctx.sample_generator(inner, i))]
                    for i in rollout.sample_ids
                ]
            )
            for m in range(num_micro):
                index = perm[m * tbs : (m + 1) * tbs]  # [b]
                rows = Rows.of(index, step_order[index, :num_train_steps])
                boundary = (m + 1) % accum == 0
                scale = 1.0 / (len(index) * num_train_steps * accum)
                parts: list[dict[str, Tensor]] = []

                def loss(step: StepOutput, part: slice, rows=rows, parts=parts, scale=scale) -> Tensor:
                    mine = rows[part]
                    per_row, diag = self.row_loss(rollout, mine, step, advantages[mine.index].to(step.log_prob), ctx)
                    parts.append({"train/loss": per_row.detach(), **{k: v.detach() for k, v in diag.items()}})
                    return per_row.sum() * scale

                ctx.backward_rows(rollout, rows, loss, sync=boundary)
                for k in parts[0]:
                    sums[k] = sums.get(k, 0.0) + float(torch.cat([p[k] for p in parts]).sum())
                n_rows += len(rows)
                if boundary:
                    norms.append(ctx.step())
        out = {k: v / n_rows for k, v in sums.items()}
        out["train/grad_norm"] = sum(norms) / len(norms)
        out["train/optimizer_steps"] = float(len(norms))
        return out
