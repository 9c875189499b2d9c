"""The before/after grid shows the evaluation images as they are (rlft/evaluation.py)."""

from __future__ import annotations

import numpy as np
import torch

from rlft.evaluation import EvalResult, before_after_grid


def test_before_after_grid_keeps_the_showcase_pixels():
    g = torch.Generator().manual_seed(0)
    showcase = [torch.randint(0, 256, (2, 3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2)]
    first, last = (
        EvalResult(epoch=e, prompts=["a", "b"], scores=torch.tensor([0.1, 0.2]), showcase=s, showcase_index=[0, 1])
        for e, s in zip((0, 24), showcase, strict=True)
    )
    grid = np.asarray(before_after_grid({"seen": (first, last)}))
    cell, text = 128, 28  # rlft.loggers.captioned_grid's layout, images upscaled by nearest neighbour
    for row, images in enumerate(showcase):
        for col, image in enumerate(images):
            y, x = row * (cell + text), col * cell
            shown = grid[y : y + cell : cell // 8, x : x + cell : cell // 8]  # one pixel per source pixel
            assert np.array_equal(shown, image.permute(1, 2, 0).numpy()), (row, col)
