"""A fixed-seed result is a property of the config, not of the speed knobs.

Each sample's noise comes from its own generator keyed by (seed, epoch, sample index) (rlft/seeding.py),
so `sampler.batch_size`, `trainer.train_batch_size` and the number of processes may change results only
by float rounding: the kernels differ with the batch shape and the thread count. Here three runs whose
one optimizer step sees the same 8 samples:

    one process,  sampler.batch_size=8, train_batch_size=8, gradient_accumulation_steps=1
    one process,  sampler.batch_size=4, train_batch_size=4, gradient_accumulation_steps=2
    two processes (one thread each), sampler.batch_size=4, train_batch_size=4, accumulation 1

draw the same evaluation images and the same training samples (compared through color_target, a
continuous function of the image), and end with the same weights up to rounding. A run with another
seed shows how far apart the numbers are when the samples do differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import FAST, free_port, read_metrics, run_cli
from tests.helpers import eval_table

COMMON = [
    "algorithm=ddpo",
    "model=tiny_random",
    "model.finetune=full",
    "reward=color_target",
    "dataset=simple_animals",
    "~dataset@eval_datasets.unseen",
    "sampler.num_steps=4",
    "trainer.epochs=1",
    "trainer.prompts_per_epoch=4",  # 4 prompts x 2 images = 8 samples, one optimizer step
    "trainer.images_per_prompt=2",
    "trainer.eval_every=1",
    "trainer.eval_num_prompts=4",  # x 2 images: evaluations before and after the step
    "trainer.log_images=0",
    # weights are compared after one plain SGD step (see WEIGHT_TOL)
    "optimizer._target_=torch.optim.SGD",
    "~optimizer.betas",
    "~optimizer.eps",
    "optimizer.lr=0.1",
]
# Measured on a 2-core AMD EPYC (torch 2.14.1), the largest difference from the one-batch run:
# training rewards 0 (stored to 6 decimals), evaluation rewards 6.0e-8, weights 1.8e-8 (half batches)
# and 1.2e-7 (two processes: the float32 rounding of the weights themselves); another seed: rewards
# 2.3e-2, weights 1.1e-2. The weights are compared after plain SGD: AdamW's first step,
# lr * g / (|g| + eps), turns the rounding of gradients that cancel to ~0 into moves of up to a few
# percent of lr (measured: 96 of 793k weights moved by more than 1e-6, at most 8.8e-5 = 0.03 lr),
# a property of Adam, not of the batching.
REWARD_TOL = 1e-5
WEIGHT_TOL = 1e-6

LAUNCH_2 = ["launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]


def _train_rewards(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "histograms.jsonl").read_text().splitlines()]
    return rows[0]["values"]  # epoch 1, every process's samples in epoch order


def _eval_rewards(run: Path, epoch: int) -> list[tuple[str, float]]:
    """(prompt, reward) of every evaluation image, sorted (processes list them in another order)."""
    return sorted(eval_table(run, "seen", epoch))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / "epoch_00001" / "trainable.safetensors")


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_batch_sizes_and_processes_change_nothing_but_rounding(cache_dir, tmp_path):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    half = ["sampler.batch_size=4", "trainer.train_batch_size=4"]
    runs = {
        "one_batch": ([], None),
        "half_batches": ([*half, "trainer.gradient_accumulation_steps=2"], None),
        "two_processes": (half, [accelerate, *LAUNCH_2, "--main_process_port", str(free_port())]),
        "other_seed": (["seed=1"], None),
    }
    base = [f"paths.output_root={tmp_path}", *COMMON, "sampler.batch_size=8", "trainer.train_batch_size=8"]
    for name, (extra, launcher) in runs.items():
        env = {"OMP_NUM_THREADS": "1"} if launcher else None
        result = run_cli([*base, f"run_name={name}", *extra], cache_dir, launcher=launcher, env=env)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        processes = 2 if launcher else 1
        assert f"({8 // processes} per process x {processes} processes)" in result.stdout, name

    first = tmp_path / "one_batch"
    for name in ("half_batches", "two_processes"):
        other = tmp_path / name
        for a, b in zip(_train_rewards(first), _train_rewards(other), strict=True):
            assert abs(a - b) <= REWARD_TOL, (name, a, b)
        for epoch in (0, 1):
            for (pa, ra), (pb, rb) in zip(_eval_rewards(first, epoch), _eval_rewards(other, epoch), strict=True):
                assert pa == pb and abs(ra - rb) <= REWARD_TOL, (name, epoch, pa, ra, rb)
        assert _max_difference(_weights(first), _weights(other)) <= WEIGHT_TOL, name
        assert read_metrics(other)[-1]["epoch"] == 1

    # the comparison can fail: another seed draws other samples and ends elsewhere
    seed1 = tmp_path / "other_seed"
    assert max(abs(a - b) for a, b in zip(_train_rewards(first), _train_rewards(seed1))) > 100 * REWARD_TOL
    assert _max_difference(_weights(first), _weights(seed1)) > 100 * WEIGHT_TOL


def test_lora_runs_with_one_seed_train_identical_adapters(cache_dir, tmp_path):
    """The adapter's random initialisation comes from ``seed`` (rlft.seeding INIT): two finetune=lora runs
    with the same seed hold bit-identical adapters after an epoch, and another seed starts elsewhere."""
    common = [f"paths.output_root={tmp_path}", *FAST, "model.finetune=lora", "sampler.num_steps=4"]
    common += ["trainer.epochs=1", "trainer.eval_every=0"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = run_cli([*common, f"run_name={name}", f"seed={seed}"], cache_dir)
        assert result.returncode == 0, result.stderr[-3000:]
    a, b, c = (load_file(tmp_path / n / "checkpoints" / "epoch_00001" / "trainable.safetensors") for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora_a = [k for k in a if "lora_A" in k]
    assert lora_a and not all(torch.equal(a[k], c[k]) for k in lora_a)
