"""Shared fixtures: a tiny random SD pipeline built once per session, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = Path(os.environ.get("RLFT_CACHE") or tmp_path_factory.mktemp("rlft_cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny_path(cache_dir) -> Path:
    from rlft.models import build_atomically, build_tiny_random

    path = cache_dir / "tiny_random_v1"
    if not path.exists():
        build_atomically(build_tiny_random, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_path):
    from rlft.models import DiffusionPolicy

    torch.manual_seed(0)
    return DiffusionPolicy.from_pretrained(str(tiny_path), finetune="full")


def run_cli(
    args: list[str], cache_dir: Path, timeout: int = 600, launcher: list[str] | None = None, env: dict | None = None
):
    """Run `python -m rlft <args>` in a subprocess (offline, no progress bars; ``env`` adds variables)."""
    full_env = {
        **os.environ,
        "RLFT_CACHE": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONPATH": str(REPO),
        "HYDRA_FULL_ERROR": "0",
        **(env or {}),
    }
    flags = [a for a in args if a.startswith("-") and not a.startswith("~")]  # e.g. -m (multirun) first
    overrides = [a for a in args if a not in flags]
    cmd = (launcher or [sys.executable]) + ["-m", "rlft", *flags, "trainer.progress_bar=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# the smallest real finetuning: tiny_random on JPEG compressibility, 4 prompts x 4 images, 10 DDIM steps
FAST = [
    "algorithm=ddpo",
    "model=tiny_random",
    "reward=jpeg_compressibility",
    "dataset=simple_animals",
    "~dataset@eval_datasets.unseen",  # evaluate on the training prompts only
    "sampler.num_steps=10",
    "trainer.prompts_per_epoch=4",
    "trainer.images_per_prompt=4",
    "trainer.train_batch_size=4",
    "trainer.gradient_accumulation_steps=1",
    "trainer.log_images=4",
    "model.finetune=full",
]
