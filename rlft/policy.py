"""The seam between a model family and the rest of rlft: a policy and its conditioning.

One denoising step of any family flows the same way:

    cond  = policy.encode(prompts, negative_prompt)        # once per batch of prompts
    y     = policy.predict(x_t, t, cond, guidance_scale)   # the guided model output (CFG inside)
    step  = sampler.step_with_log_prob(y, t, x_t, ...)     # x_{t-1}, log pi, mean, std (rlft/sampling.py)
    loss  = algorithm's objective on step.log_prob / step.mean   (rlft/algorithms/)

A family (Stable Diffusion's UNet in rlft/models.py) implements :class:`Policy`;
the runner, the samplers and the algorithms only call these methods, so a new
family is its own module plus a ``model`` config whose ``_target_`` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Everything the denoiser is conditioned on, as keyword inputs of its forward call.

    ``inputs``: per-prompt tensors, batch first (e.g. ``encoder_hidden_states`` [B, L, D]; an SD3
    transformer adds ``pooled_projections`` [B, P]). ``negative``: the same keys for the negative
    prompt, batch 1 (broadcast over the batch by classifier-free guidance). Indexing selects prompts.
    """

    inputs: dict[str, Tensor]
    negative: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def __getitem__(self, index) -> Conditioning:
        return Conditioning({k: v[index] for k, v in self.inputs.items()}, self.negative)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        move = lambda v: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device)  # noqa: E731
        return Conditioning(
            {k: move(v) for k, v in self.inputs.items()}, {k: move(v) for k, v in self.negative.items()}
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(v.dtype for v in self.inputs.values() if v.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(iter(self.inputs.values())).device

    def guided(self) -> dict[str, Tensor]:
        """The inputs of one classifier-free-guidance call: the negative's rows, then the prompts'  [2B, ...]."""
        b = len(self)
        return {k: torch.cat([self.negative[k].expand(b, *v.shape[1:]), v]) for k, v in self.inputs.items()}

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        keys = items[0].inputs
        return Conditioning({k: torch.cat([c.inputs[k] for c in items]) for k in keys}, items[0].negative)


class Policy(Protocol):
    """What rlft asks of a model family (rlft/models.py implements it for Stable Diffusion's UNet)."""

    scheduler_config: dict  # the pipeline's scheduler config; a sampler builds its own scheduler from it

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of x_T."""
        ...

    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning: ...

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        """The guided model output at x_t [b, C, h, w], float timesteps t [b]: y_u + w (y_c - y_u), >= fp32."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1]  [b, 3, H, W]."""
        ...

    def reference_policy(self) -> Policy:
        """The frozen pretrained policy pi_ref (the same interface)."""
        ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
