"""Human Preference Score v2 and v2.1 (Wu et al. 2023), through open_clip (README "Rewards").

HPS is an open_clip ViT-H-14 CLIP finetuned on HPDv2; the published checkpoint
(HPS_v2_compressed.pt, HPS_v2.1_compressed.pt in the hub repo xswu/HPSv2) holds the whole
CLIP state dict under "state_dict" and is loaded over the architecture. The score is the plain
cosine, with no logit scale:

    hps(x, c) = < E_img(x) / ||E_img(x)||, E_txt(c) / ||E_txt(c)|| >

Reference preprocessing (the HPS evaluation transform): resize the longest side to the model's
image size (224) with bicubic interpolation, zero-pad to a square, then normalise with the OpenAI
CLIP mean and std. Images enter as floats in [0, 1] and are scored as the uint8 PIL images the
reference reads from disk. On CUDA the forward runs under float16 autocast, as the reference's
``precision='amp'`` does.

Not through the ``hpsv2`` PyPI package (its wheel lacks the tokenizer vocabulary, imports tkinter
and pins pytest); open_clip directly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rlft.errors import ConfigError
from rlft.rewards.base import Reward, RewardOutput, fit_state_dict, load_weights, score_in_batches
from rlft.rewards.clip import to_pil

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


def fetch_hub_file(repo: str, filename: str, key: str, repo_type: str = "model") -> Path:
    """``hf_hub_download`` (the cache first; with HF_HUB_OFFLINE=1 the cache only), failing with one
    message that names the file and the config key to set instead."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, repo_type=repo_type))
    except Exception as exc:  # offline, not cached, no such repo or file, no network
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            key,
            f"cannot fetch '{filename}' from the hub repo '{repo}' ({detail})",
            f"download it and set {key}=/path/to/{Path(filename).name}, or fill the Hugging Face cache "
            "and set HF_HUB_OFFLINE=1",
        ) from None


def open_clip_architecture(arch: str) -> str:
    """An open_clip model name, or a model-config JSON file (registered under its file stem)."""
    import open_clip

    if arch.endswith(".json"):
        file = Path(arch).expanduser()
        if not file.is_file():
            raise ConfigError("reward.arch", f"open_clip model config '{arch}' does not exist")
        open_clip.add_model_config(file)
        return file.stem
    if arch not in open_clip.list_models():
        raise ConfigError("reward.arch", f"'{arch}' is not an open_clip architecture", "HPS uses ViT-H-14")
    return arch


class HPSv2(Reward):
    """HPSv2 (``version=v2.0``) or HPSv2.1 (``version=v2.1``): cos(image, text) of the HPS CLIP."""

    world = "natural"  # rlft/presets.py: the images it judges
    name = "hpsv2"

    def __init__(
        self,
        version: str = "v2.0",
        path: str | None = None,
        repo: str = HPS_REPO,
        arch: str = "ViT-H-14",
        dtype: str = "float32",
        autocast: bool = True,
        batch_size: int = 32,
    ):
        import open_clip

        if dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError("reward.dtype", f"'{dtype}' is not one of float32, float16, bfloat16")
        if version not in HPS_FILES:
            raise ConfigError("reward.version", f"unknown HPS version '{version}'", f"choose {' or '.join(HPS_FILES)}")
        self.name = "hpsv2" if version == "v2.0" else "hpsv2_1"
        if path is None:
            file = fetch_hub_file(repo, HPS_FILES[version], "reward.path")
        else:
            file = Path(path).expanduser()
            if not file.is_file():
                raise ConfigError(
                    "reward.path",
                    f"HPS checkpoint '{path}' does not exist",
                    f"download {HPS_FILES[version]} from the hub repo {repo} and set reward.path to it",
                )
        # the file first (fast), the architecture after: a bad checkpoint is reported before ViT-H-14 is built
        state = load_weights(file, "reward.path", "an HPS checkpoint")
        state = state.get("state_dict", state)
        model_name = open_clip_architecture(arch)
        # the HPS checkpoint holds every CLIP weight: no pretrained tower is fetched, nothing else is read
        self.model = open_clip.create_model(model_name, pretrained=None, pretrained_text=False, output_dict=True)
        fit_state_dict(self.model, state, file, "reward.path", f"open_clip {arch}")
        self.model.eval().requires_grad_(False).to(getattr(torch, dtype))
        # the reference evaluation transform: longest side to the model's size, bicubic, zero padding
        size = self.model.visual.image_size
        self.preprocess = open_clip.image_transform(size, is_train=False, resize_mode="longest", fill_color=0)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.dtype = getattr(torch, dtype)
        self.autocast = autocast
        self.batch_size = batch_size
        self.device = torch.device("cpu")

    def to(self, device) -> HPSv2:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def score(self, images, prompts, metadata) -> RewardOutput:
        return score_in_batches(self.score_batch, images, prompts, self.batch_size)

    gives_features = True

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in to_pil(images[i : i + self.batch_size])])
            out.append(self.model.encode_image(pixels.to(self.device, self.dtype)).float().cpu())
        return torch.cat(out)

    def score_batch(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in to_pil(images)]).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        amp = self.autocast and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
            out = self.model(pixels, tokens)  # features come L2-normalised
        image_features, text_features = out["image_features"].float(), out["text_features"].float()
        return (image_features * text_features).sum(-1)
