r"""PRDP: Proximal Reward Difference Prediction (Deng et al., CVPR 2024, arXiv 2402.08714).

PRDP turns RLHF's KL-regularised objective into supervised regression: for two
trajectories a, b of the same prompt c, the log-ratio of the policy to the
frozen pretrained reference must predict their reward difference (eq. 6),

    rhat_t(x) = log pi_theta(x_{t-1} | x_t, c) - log pi_ref(x_{t-1} | x_t, c)      (per step)
    rhat(x)   = agg_t rhat_t(x)                                    (agg: mean | sum over steps)
    L_RDP     = ( rhat(x^a) - rhat(x^b) - (r(x^a) - r(x^b)) / beta )^2,

and stays stable through a proximal update (eq. 8): each step's value may move
at most eps from its value under the old policy (the weights that sampled the
epoch), and the larger of the clipped and unclipped errors is minimised,

    rhat_clip_t = clip(rhat_t, rhat_old_t - eps, rhat_old_t + eps),   rhat_clip = agg_t rhat_clip_t
    L_ab        = max( (rhat_a - rhat_b - dr/beta)^2,  (rhat_clip_a - rhat_clip_b - dr/beta)^2 ),

averaged over the ordered pairs of images of one prompt with dr = r_a - r_b > 0
(each unordered pair once, exact ties dropped), then over prompts.

Online optimisation (Algorithm 1): each epoch samples N prompts x B images from
the old policy, scores them, records log pi_ref per step, then takes K gradient
steps on that data (``num_inner_epochs`` passes; one optimizer step per pass
when ``gradient_accumulation_steps`` covers all micro-batches, as in the paper).

Memory: L depends on theta only through the per-step values rhat_t(i). One
pass without gradients gives every value, hence the coefficients
w_{i,t} = dL / d log pi_theta(i, t), by autograd on the small [B, T] tensor; a
second pass backpropagates the surrogate sum_{i,t} w_{i,t} log pi_theta(x^i_{t-1} | x^i_t, c)
in calls of ``trainer.rows_per_call`` (sample, step) rows (rlft/learner.py).
Its gradient equals the full autograd gradient of L (tests/test_prdp.py), and
no step keeps more than one UNet graph alive. Before the first optimizer step
of an epoch theta equals the old policy, so the recorded log pi_old serve as
the no-gradient pass (there, rhat_t = rhat_old_t and no clip is active).

Log-prob per step: the Gaussian log-density of the latent, averaged over its
dimensions (``log_prob_reduction=mean``, the convention of ddpo-pytorch that
the paper's hyperparameters were tuned with) or summed (the exact density).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from torch import Tensor

from rlft.algorithms.base import Algorithm, Comm, Rollout, TrainContext, checked_reduction
from rlft.errors import ConfigError
from rlft.learner import Rows
from rlft.sampling import compute_dtype


def pairs_of(group: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ordered pairs (a, b) of images of the same prompt with r_a - r_b > 0.

    Returns index_a [P], index_b [P] and each pair's weight [P]: 1 / (number of pairs of its
    prompt x number of prompts with pairs), so that sum(weight * loss) is the mean over pairs,
    then over prompts.
    """
    same = group[:, None] == group[None, :]  # [B, B]
    better = rewards[:, None] > rewards[None, :]  # r_a > r_b: ties and the diagonal drop out
    a, b = torch.nonzero(same & better, as_tuple=True)
    if len(a) == 0:
        return a, b, torch.zeros(0, dtype=rewards.dtype)
    prompts, per_pair_prompt = torch.unique(group[a], return_inverse=True)
    count = torch.bincount(per_pair_prompt).to(rewards.dtype)  # pairs per prompt
    return a, b, 1.0 / (count[per_pair_prompt] * len(prompts))


def aggregate(values: Tensor, how: str) -> Tensor:
    """agg_t over the step dimension  [B, T] -> [B]."""
    return values.mean(dim=1) if how == "mean" else values.sum(dim=1)


def _pair_errors(log_prob, old_log_prob, ref_log_prob, rewards, group, beta, clip_range, aggregation):
    """What the loss and its coefficients share: the per-step values and clip interval, the pairs,
    and each pair's unclipped and clipped errors e = rhat_a - rhat_b - dr/beta (differentiable)."""
    rhat_t = log_prob - ref_log_prob  # [B, T]
    rhat_old_t = old_log_prob - ref_log_prob
    lo, hi = rhat_old_t - clip_range, rhat_old_t + clip_range
    rhat_clip_t = torch.clamp(rhat_t, lo, hi)
    rhat, rhat_clip = aggregate(rhat_t, aggregation), aggregate(rhat_clip_t, aggregation)  # [B]
    a, b, weight = pairs_of(group, rewards)
    target = (rewards[a] - rewards[b]).to(log_prob) / beta  # [P]
    e = rhat[a] - rhat[b] - target
    e_clip = rhat_clip[a] - rhat_clip[b] - target
    return rhat_t, lo, hi, a, b, weight.to(log_prob), e, e_clip


def prdp_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    ref_log_prob: Tensor,
    rewards: Tensor,
    group: Tensor,
    beta: float,
    clip_range: float,
    aggregation: str = "mean",
) -> Tensor:
    """The trajectory loss L (eq. 8) written directly: autograd through it is the reference gradient.

    log_prob, old_log_prob, ref_log_prob: log pi_theta / pi_old / pi_ref per step  [B, T];
    rewards [B]; group [B] (images of one prompt share an id).
    """
    *_, weight, e, e_clip = _pair_errors(
        log_prob, old_log_prob, ref_log_prob, rewards, group, beta, clip_range, aggregation
    )
    return (weight * torch.maximum(e**2, e_clip**2)).sum()


def prdp_coefficients(
    log_prob: Tensor,
    old_log_prob: Tensor,
    ref_log_prob: Tensor,
    rewards: Tensor,
    group: Tensor,
    beta: float,
    clip_range: float,
    aggregation: str = "mean",
) -> tuple[Tensor, dict[str, float]]:
    """w_{i,t} = dL / d log pi_theta(x^i_{t-1} | x^i_t)  [B, T], by autograd on the small [B, T] tensor of
    values (no UNet graph), plus diagnostics.

    For a pair (a, b) with error e = rhat_a - rhat_b - dr/beta (or e_clip), the active max branch gives
    2 e to sample a and -2 e to sample b, times d agg / d rhat_t (1/T or 1), times 1[step t inside its clip
    interval] on the clipped branch (tests/test_prdp.py checks these values by hand and App. G's).
    """
    values = log_prob.detach().requires_grad_(True)
    with torch.enable_grad():
        rhat_t, lo, hi, a, b, weight, e, e_clip = _pair_errors(
            values, old_log_prob, ref_log_prob, rewards, group, beta, clip_range, aggregation
        )
        loss = (weight * torch.maximum(e**2, e_clip**2)).sum()
        (w,) = torch.autograd.grad(loss, values, allow_unused=True) if len(a) else (None,)
    w = torch.zeros_like(log_prob) if w is None else w
    inside = (rhat_t >= lo) & (rhat_t <= hi)
    diagnostics = {
        "train/loss": float(loss.detach()),
        "train/prdp_pairs": float(len(a)),
        "train/clipfrac": float((~inside).to(log_prob.dtype).mean()),  # steps that moved more than eps from pi_old
        "train/prdp_abs_error": float(e.detach().abs().mean()) if len(a) else 0.0,
        "train/approx_kl": float(0.5 * ((log_prob - old_log_prob) ** 2).mean()),
    }
    return w, diagnostics


class PRDP(Algorithm):
    needs_reference = True
    min_images_per_prompt = 2

    def __init__(
        self,
        beta: float = 3e-5,
        clip_range: float = 1e-6,
        aggregation: Literal["mean", "sum"] = "mean",
        log_prob_reduction: Literal["mean", "sum"] = "mean",
        num_inner_epochs: int = 10,
    ):
        if beta <= 0:
            raise ConfigError("algorithm.beta", f"must be > 0, got {beta}")
        if clip_range <= 0:
            raise ConfigError("algorithm.clip_range", f"must be > 0, got {clip_range}")
        if aggregation not in ("mean", "sum"):
            raise ConfigError("algorithm.aggregation", f"'{aggregation}' is not one of mean, sum")
        if num_inner_epochs < 1:
            raise ConfigError("algorithm.num_inner_epochs", f"must be >= 1, got {num_inner_epochs}")
        self.beta = beta
        self.clip_range = clip_range
        self.aggregation = aggregation
        self.log_prob_reduction = checked_reduction(log_prob_reduction)
        self.num_inner_epochs = num_inner_epochs

    def check(
        self, samples_per_process: int, train_batch_size: int, gradient_accumulation_steps: int, images_per_prompt: int
    ) -> None:
        minibatch = train_batch_size * gradient_accumulation_steps
        if samples_per_process % minibatch or minibatch % images_per_prompt:
            raise ConfigError(
                "trainer.gradient_accumulation_steps",
                f"PRDP's gradient steps take whole prompts: train_batch_size x gradient_accumulation_steps "
                f"= {minibatch} must divide the {samples_per_process} samples per process and be a multiple of "
                f"images_per_prompt ({images_per_prompt})",
                f"the paper's setting is one step per pass: gradient_accumulation_steps = "
                f"{samples_per_process // train_batch_size}",
            )

    def prepare(self, rollout: Rollout, comm: Comm) -> dict[str, float]:
        """Nothing to precompute: pairs live within a prompt, and a prompt's images are on one process."""
        return {}

    def update(self, rollout: Rollout, ctx: TrainContext) -> dict[str, float]:
        steps = rollout.trainable_steps  # [T]
        dtype = compute_dtype(rollout.log_probs)  # fp32 (fp64 in identity tests)
        old = rollout.log_probs[:, steps].to(dtype)  # log pi_old  [B, T]
        ref = rollout.ref_log_probs[:, steps].to(dtype)  # log pi_ref  [B, T]
        rewards, group = rollout.rewards.to(dtype), rollout.group
        tbs, accum = ctx.train_batch_size, ctx.gradient_accumulation_steps
        minibatch = tbs * accum
        prompts = torch.unique_consecutive(group)  # images of one prompt are contiguous
        records, stepped = [], False
        for _ in range(self.num_inner_epochs):
            order = prompts[torch.randperm(len(prompts), generator=ctx.generator)]
            samples = torch.cat([torch.nonzero(group == p).flatten() for p in order])  # whole prompts, shuffled
            for start in range(0, rollout.batch_size, minibatch):
                index = samples[start : start + minibatch]  # [M]
                # pass 1, no gradient: log pi_theta per step (= log pi_old before the epoch's first step)
                t0 = time.perf_counter()
                current = old[index] if not stepped else self._values(rollout, ctx, index, steps)
                t1 = time.perf_counter()
                w, diag = prdp_coefficients(
                    current, old[index], ref[index], rewards[index], group[index], self.beta, self.clip_range,
                    self.aggregation,
                )  # fmt: skip
                # pass 2: backpropagate sum_{i,t} w_{i,t} log pi_theta(i, t) (in calls of trainer.rows_per_call rows)
                rows = Rows.of(index, steps.expand(len(index), -1))
                w_rows = Rows.of(torch.arange(len(index)), torch.arange(len(steps)).expand(len(index), -1))
                w_rows = w[w_rows.index, w_rows.step]  # [M T], in the rows' order

                def surrogate(step, part, w_rows=w_rows):
                    return (w_rows[part].to(step.log_prob) * step.log_prob).sum()

                ctx.backward_rows(rollout, rows, surrogate)  # DDP averages the processes' prompt means
                diag["train/grad_norm"] = ctx.step()
                diag["perf/prdp_values_s"], diag["perf/prdp_backward_s"] = t1 - t0, time.perf_counter() - t1
                stepped = True
                records.append(diag)
        out = {k: sum(r[k] for r in records) / len(records) for k in records[0] if not k.startswith("perf/")}
        for k in ("perf/prdp_values_s", "perf/prdp_backward_s"):  # epoch totals
            out[k] = sum(r[k] for r in records)
        out["train/optimizer_steps"] = float(len(records))
        return out

    @torch.no_grad()
    def _values(self, rollout: Rollout, ctx: TrainContext, index: Tensor, steps: Tensor) -> Tensor:
        """log pi_theta at every trainable step of samples ``index``, without a graph  [M, T]."""
        values = ctx.steps(rollout, Rows.of(index, steps.expand(len(index), -1))).log_prob
        return Rows.unflatten(values, len(index)).to(compute_dtype(rollout.log_probs))
