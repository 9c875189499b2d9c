"""Where every random draw of a run comes from, so that a result is a property of the config.

Each draw has its own generator, seeded by a key that names what it is for and
never how the work happens to be batched:

    (seed, SAMPLE, epoch, i)          x_T and every step's noise of sample i of the epoch
    (seed, EVAL, eval_seed, i)        the same for evaluation image i
    (seed, TRAIN_SAMPLE, epoch, k, i) sample i's step shuffle in inner epoch k (DDPO, PXPO)
    (seed, TRAIN, epoch, rank)        the order of this process's samples in micro-batches
    (seed, INIT)                      torch's global generator while the model is built (a LoRA
                                      adapter's random initialisation)

``i`` is the sample's position in the epoch (prompt position x images per prompt
+ image), the same on any number of processes. So ``sampler.batch_size``,
``trainer.train_batch_size`` and the number of processes change the samples and
rewards only by float rounding (different kernels for different batch shapes),
and the weights too wherever an optimizer step sees the same samples
(tests/test_reproducibility.py). A resumed run draws exactly what the
uninterrupted run would, because no generator carries state across epochs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

SAMPLE, TRAIN, EVAL, TRAIN_SAMPLE, INIT = 1, 2, 3, 4, 5  # purposes: a key's second element


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of ints, e.g. (seed, purpose, epoch, sample)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]))


def seed_global(*key: int) -> None:
    """Seed torch's global generator (for code that draws from it, e.g. peft's LoRA initialisation)."""
    torch.manual_seed(int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]))


def sample_noise(keys: Sequence[Sequence[int]], num_steps: int, shape: tuple[int, ...]) -> Tensor:
    """x_T and the noise of each of ``num_steps`` steps for every sample, each sample from its own
    generator (``keys[b]``)  [B, S+1, *shape] fp32, CPU."""
    return torch.stack([torch.randn((num_steps + 1, *shape), generator=seeded_generator(*key)) for key in keys])
