"""JPEG (in)compressibility (Black et al. 2023, DDPO).

jpeg_incompressibility(x) = size of JPEG(x, quality=95) in kB (bytes / 1000)
jpeg_compressibility(x)   = - jpeg_incompressibility(x)
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from rlft.rewards.base import Reward, RewardOutput, to_uint8


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size in kB of each image in [0, 1]  [B, 3, H, W] -> [B]."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibility(Reward):
    name = "jpeg_incompressibility"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(jpeg_size_kb(images, self.quality))


class JpegCompressibility(Reward):
    name = "jpeg_compressibility"

    def __init__(self, quality: int = 95):
        self.quality = quality

    def score(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(-jpeg_size_kb(images, self.quality))
