"""Fully sharded full finetuning (rlft/sharding.py) through accelerate's FSDP2 config, on two CPU processes.

accelerate applies its FSDP config only on accelerators; tests/site/sitecustomize.py (RLFT_TEST_FSDP_ON_CPU)
lifts that one check, so that the shipped experiments/accelerate/fsdp.yaml shards the tiny SD3 transformer
over gloo exactly as it would over NCCL: each process holds half of every block's weights (DTensors),
gradients are reduce-scattered and AdamW's moments live as shards. The run's checkpoint is gathered into
the files a one-process run writes, and a resume puts each shard back:

- a process with fewer evaluation images than the others makes up the denoiser calls (5 images over 2
  processes in batches of 2; without it the sharded forward would wait forever);
- the sharded run's first step sees the gradient a one-process run sees (AdamW's first moment, 0.1 g,
  equal up to float rounding) and their evaluation images score the same;
- a sharded run stopped after epoch 1 and resumed ends epoch 2 with weights and optimizer state
  bit-identical to an uninterrupted sharded run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from rlft import sharding
from rlft.errors import ConfigError
from tests.conftest import free_port, run_cli
from tests.helpers import eval_table

COMMON = [
    "model=tiny_random_sd3",
    "model.finetune=full",
    "model.gradient_checkpointing=true",  # the transformer blocks' own checkpointing, under sharding
    "algorithm=ddpo",
    "sampler=flow_sde",
    "sampler.num_steps=4",
    "reward=color_target",
    "dataset=simple_animals",
    "~dataset@eval_datasets.unseen",
    "trainer.prompts_per_epoch=4",  # 4 prompts x 2 images = 8 samples, one optimizer step per epoch
    "trainer.images_per_prompt=2",
    "trainer.train_batch_size=4",  # per process
    "trainer.eval_every=1",
    "trainer.eval_num_prompts=5",  # x 1 image: 3 and 2 per process, in 2 and 1 batches of 2 (sharded runs)
    "trainer.eval_images_per_prompt=1",
    "trainer.checkpoint_every=1",
    "trainer.keep_checkpoints=2",
    "trainer.log_images=0",
    "optimizer.lr=1e-3",
]


def _launcher() -> list[str]:
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config = str(Path(__file__).resolve().parents[1] / "experiments" / "accelerate" / "fsdp.yaml")
    return [accelerate, "launch", "--config_file", config, "--num_processes", "2", "--mixed_precision", "no"]


def _checkpoint(run: Path, epoch: int) -> tuple[dict, dict]:
    where = run / "checkpoints" / f"epoch_{epoch:05d}"
    return load_file(where / "trainable.safetensors"), load_file(where / "optimizer.safetensors")


@pytest.mark.slow
def test_sharded_full_finetuning_checkpoints_and_resumes_exactly(cache_dir, tiny_sd3_path, tmp_path):
    base = [f"paths.output_root={tmp_path}", *COMMON]

    def launch(name: str, epochs: int, processes: int = 2):
        # one step on the same 8 samples: 4 per process x 2, or all 8 in one process
        launcher, env, batch = None, None, ["trainer.train_batch_size=8", "sampler.batch_size=8"]
        if processes == 2:
            launcher = [*_launcher(), "--main_process_port", str(free_port())]
            env, batch = {"OMP_NUM_THREADS": "1", "RLFT_TEST_FSDP_ON_CPU": "1"}, ["sampler.batch_size=2"]
        args = [*base, *batch, f"run_name={name}", f"trainer.epochs={epochs}"]
        result = run_cli(args, cache_dir, launcher=launcher, env=env)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        return result

    straight = launch("straight", 2)
    held = re.search(r"sharding: FSDP over 2 processes; this one holds [0-9,]+ of .* \(([0-9.]+)%\)", straight.stdout)
    assert held and 45 < float(held.group(1)) < 55, straight.stdout[:2000]  # the main process's half
    assert "(4 per process x 2 processes)" in straight.stdout
    launch("stopped", 1)
    resumed = launch("stopped", 2)
    assert "resumed from" in resumed.stdout and "epoch_00001" in resumed.stdout
    one = launch("one_process", 1, processes=1)
    assert "sharding" not in one.stdout

    # the gathered checkpoint is a whole transformer, named and shaped as a one-process run's
    weights, moments = _checkpoint(tmp_path / "straight", 1)
    weights_1, moments_1 = _checkpoint(tmp_path / "one_process", 1)
    assert weights.keys() == weights_1.keys() and moments.keys() == moments_1.keys()
    assert all(weights[k].shape == weights_1[k].shape for k in weights)
    # the same first step: AdamW's first moment is 0.1 g (each process's gradient reduced over both)
    for key in (k for k in moments if k.endswith("/exp_avg")):
        scale = float(moments_1[key].abs().max()) + 1e-12
        assert float((moments[key] - moments_1[key]).abs().max()) <= 1e-4 * scale, key
    for epoch in (0, 1):  # before and after the step: the same evaluation images, scored alike
        for (pa, ra), (pb, rb) in zip(
            sorted(eval_table(tmp_path / "straight", "seen", epoch)),
            sorted(eval_table(tmp_path / "one_process", "seen", epoch)),
            strict=True,
        ):
            assert pa == pb and abs(ra - rb) <= 1e-4, (epoch, pa, ra, rb)

    # stopped after epoch 1 and resumed == uninterrupted, to the bit
    for a, b in zip(_checkpoint(tmp_path / "straight", 2), _checkpoint(tmp_path / "stopped", 2), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_what_sharding_cannot_do_is_refused_before_any_weights_load():
    sharded = SimpleNamespace(distributed_type="FSDP", is_fsdp2=True, num_processes=2)
    cfg = lambda finetune, ema: OmegaConf.create({"model": {"finetune": finetune}, "trainer": {"ema_decay": ema}})  # noqa: E731
    sharding.check(cfg("full", None), sharded)
    with pytest.raises(ConfigError, match="model.finetune.*set model.finetune=full"):
        sharding.check(cfg("lora", None), sharded)
    with pytest.raises(ConfigError, match="trainer.ema_decay.*set trainer.ema_decay=null"):
        sharding.check(cfg("full", 0.99), sharded)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding.check(cfg("full", None), SimpleNamespace(distributed_type="FSDP", is_fsdp2=False))
    plain = SimpleNamespace(distributed_type="MULTI_CPU", num_processes=2)
    sharding.check(cfg("lora", 0.99), plain)  # data parallel: anything goes


def test_a_sharded_process_with_fewer_evaluation_images_makes_up_the_calls():
    sharded, plain = SimpleNamespace(distributed_type="FSDP", num_processes=2), SimpleNamespace(distributed_type="NO")
    # 5 images over 2 processes (3 and 2) in batches of 2: 2 batches and 1, so the second adds one
    assert [sharding.idle_batches(sharded, mine, 5, 2) for mine in (3, 2)] == [0, 1]
    assert [sharding.idle_batches(sharded, mine, 1, 4) for mine in (1, 0)] == [0, 1]  # one holds none
    assert sharding.idle_batches(sharded, 4, 8, 4) == 0 and sharding.idle_batches(plain, 0, 5, 2) == 0
