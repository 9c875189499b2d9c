"""Per-pixel human feedback maps (PXPO's single-image experiment; RichHF-18K's map format).

A person paints over a generated image: white = good, black = bad, grey = neutral,
saved as a greyscale image (0-255) of any size. The map for pixel (i, j) is

    m^{ij} = (v^{ij} - 127.5) / 127.5  in [-1, 1],   resized to the image (bilinear),
    r^{ij} = m^{ij} / (H W),          r = sum_{ij} r^{ij}  (the mean feedback),

and the map is keyed to the sample it judges through the prompt's metadata: a .jsonl prompt file
(`dataset=file`) with rows {"prompt": ..., "feedback_map": "maps/0.png"}. With one prompt,
`trainer.images_per_prompt=1` and `trainer.fixed_sample_noise=true`, every epoch redraws the very
image that was judged (experiments/pxpo_feedback.yaml).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rlft.errors import ConfigError
from rlft.rewards.base import Reward, RewardOutput


def map_values(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A painted 0-255 map as the reward reads it: greyscale, resized to ``size`` (H, W) bilinearly,
    m = (v - 127.5) / 127.5 in [-1, 1]  [H, W]."""
    grey = image.convert("L").resize((size[1], size[0]), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(grey, dtype=np.float32)) - 127.5) / 127.5


def read_feedback_map(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """The painted map at ``path``, at ``size`` (H, W), in [-1, 1]  [H, W]."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return map_values(img, size)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConfigError(
            "reward.root", f"feedback map '{path}' is not a readable image ({type(e).__name__})", "save it as a PNG"
        ) from None


class FeedbackMap(Reward):
    """Reads each sample's painted map from the file its prompt's metadata names."""

    name = "feedback_map"
    gives_maps = True

    def __init__(self, key: str = "feedback_map", root: str | None = None):
        self.key = key
        self.root = Path(root).expanduser() if root else None

    def _path(self, meta: Mapping[str, Any], where: str) -> Path:
        if self.key not in meta:
            raise ConfigError(
                where,
                f"a prompt has no '{self.key}' field naming its feedback map",
                f'use a .jsonl prompt file (dataset=file) with rows {{"prompt": ..., "{self.key}": "map.png"}}',
            )
        path = Path(str(meta[self.key])).expanduser()
        if self.root is not None and not path.is_absolute():
            path = self.root / path
        if not path.is_file():
            raise ConfigError(where, f"feedback map '{path}' does not exist", "set reward.root to the maps' folder")
        return path

    def check_metadata(self, metadata: Sequence[Mapping[str, Any]], key: str = "dataset") -> None:
        for meta in metadata:
            read_feedback_map(self._path(meta, key), (8, 8))  # exists and is an image (start-up, not mid-run)

    def score(self, images, prompts, metadata) -> RewardOutput:
        H, W = images.shape[-2:]
        maps = torch.stack([read_feedback_map(self._path(m, "dataset"), (H, W)) for m in metadata]) / (H * W)
        return RewardOutput(maps.sum(dim=(1, 2)), maps)
