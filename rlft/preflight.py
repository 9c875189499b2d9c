"""Pre-flight: every file a run needs, found before any weights load, and all missing ones in one line.

Before the runner builds anything, ``preflight(cfg)`` lists what the config names, each with the
key that sets it: the model (``model.path``), every reward component's weights (HPS checkpoint,
PickScore and CLIP models and processors, the aesthetic MLP, a segmentation model) and every
prompt set read from the hub (``dataset.path``, ``eval_datasets.<name>.path``). Each is looked
up, without downloading, as a local path or in the Hugging Face cache. Where the hub cannot be
reached (``HF_HUB_OFFLINE=1``, or no answer from it within a few seconds), whatever is in neither
place is missing, and the run stops with one line that names every missing item and its key.
With no network and everything cached, the run goes on offline (``HF_HUB_OFFLINE=1`` is set for
it), so the hub client's retries and warnings never reach the console.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig

from rlft.errors import RlftError, moved_hint

HUB_HOST = ("huggingface.co", 443)


@dataclass(frozen=True)
class Need:
    key: str  # the config key that sets it
    source: str  # a local path or a hub repo id
    what: str  # for the message
    repo_type: str = "model"
    file: str | None = None  # the one file of the hub repo that is needed (else: a snapshot of it)
    marker: str | None = None  # a file the snapshot must hold
    patterns: tuple[str, ...] = ()  # dataset repos: the files that hold the prompts
    repo_key: str | None = None  # the key naming the hub repo, where it is not ``key``

    @property
    def local(self) -> bool:
        return self.source.startswith((".", "/", "~")) or Path(self.source).expanduser().exists()


def _class(node) -> type | None:
    try:
        return get_class(str(node.get("_target_", "")))
    except Exception:  # noqa: BLE001 - an unknown target is the validation's to report
        return None


def reward_needs(node: DictConfig, key: str = "reward") -> list[Need]:
    from rlft.rewards.base import WeightedSum
    from rlft.rewards.clip import Aesthetic, ClipScore, PickScore
    from rlft.rewards.hps import HPS_FILES, HPS_REPO, HPSv2
    from rlft.rewards.segmentation import Segmentation

    cls = _class(node)
    if cls is None:
        return []
    if issubclass(cls, WeightedSum):
        return [n for name, sub in node.rewards.items() for n in reward_needs(sub, f"{key}.rewards.{name}")]
    if issubclass(cls, HPSv2):
        if node.get("path"):
            return [Need(f"{key}.path", str(node.path), "HPS checkpoint")]
        file = HPS_FILES.get(node.get("version", "v2.0"), HPS_FILES["v2.0"])
        repo = str(node.get("repo", HPS_REPO))
        return [Need(f"{key}.path", repo, "HPS checkpoint", file=file, repo_key=f"{key}.repo")]
    if issubclass(cls, PickScore):
        return [
            Need(f"{key}.path", str(node.path), "PickScore model"),
            Need(f"{key}.processor_path", str(node.processor_path), "CLIP processor and tokenizer"),
        ]
    if issubclass(cls, Aesthetic):
        return [
            Need(f"{key}.mlp_path", str(node.mlp_path), "aesthetic predictor weights"),
            Need(f"{key}.clip_path", str(node.clip_path), "CLIP ViT-L/14"),
        ]
    if issubclass(cls, (ClipScore, Segmentation)):
        return [Need(f"{key}.path", str(node.path), f"{cls.__name__} model")]
    return []


def dataset_needs(node: DictConfig, key: str) -> list[Need]:
    from rlft.data.hub import HubPrompts

    cls = _class(node)
    if cls is None or not issubclass(cls, HubPrompts):
        return []
    if node.get("path"):
        return [Need(f"{key}.path", str(node.path), "prompt files")]
    files = tuple(node.files)
    return [Need(f"{key}.path", str(node.repo), "prompt files", "dataset", patterns=files, repo_key=f"{key}.repo")]


def needs(cfg: DictConfig) -> list[Need]:
    """Every file of the run, with its key (module docstring)."""
    out = []
    if not cfg.model.get("builder"):
        out.append(Need("model.path", str(cfg.model.path), "diffusion pipeline", marker="model_index.json"))
    out += reward_needs(cfg.reward)
    out += dataset_needs(cfg.dataset, "dataset")
    if cfg.trainer.eval_every > 0:
        for name, node in cfg.eval_datasets.items():
            if node != cfg.dataset:
                out += dataset_needs(node, f"eval_datasets.{name}")
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def cached(need: Need) -> bool:
    """Whether the Hugging Face cache holds ``need`` (no network)."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    if need.file:
        return isinstance(try_to_load_from_cache(need.source, need.file, repo_type=need.repo_type), str)
    try:
        root = Path(snapshot_download(need.source, repo_type=need.repo_type, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a repo id at all)
        return False
    if need.marker and not (root / need.marker).is_file():
        return False
    return all(any(root.glob(p)) for p in need.patterns)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


# files rlft writes itself, and the command that writes them
MADE_HERE = {
    "rlft/toy/weights": "make toy-weights",
    "rlft/toy/flow_weights": "python -m rlft.toy.pretrain_flow, or make toy-weights",
}


def missing(items: list[Need], online: bool) -> list[tuple[str, bool]]:
    """(phrase '<key>: <what> '<source>' <why>', whether it is a hub item) of each missing item."""
    out = []
    for need in items:
        if need.local:
            if not Path(need.source).expanduser().exists():
                made = next((f" (write it with {c})" for p, c in MADE_HERE.items() if need.source.endswith(p)), "")
                out.append((f"{need.key}: {need.what} '{need.source}' does not exist{made}", False))
        elif not online and not cached(need):
            hint = moved_hint(need.source, need.repo_key or need.key)
            out.append((f"{need.key}: {need.what} '{need.source}' is not in the Hugging Face cache{hint}", True))
    return out


def go_offline() -> None:
    """HF_HUB_OFFLINE=1 for the rest of the run, also where huggingface_hub has already read it."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True


def preflight(cfg: DictConfig) -> str | None:
    """Raise RlftError naming every missing item; returns a note when the run goes on offline."""
    items = needs(cfg)
    by_choice = _offline()
    from_hub = any(not n.local for n in items)
    online = not by_choice and from_hub and hub_reachable()
    absent = missing(items, online)
    if absent:
        hub = any(is_hub for _, is_hub in absent)
        why = (" (HF_HUB_OFFLINE=1)" if by_choice else " (the hub cannot be reached)") if hub else ""
        fix = "Set each key to a local copy" + (
            ", or fill the Hugging Face cache (HF_HOME) where the hub can be reached" if hub else ""
        )
        raise RlftError(
            f"{len(absent)} of the files this run needs are missing{why}: "
            + "; ".join(phrase for phrase, _ in absent)
            + f". {fix}"
        )
    if from_hub and not online and not by_choice:
        go_offline()
        return "the hub cannot be reached: running offline from the Hugging Face cache (HF_HUB_OFFLINE=1)"
    return None
