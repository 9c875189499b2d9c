"""A segmentation model's mask for one class as a per-pixel reward (PXPO's segmentation feedback).

For an image x, a semantic-segmentation model (transformers ``AutoModelForSemanticSegmentation``,
e.g. SegFormer on ADE20k) gives class logits at its own resolution; upsampled bilinearly to the
image (H, W),

    r^{ij}(x) = softmax_k(logits^{ij})[target] / (H W),     r(x) = sum_{ij} r^{ij}  in [0, 1]:

the expected share of the image covered by the target class. Inputs follow the model's image
processor (resize to its size, normalise by its mean and std); the weights load from a hub id or a
local directory in the save_pretrained layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlft.errors import ConfigError
from rlft.rewards.base import Reward, RewardOutput, load_pretrained


class Segmentation(Reward):
    """Per-pixel probability of ``target_class`` (a label name of the model, or its index)."""

    world = "natural"  # rlft/presets.py: the images it judges
    name = "segmentation"
    gives_maps = True

    def __init__(self, path: str, target_class: str | int, dtype: str = "float32"):
        from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

        self.model = load_pretrained(AutoModelForSemanticSegmentation, path, "reward.path")
        processor = load_pretrained(AutoImageProcessor, path, "reward.path", backend="pil")
        self.model.eval().requires_grad_(False).to(getattr(torch, dtype))
        labels = {str(v): int(k) for k, v in self.model.config.id2label.items()}
        if isinstance(target_class, str) and not target_class.isdigit():
            if target_class not in labels:
                shown = ", ".join(list(labels)[:20]) + (" ..." if len(labels) > 20 else "")
                raise ConfigError("reward.target_class", f"'{target_class}' is not a label of the model", shown)
            target_class = labels[target_class]
        self.target = int(target_class)
        if not 0 <= self.target < self.model.config.num_labels:
            raise ConfigError("reward.target_class", f"{self.target} is not in [0, {self.model.config.num_labels})")
        size = processor.size
        self.size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    def to(self, device) -> Segmentation:
        self.model.to(device)
        return self

    def score(self, images, prompts, metadata) -> RewardOutput:
        H, W = images.shape[-2:]
        dtype = next(self.model.parameters()).dtype
        x = F.interpolate(images.float(), size=self.size, mode="bilinear", align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        logits = self.model(pixel_values=x.to(dtype)).logits.float()  # [B, K, h', w']
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        maps = logits.softmax(dim=1)[:, self.target] / (H * W)
        return RewardOutput(maps.sum(dim=(1, 2)), maps)
