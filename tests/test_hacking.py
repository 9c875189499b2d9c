"""Reward hacking in plain sight: a reward that is easy to hack (tests/hackable.py, mean brightness)
rises while the held-out toy_alignment falls, rlft.report flags the run, and DDPO's KL penalty to the
pretrained policy (algorithm.kl_coef) holds the images near the base model's. Drift and diversity
are checked against a hand computation on the saved evaluation images."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import torch

from rlft.report import report
from tests.conftest import read_metrics, run_cli

# four prompts on dark backgrounds: brightness has room to rise, and washing the background out
# is exactly what toy_alignment's background and colour scores see
DARK = [
    "a small blue circle on a black background",
    "a large purple square on a black background",
    "a green triangle left of a red cross on a black background",
    "a small cyan cross on a gray background",
]


def _args(root, prompts, name, kl):
    return [
        f"paths.output_root={root}",
        f"run_name={name}",
        "reward=custom",
        "reward._target_=tests.hackable.Brightness",
        "+reward@eval_rewards.toy_alignment=toy_alignment",
        "algorithm=ddpo",
        f"algorithm.kl_coef={kl}",
        "algorithm.stat_min_count=8",
        "dataset=file",
        f"dataset.path={prompts}",
        "~dataset@eval_datasets.unseen",  # evaluated on the four prompts, 8 seeds each
        "trainer.prompts_per_epoch=4",
        "trainer.images_per_prompt=8",
        "trainer.gradient_accumulation_steps=4",
        "trainer.eval_images_per_prompt=8",
        "trainer.epochs=8",
        "trainer.eval_every=4",
        "trainer.checkpoint_every=8",
        "optimizer.lr=3e-4",
    ]


def test_a_hacked_reward_is_flagged_and_the_kl_penalty_holds_the_images_near_the_base(cache_dir, tmp_path):
    prompts = tmp_path / "dark.txt"
    prompts.write_text("\n".join(DARK) + "\n")
    root = tmp_path / "runs"
    results = [run_cli(_args(root, prompts, name, kl), cache_dir) for name, kl in (("free", 0.0), ("kl", 0.1))]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    free, kl = (read_metrics(root / n)[-1] for n in ("free", "kl"))
    # measured (seed 0): brightness +0.259 ± 0.065 (4.0 SE) while toy_alignment fell -0.240 ± 0.086
    # (-2.8 SE) and drift reached 0.309; with kl_coef=0.1 brightness +0.006, toy_alignment -0.008,
    # drift 0.047
    assert free["eval/seen/reward/gain"] > 2 * free["eval/seen/reward/gain_se"], free
    assert free["eval/seen/toy_alignment/gain"] < -2 * free["eval/seen/toy_alignment/gain_se"], free
    assert kl["eval/seen/drift/rmse/mean"] < 0.5 * free["eval/seen/drift/rmse/mean"], (kl, free)
    assert kl["eval/seen/toy_alignment/gain"] > free["eval/seen/toy_alignment/gain"] + 0.1
    held = [line for line in results[0].stdout.splitlines() if "held-out rewards on seen" in line]
    assert held and "toy_alignment 0.8" in held[0], results[0].stdout[-2000:]

    assert (root / "free" / "frontier.png").exists() and "hacking frontier" in results[0].stdout
    md, _ = report(root)
    text = md.read_text()
    assert "**Flagged runs**" in text and "`algorithm.kl_coef=0.0` seed 0, seen at epoch 8" in text, text
    assert "`algorithm.kl_coef=0.1` seed" not in text

    # drift and diversity by hand, from the images the run saved
    run = root / "free"
    base = torch.load(run / "eval" / "base.pt", weights_only=True)["seen"]
    latest = torch.load(run / "eval" / "latest.pt", weights_only=True)["seen"]
    assert base["epoch"] == 0 and latest["epoch"] == 8 and base["prompts"] == latest["prompts"]
    a = latest["images"].numpy().astype(np.float64) / 255
    b = base["images"].numpy().astype(np.float64) / 255
    drift = np.sqrt(((a - b) ** 2).reshape(len(a), -1).mean(axis=1))
    # the mean over images of each prompt, then over prompts (every prompt has 8 images: the same number)
    assert math.isclose(free["eval/seen/drift/rmse/mean"], drift.mean(), rel_tol=1e-5)
    per_prompt = []
    for prompt in DARK:
        index = [i for i, p in enumerate(latest["prompts"]) if p == prompt]
        assert len(index) == 8
        pairs = [np.sqrt(((a[i] - a[j]) ** 2).mean()) for i, j in itertools.combinations(index, 2)]
        per_prompt.append(np.mean(pairs))
    assert math.isclose(free["eval/seen/diversity/rmse/mean"], np.mean(per_prompt), rel_tol=1e-5)
    se = np.std(per_prompt, ddof=1) / 2
    assert math.isclose(free["eval/seen/diversity/rmse/se"], se, rel_tol=1e-4)
    # one table row per evaluation image: prompt, training reward, held-out reward, drift, diversity
    with open(run / "tables" / "eval_seen_table_00008.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["prompt", "reward", "toy_alignment", "drift_rmse", "diversity_rmse"]
    assert np.allclose([float(r["drift_rmse"]) for r in rows], drift, atol=1e-6)
