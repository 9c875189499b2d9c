r"""PXPO: Pixel-wise Policy Optimisation (Kordzanganeh et al., 2024, arXiv 2404.04356).

The reward is a map over pixels, r(x_0)^{ij}, whose sum is the image's reward.
The denoising step factorises over latent positions (i, j) (all channels of a
position together), so the per-position log-probability is the element-wise
Gaussian log-density summed over channels, and PXPO weights each position's
log-probability by that position's own reward (eq. 9):

    grad J = E[ sum_{ij} r^{ij} * sum_t grad log pi_theta(x_{t-1}^{ij} | x_t, c) ],

dropping the cross terms between positions (that is the method).

Here, as in DDPO, the reward becomes an advantage and the update is DDPO's
schedule (rlft/algorithms/ppo.py: inner epochs, step shuffling, accumulation),
applied per position:

    rbar^{ij}  = avgpool_f(r)^{ij}          (image resolution -> latent, kernel f = VAE factor)
    A^{ij}     = (rbar^{ij} - mean_c rbar^{ij}) / (std + 1e-6),  clipped to +-adv_clip_max,

with mean_c the per-position mean over the epoch's images of prompt c
(``baseline=prompt_mean``; ``none`` keeps rbar, e.g. for centred human maps)
and std the root-mean-square of (rbar - baseline) over the prompt's images and
positions (``std=prompt``), over the whole batch (``global``), or 1 (``none``).
Per sampled step t and sample, the loss sums over positions:

    estimator=sf:   L_t = - sum_{ij} A^{ij} log pi_theta^{ij}                   (eq. 9 as written)
    estimator=ppo:  L_t = sum_{ij} max(-A^{ij} rho^{ij}, -A^{ij} clip(rho^{ij}, 1 - eps, 1 + eps)),
                    rho^{ij} = exp(log pi_theta^{ij} - log pi_old^{ij})          (ratio per position)

With a uniform map (A^{ij} = A for all ij) the sf loss is -A sum_{ij} log pi^{ij}
= -A log pi(x_{t-1} | x_t, c): DDPO-SF with the log-prob summed over all latent
dimensions (tests/test_pxpo.py). With uniform maps the per-prompt std above is
DDPO's per-prompt std.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlft.algorithms.base import Comm, Rollout, TrainContext
from rlft.algorithms.ppo import PPOAlgorithm
from rlft.errors import ConfigError
from rlft.learner import Rows
from rlft.sampling import StepOutput, compute_dtype


def pool_to_latent(maps: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """Average-pool reward maps at image resolution to the latent grid  [B, H, W] -> [B, h, w]."""
    H, W = maps.shape[-2:]
    h, w = latent_hw
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"reward maps of {H}x{W} do not tile the {h}x{w} latent grid with a square kernel")
    f = H // h
    return F.avg_pool2d(maps[:, None].double(), kernel_size=f)[:, 0] if f > 1 else maps.double()


def map_advantages(rbar: Tensor, group: Tensor, baseline: str, std: str, comm: Comm | None = None) -> Tensor:
    """Per-position advantages from pooled maps  [B, h, w] (float64), before the clip."""
    centred = rbar.clone()
    for g in torch.unique(group):  # per prompt: its mean map, then its root-mean-square
        mine = group == g
        if baseline == "prompt_mean":
            centred[mine] -= rbar[mine].mean(dim=0, keepdim=True)
        if std == "prompt":
            centred[mine] /= centred[mine].pow(2).mean().sqrt() + 1e-6
    if std == "global":
        sums = torch.stack([centred.pow(2).sum(), torch.tensor(float(centred.numel()), dtype=centred.dtype)])
        total = comm.gather(sums[None]).sum(dim=0) if comm is not None else sums
        centred = centred / ((total[0] / total[1]).sqrt() + 1e-6)
    return centred


class PXPO(PPOAlgorithm):
    """DDPO's update with a log-prob map per latent position and a reward map per position."""

    def __init__(
        self,
        estimator: Literal["ppo", "sf"] = "sf",
        clip_range: float = 0.2,
        adv_clip_max: float = 5.0,
        timestep_fraction: float = 1.0,
        num_inner_epochs: int = 1,
        baseline: Literal["prompt_mean", "none"] = "prompt_mean",
        std: Literal["prompt", "global", "none"] = "prompt",
        broadcast_scalar_reward: bool = False,
    ):
        super().__init__(
            clip_range=clip_range,
            adv_clip_max=adv_clip_max,
            timestep_fraction=timestep_fraction,
            num_inner_epochs=num_inner_epochs,
        )
        if estimator not in ("ppo", "sf"):
            raise ConfigError("algorithm.estimator", f"'{estimator}' is not one of ppo, sf")
        self.estimator = estimator
        if baseline not in ("prompt_mean", "none"):
            raise ConfigError("algorithm.baseline", f"'{baseline}' is not one of prompt_mean, none")
        if std not in ("prompt", "global", "none"):
            raise ConfigError("algorithm.std", f"'{std}' is not one of prompt, global, none")
        self.baseline = baseline
        self.std = std
        self.broadcast_scalar_reward = broadcast_scalar_reward
        self.needs_reward_maps = not broadcast_scalar_reward

    def check_reward(self, reward_name: str, gives_maps: bool) -> None:
        if not gives_maps and not self.broadcast_scalar_reward:
            raise ConfigError(
                "reward",
                f"PXPO needs per-pixel reward maps; '{reward_name}' gives only one score per image",
                "choose a pixel-wise reward (toy_alignment, toy_color, color_target, segmentation, feedback_map), "
                "or set algorithm.broadcast_scalar_reward=true to spread each score uniformly over the image",
            )

    def check(
        self, samples_per_process: int, train_batch_size: int, gradient_accumulation_steps: int, images_per_prompt: int
    ) -> None:
        super().check(samples_per_process, train_batch_size, gradient_accumulation_steps, images_per_prompt)
        if self.baseline == "prompt_mean" and images_per_prompt < 2:
            raise ConfigError(
                "algorithm.baseline",
                "prompt_mean subtracts the mean map of each prompt's images, so one image per prompt has "
                "advantage 0 everywhere",
                "set trainer.images_per_prompt >= 2, or algorithm.baseline=none for maps that are already "
                "centred (feedback_map)",
            )

    def reduce_log_prob(self, log_prob: Tensor) -> Tensor:
        """Sum over channels: the log-density of each latent position  [b, C, h, w] -> [b, h, w]."""
        return log_prob.sum(dim=1)

    def row_loss(
        self, rollout: Rollout, rows: Rows, step: StepOutput, advantages: Tensor, ctx: TrainContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_t summed over positions (the sf or ppo form above)  [n, h, w] -> [n]."""
        loss, diagnostics = self.policy_loss(rollout, rows, step, advantages, self.estimator)
        return loss.flatten(1).sum(dim=1), diagnostics

    def prepare(self, rollout: Rollout, comm: Comm) -> dict[str, float]:
        latent_hw = tuple(rollout.log_probs.shape[-2:])
        if rollout.reward_maps is not None:
            rbar = pool_to_latent(rollout.reward_maps, latent_hw)
        else:  # broadcast_scalar_reward: the score spread uniformly (the map that sums to it)
            rbar = rollout.rewards.double()[:, None, None].expand(-1, *latent_hw) / (latent_hw[0] * latent_hw[1])
        advantages = map_advantages(rbar, rollout.group, self.baseline, self.std, comm)
        rollout.advantages = advantages.to(compute_dtype(rollout.log_probs))  # fp32 (fp64 in identity tests)
        return {
            "train/advantage_abs": float(advantages.abs().mean()),
            "train/advantage_clipfrac": float((advantages.abs() > self.adv_clip_max).double().mean()),
        }
