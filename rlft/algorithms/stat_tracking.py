"""Per-prompt reward normalisation (DDPO, section 4.3; reference: ddpo-pytorch's stat tracker).

For the images of prompt c in this batch,

    A_i = (r_i - mean_c) / (std_c + 1e-6),

where mean_c and std_c are taken over a buffer of the last ``buffer_size``
rewards of c (this batch's included), or over the whole batch while the buffer
holds fewer than ``min_count`` rewards. The number of prompts tracked is bounded
(least recently seen first out), so memory stays bounded on 100k+ prompts.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

import numpy as np
import torch


class PerPromptStatTracker:
    def __init__(self, buffer_size: int = 16, min_count: int = 16, max_prompts: int = 100_000):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.max_prompts = max_prompts
        self.stats: OrderedDict[str, deque] = OrderedDict()

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages for one global batch  [N] (float64)."""
        r = rewards.double().numpy()
        prompts = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(r)
        batch_mean, batch_std = r.mean(), r.std() + 1e-6
        for prompt in dict.fromkeys(prompts.tolist()):  # first-seen order
            mask = prompts == prompt
            buffer = self.stats.pop(prompt, None) or deque(maxlen=self.buffer_size)
            buffer.extend(r[mask].tolist())
            self.stats[prompt] = buffer  # most recently seen last
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.asarray(buffer)
                mean, std = values.mean(), values.std() + 1e-6
            advantages[mask] = (r[mask] - mean) / std
        while len(self.stats) > self.max_prompts:
            self.stats.popitem(last=False)
        return torch.from_numpy(advantages)

    def state_dict(self) -> dict:
        return {"stats": [(k, list(v)) for k, v in self.stats.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.stats = OrderedDict((k, deque(v, maxlen=self.buffer_size)) for k, v in state["stats"])
