"""CLIP-based rewards: PickScore and the LAION aesthetic predictor (README "Rewards").

PickScore (Kirstain et al. 2023; model yuvalkirstain/PickScore_v1, processor from
laion/CLIP-ViT-H-14-laion2B-s32B-b79K):

    pickscore(x, c) = exp(logit_scale) * cos(E_img(x), E_txt(c))

LAION aesthetic predictor v2 ("sac+logos+ava1-l14-linearMSE", as DDPO uses it): the CLIP
ViT-L/14 image embedding, L2-normalised, through an MLP 768-1024-128-64-16-1 with dropout and
no activations:

    aesthetic(x) = MLP(E_img(x) / ||E_img(x)||)

Images enter as floats in [0, 1] and go to the CLIP image processor as uint8 PIL images
((x * 255).round()), with the processor's PIL backend chosen explicitly so that resizing is the
same on every machine. Weights load from a hub id or a local directory (save_pretrained layout);
without network or local files, start-up fails naming the path and the config key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from rlft.errors import ConfigError
from rlft.rewards.base import (
    Reward,
    RewardOutput,
    fit_state_dict,
    load_pretrained,
    load_weights,
    score_in_batches,
    to_uint8,
)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> uint8 PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()]


class _ClipReward(Reward):
    """Shared: the image processor (PIL backend), dtype, device and batching of the inputs."""

    world = "natural"  # rlft/presets.py

    def __init__(self, processor_path: str, processor_key: str, dtype: str, batch_size: int):
        from transformers import AutoImageProcessor

        self.image_processor = load_pretrained(AutoImageProcessor, processor_path, processor_key, backend="pil")
        self.dtype = getattr(torch, dtype)
        self.batch_size = batch_size
        self.device = torch.device("cpu")

    def to(self, device) -> _ClipReward:
        self.device = torch.device(device)
        for module in self.modules():
            module.to(self.device)
        return self

    def modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    def score(self, images, prompts, metadata) -> RewardOutput:
        return score_in_batches(self.score_batch, images, prompts, self.batch_size)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    gives_features = True

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        batches = [
            self.embed(self.pixel_values(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(batches).float().cpu()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP image embedding of processed pixels."""
        raise NotImplementedError


class PickScore(_ClipReward):
    """PickScore on one of two scales (``scale``):

        logit    exp(logit_scale) * cos(image, text)   (Kirstain et al. 2023; ~21 for SD images)
        cosine   cos(image, text)                      (the 0-1 scale PRDP reports, Table 2: 0.2092 -> 0.2424)

    The scale is a constant factor (exp(logit_scale) = 100 in the published weights), so it changes
    nothing but the reward's size: a PRDP beta or a weighted sum tuned on one scale is ~100x off on
    the other."""

    name = "pickscore"

    def __init__(
        self,
        path: str = "yuvalkirstain/PickScore_v1",
        processor_path: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        scale: str = "logit",
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        from transformers import AutoModel, AutoTokenizer

        if scale not in ("logit", "cosine"):
            raise ConfigError(
                "reward.scale", f"'{scale}' is not one of logit, cosine", "cosine is the 0-1 scale PRDP reports"
            )
        self.scale = scale
        super().__init__(processor_path, "reward.processor_path", dtype, batch_size)
        self.tokenizer = load_pretrained(AutoTokenizer, processor_path, "reward.processor_path")
        self.model = load_pretrained(AutoModel, path, "reward.path").eval().requires_grad_(False).to(self.dtype)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def embed(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def score_batch(self, images, prompts):
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = {k: v.to(self.device) for k, v in text.items()}
        image_embeds = self.embed(self.pixel_values(images)).float()
        text_embeds = self.model.get_text_features(**text).pooler_output.float()
        cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return cosine if self.scale == "cosine" else self.model.logit_scale.float().exp() * cosine


class AestheticMLP(nn.Module):
    """The LAION v2 predictor head; the module layout matches its published state dict (layers.N.*)."""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


class Aesthetic(_ClipReward):
    name = "aesthetic"

    def __init__(
        self,
        mlp_path: str,
        clip_path: str = "openai/clip-vit-large-patch14",
        dtype: str = "float32",
        batch_size: int = 32,
    ):
        from transformers import CLIPVisionModelWithProjection

        file = Path(mlp_path).expanduser()
        if not file.is_file():
            raise ConfigError(
                "reward.mlp_path",
                f"aesthetic predictor weights '{mlp_path}' do not exist",
                "download sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/"
                "improved-aesthetic-predictor and set reward.mlp_path to it",
            )
        # the small predictor first: a bad file is reported before CLIP loads
        state = load_weights(file, "reward.mlp_path", "aesthetic predictor weights")
        if not isinstance(state.get("layers.0.weight"), torch.Tensor) or state["layers.0.weight"].ndim != 2:
            raise ConfigError("reward.mlp_path", f"'{file}' has no 'layers.0.weight' matrix of the aesthetic MLP")
        self.mlp = AestheticMLP(state["layers.0.weight"].shape[1]).eval().requires_grad_(False)
        fit_state_dict(self.mlp, state, file, "reward.mlp_path", "the aesthetic MLP")
        super().__init__(clip_path, "reward.clip_path", dtype, batch_size)
        self.clip = load_pretrained(CLIPVisionModelWithProjection, clip_path, "reward.clip_path")
        self.clip.eval().requires_grad_(False).to(self.dtype)
        self.mlp.to(self.dtype)

    def modules(self) -> list[nn.Module]:
        return [self.clip, self.mlp]

    def embed(self, pixel_values):
        return self.clip(pixel_values=pixel_values).image_embeds

    def score_batch(self, images, prompts):
        embeds = self.embed(self.pixel_values(images))
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.mlp(embeds).squeeze(-1)


class _FeaturesAsTensors(nn.Module):
    """transformers 5 returns output objects from get_{image,text}_features; torchmetrics 1.9 expects the
    embeddings themselves (pooler_output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


class ClipScore(Reward):
    """CLIPScore (Hessel et al. 2021) through torchmetrics: 100 * max(cos(E_img(x), E_txt(c)), 0)."""

    world = "natural"  # rlft/presets.py: the images it judges
    name = "clipscore"

    def __init__(self, path: str = "openai/clip-vit-large-patch14", dtype: str = "float32"):
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        model = load_pretrained(CLIPModel, path, "reward.path").eval().requires_grad_(False).to(getattr(torch, dtype))
        processor = load_pretrained(CLIPProcessor, path, "reward.path", backend="pil")
        self.metric = CLIPScore(model_name_or_path=lambda: (_FeaturesAsTensors(model), processor))
        self.model, self.processor = model, processor

    gives_features = True

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        device, out = next(self.model.parameters()).device, []
        for i in range(0, len(images), batch_size):
            pixels = self.processor(images=to_pil(images[i : i + batch_size]), return_tensors="pt")["pixel_values"]
            out.append(self.model.get_image_features(pixel_values=pixels.to(device, self.model.dtype)).pooler_output)
        return torch.cat(out).float().cpu()

    def to(self, device) -> ClipScore:
        self.metric.to(device)
        return self

    def score(self, images, prompts, metadata) -> RewardOutput:
        # torchmetrics reduces over its batch, so each image is its own update
        scores = []
        for image, prompt in zip(to_uint8(images), prompts):
            scores.append(self.metric(image[None], [prompt]).float())
        self.metric.reset()
        return RewardOutput(torch.stack(scores).cpu())
