"""The reward interface: images in [0, 1] and prompts in, scores (and per-pixel maps) out (README "Rewards")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlft.config import build
from rlft.errors import ConfigError, moved_hint


@dataclass
class RewardOutput:
    scores: Tensor  # one scalar per image                       [B] float32, CPU
    maps: Tensor | None = None  # per-pixel reward, sums to the score  [B, H, W] float32, CPU
    components: dict[str, Tensor] = field(default_factory=dict)  # named parts of a composite  [B] each
    # sub-scores that say what an image gets right (metrics only, never trained on), in [0, 1],
    # NaN where an image's prompt does not name that attribute  [B] each
    parts: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(outputs: Sequence[RewardOutput]) -> RewardOutput:
        maps = [o.maps for o in outputs]
        return RewardOutput(
            scores=torch.cat([o.scores for o in outputs]),
            maps=torch.cat(maps) if all(m is not None for m in maps) else None,
            components={k: torch.cat([o.components[k] for o in outputs]) for k in outputs[0].components},
            parts={k: torch.cat([o.parts[k] for o in outputs]) for k in outputs[0].parts},
        )


class Reward:
    """Base class. Subclasses implement :meth:`score`; ``name`` prefixes the logged components."""

    name: str = "reward"
    gives_maps: bool = False  # True when score() returns per-pixel maps
    world: str | None = None  # "natural" or "toy": the images it judges (rlft/presets.py); None: any

    def score(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardOutput:
        raise NotImplementedError

    def check_prompts(self, prompts: Sequence[str], key: str = "dataset") -> None:
        """Raise a ConfigError naming ``key`` when this reward cannot judge such prompts (checked at start-up)."""

    def check_metadata(self, metadata: Sequence[Mapping[str, Any]], key: str = "dataset") -> None:
        """Raise a ConfigError naming ``key`` when the prompts' metadata lacks what this reward reads."""

    def to(self, device) -> Reward:
        """Move model weights (if any) to ``device``; rewards never pick a device themselves."""
        return self

    gives_features: bool = False  # True when image_features() returns CLIP image embeddings

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        """[B, D] image embeddings of images [B, 3, H, W] in [0, 1] (a CLIP-based reward's image encoder),
        for the evaluation's feature drift and diversity (rlft/evaluation.py)."""
        raise NotImplementedError(f"{type(self).__name__} has no image encoder")

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> RewardOutput:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"rewards take images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        out = self.score(images, prompts, metadata)
        out.scores = out.scores.detach().float().cpu()
        if out.maps is not None:
            out.maps = out.maps.detach().float().cpu()
        if not out.components:
            out.components = {self.name: out.scores}
        out.parts = {k: v.detach().float().cpu() for k, v in out.parts.items()}
        return out


class WeightedSum(Reward):
    """r = sum_k w_k r_k; every component r_k is logged under its own name."""

    name = "weighted_sum"

    def __init__(self, rewards: Mapping[str, Any], weights: Mapping[str, float]):
        missing = set(rewards) ^ set(weights)
        if missing:
            raise ConfigError(
                "reward.weights", f"weights and components differ on {sorted(missing)}", "give one weight per reward"
            )
        # components given as configs (``_recursive_: false``) are built here, so that their errors
        # name their own keys (reward.rewards.<name>.path)
        self.rewards = {
            name: r if isinstance(r, Reward) else build(r, f"reward.rewards.{name}", home="reward")
            for name, r in rewards.items()
        }
        self.weights = dict(weights)
        self.gives_maps = all(r.gives_maps for r in self.rewards.values())
        self.gives_features = any(r.gives_features for r in self.rewards.values())

    def check_prompts(self, prompts: Sequence[str], key: str = "dataset") -> None:
        for r in self.rewards.values():
            r.check_prompts(prompts, key)

    def check_metadata(self, metadata: Sequence[Mapping[str, Any]], key: str = "dataset") -> None:
        for r in self.rewards.values():
            r.check_metadata(metadata, key)

    def to(self, device) -> WeightedSum:
        for r in self.rewards.values():
            r.to(device)
        return self

    def image_features(self, images: Tensor) -> Tensor:
        """The first component's image encoder that has one."""
        return next(r for r in self.rewards.values() if r.gives_features).image_features(images)

    def score(self, images, prompts, metadata) -> RewardOutput:
        total, total_map, components, parts = 0.0, 0.0, {}, {}
        for key, reward in self.rewards.items():
            out = reward(images, prompts, metadata)
            w = self.weights[key]
            total = total + w * out.scores
            if self.gives_maps:
                total_map = total_map + w * out.maps
            components[key] = out.scores
            parts.update({f"{key}/{name}": values for name, values in out.parts.items()})
        return RewardOutput(total, total_map if self.gives_maps else None, components, parts)


def score_in_batches(score_batch, images: Tensor, prompts: Sequence[str], batch_size: int) -> RewardOutput:
    """``score_batch(images, prompts) -> [b]`` over chunks of ``batch_size`` images, concatenated."""
    chunks = [
        score_batch(images[i : i + batch_size], list(prompts[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return RewardOutput(torch.cat(chunks).float().cpu())


def to_uint8(images: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 as (x * 255).round().clamp(0, 255): the 8-bit image a PIL-based scorer sees."""
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


OFFLINE_HINT = (
    "set {key} to a local directory (save_pretrained layout), or fill the Hugging Face cache and set HF_HUB_OFFLINE=1"
)


def load_weights(file: Path, key: str, what: str) -> dict:
    """A torch weights file (tensors only: ``weights_only=True`` refuses pickled objects), with one
    clear error naming the file and ``key`` for a file that is not one."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, a truncated download, pickled objects
        if "Unsupported global" in str(exc):
            reason = "it holds pickled Python objects besides tensors, which are never loaded (they could run code)"
        else:
            reason = f"it is not a torch weights file, or it is damaged ({type(exc).__name__})"
        raise ConfigError(key, f"cannot read '{file}' as {what}: {reason}") from None
    if not isinstance(state, dict):
        raise ConfigError(key, f"'{file}' holds a {type(state).__name__}, not {what}")
    return state


def fit_state_dict(module, state: dict, file: Path, key: str, what: str) -> None:
    """``module.load_state_dict(state)``, failing with one line naming the file, and what is missing,
    unexpected or of another shape, when it does not fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} (needs {list(own[k].shape)})"
        for k in own
        if k in state and getattr(state[k], "shape", None) != own[k].shape
    ]
    parts = [
        f"{len(names)} {label} (first: {names[0]})"
        for names, label in ((missing, "weights missing"), (unexpected, "unexpected"), (shapes, "of another shape"))
        if names
    ]
    if parts:
        raise ConfigError(key, f"'{file}' does not fit {what}: {'; '.join(parts)}")
    module.load_state_dict(state)


def load_pretrained(loader, path: str, key: str, **kwargs):
    """``loader.from_pretrained(path)`` with one clear error for a missing directory, file or hub repo."""
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) and not local.exists():
        raise ConfigError(key, f"'{path}' does not exist", OFFLINE_HINT.format(key=key))
    try:
        return loader.from_pretrained(str(local) if local.exists() else path, **kwargs)
    except OSError as exc:
        detail = str(exc).splitlines()[0]
        hint = OFFLINE_HINT.format(key=key) + moved_hint(path, key)
        raise ConfigError(key, f"cannot load '{path}': {detail}", hint) from None
