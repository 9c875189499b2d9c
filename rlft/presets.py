"""Which world a run is in: the model follows the reward.

rlft has two worlds. The toy world (model=toy, its 32x32 scenes and the toy rewards) is the default:
`python -m rlft` and `make demo` run it offline. A natural-image reward (HPSv2, PickScore,
Aesthetic, CLIPScore, segmentation, the multi-reward) means Stable Diffusion and the papers'
settings, so a command line that names one and no model or experiment,

    python -m rlft algorithm=prdp reward=hpsv2

runs the paper preset for that algorithm and reward, ``experiment=<algorithm>_small_<reward>`` or
``experiment=<algorithm>_<reward>`` where one exists (here prdp_small_hpsv2: PRDP's small-scale
setting on SD v1.4, Deng et al. 2024 Table 4), else SD v1.4 with the 45 animal prompts of
DDPO and PRDP (``model=sd14 dataset=animals45``). One line says which. A model or experiment on
the command line is used as given, and a reward of one world on the other's model is refused at
start-up with the fix (``check_world``). Rewards that judge any image (JPEG compressibility,
colour targets, feedback maps) run on either.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig

from rlft.errors import ConfigError

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
NATURAL_FALLBACK = ["model=sd14", "dataset=animals45", "dataset@eval_datasets.unseen=imagenet_animals"]


def _choices(overrides: list[str]) -> dict[str, str]:
    """Group choices given as plain ``group=option`` on the command line."""
    out = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and not key.startswith(("+", "~")):
            out[key] = value
    return out


def reward_world(target: str) -> str | None:
    """'natural', 'toy', or None (any image) for a reward class's dotted path."""
    if not target or "." not in target or target == "???":  # reward=custom: not set yet
        return None
    try:
        return getattr(get_class(target), "world", None)
    except Exception:  # noqa: BLE001 - an unknown target is reported by the validation that follows
        return None


def follow_the_reward(overrides: list[str]) -> tuple[list[str], str | None]:
    """``overrides`` with the paper setting a natural-image reward implies (module docstring), and the
    line that says so (None when nothing was added)."""
    choices = _choices(overrides)
    reward = choices.get("reward")
    if reward is None or "," in reward or "model" in choices or "experiment" in choices:
        return overrides, None
    node = EXPERIMENTS.parent / "reward" / f"{reward}.yaml"
    if not node.is_file() or not _natural_option(node):
        return overrides, None
    algorithm = choices.get("algorithm", "prdp")
    for name in (f"{algorithm}_small_{reward}", f"{algorithm}_{reward}"):
        if (EXPERIMENTS / f"{name}.yaml").is_file():
            note = f"reward={reward} scores natural images: running experiment={name} (set model=... to choose)"
            return [*overrides, f"experiment={name}"], note
    added = NATURAL_FALLBACK[:1] if "dataset" in choices else NATURAL_FALLBACK
    note = f"reward={reward} scores natural images: running {' '.join(added)} (set model=... to choose)"
    return [*overrides, *added], note


def _natural_option(path: Path) -> bool:
    """Whether a reward option file builds a natural-image reward (any component, for a weighted sum)."""
    import yaml

    node = yaml.safe_load(path.read_text()) or {}
    if reward_world(str(node.get("_target_", ""))) == "natural":
        return True
    # options it extends (hpsv2_1: hpsv2) and the components of a weighted sum (pickscore@rewards.pickscore)
    bases = [d.split("@")[0] for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return any(_natural_option(path.parent / f"{base}.yaml") for base in bases)


def _config_world(node) -> str | None:
    world = reward_world(str(node.get("_target_", "")))
    if world is None and isinstance(node.get("rewards"), DictConfig):
        worlds = {_config_world(sub) for sub in node.rewards.values()} - {None}
        world = "natural" if "natural" in worlds else next(iter(worlds), None)
    return world


TOY_LATENT_SIZE = 16  # UNets on at most 16x16 latents are toy models (the toy world's: 8x8; SD's: 64x64)


def model_world(model: DictConfig) -> str | None:
    """'toy' for the toy model and models finetuned from it (their latents are small), 'natural' for
    Stable Diffusion (a hub id, or a directory of a large UNet), None where it cannot be told yet
    (a model a builder makes, a directory that does not exist: the loader reports it)."""
    import json

    path = str(model.get("path") or "")
    if model.get("builder") or not path:
        return None
    local = Path(path).expanduser()
    if not local.exists():
        return None if path.startswith((".", "/", "~")) else "natural"
    try:
        size = json.loads((local / "unet" / "config.json").read_text())["sample_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    size = size if isinstance(size, int) else min(size)
    return "toy" if size <= TOY_LATENT_SIZE else "natural"


def check_world(cfg: DictConfig) -> None:
    """Refuse a reward (the training reward or a held-out one) of one world on the other's model, with the fix."""
    model = model_world(cfg.model)
    held_out = cfg.get("eval_rewards") or {}
    for key, node in [("reward", cfg.reward), *((f"eval_rewards.{h}", n) for h, n in held_out.items())]:
        reward = _config_world(node)
        if reward is None or model is None or reward == model:
            continue
        name = str(node._target_).rsplit(".", 1)[-1]
        if key != "reward":
            raise ConfigError(
                key,
                f"the held-out reward {name} judges {'natural images' if reward == 'natural' else 'toy scenes'}, "
                f"not this model's images",
                f"drop it: ~{key}",
            )
        if reward == "natural":
            raise ConfigError(
                "model",
                f"{name} scores natural images, but the toy model draws 32x32 shapes",
                "drop model=toy to run the paper setting on Stable Diffusion, "
                "or use a toy reward (reward=toy_alignment)",
            )
        raise ConfigError(
            "reward",
            f"{name} judges the toy world's scenes, but model.path '{cfg.model.path}' is not the toy model",
            "use model=toy, or a natural-image reward (reward=hpsv2, pickscore, aesthetic, ...)",
        )
