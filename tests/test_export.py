"""A finetuned run leaves rlft in diffusers' formats (rlft/export.py), and `rlft.sample` redraws the
run's own evaluation images (rlft/sample.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from rlft.rewards.jpeg import JpegCompressibility
from rlft.sample import generate, load_model
from rlft.seeding import EVAL, sample_noise
from tests.conftest import FAST, REPO, run_cli, run_process
from tests.helpers import eval_table


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_an_export_draws_the_runs_evaluation_images_in_plain_diffusers(finetune, cache_dir, tmp_path):
    # one epoch at a large lr, so that the model has moved; alpha != rank, so a lost LoRA scale shows
    args = [f"paths.output_root={tmp_path}", *FAST, f"model.finetune={finetune}", "model.lora_alpha=8"]
    args += ["sampler.num_steps=4", "trainer.epochs=1", "trainer.eval_every=1", "trainer.eval_num_prompts=3"]
    result = run_cli([*args, "optimizer.lr=1e-3", "run_name=run"], cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    table = eval_table(run, "seen", 1)
    assert table != eval_table(run, "seen", 0)  # the finetuned model draws other images
    prompts = list(dict.fromkeys(p for p, _ in table))

    # rlft.sample on the run: the run's own evaluation images (their rewards, to the last digit)
    images, every = generate(run, prompts, images_per_prompt=2)
    scores = JpegCompressibility()(images, every, [{}] * len(every)).scores
    assert list(zip(every, scores.tolist(), strict=True)) == table

    # the export, loaded by plain diffusers (no rlft in that process), with the same noise
    out = tmp_path / "export"
    exported = run_process([sys.executable, "-m", "rlft.export", str(run), str(out)], cache_dir, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (out / ("pytorch_lora_weights.safetensors" if finetune == "lora" else "model_index.json")).exists()
    policy, settings = load_model(str(run))
    keys = [(settings["seed"], EVAL, settings["eval_seed"], i) for i in range(len(every))]
    torch.save(sample_noise(keys, settings["num_steps"], policy.latent_shape), tmp_path / "noise.pt")
    cmd = [sys.executable, str(REPO / "tests" / "plain_diffusers.py"), str(out), str(tmp_path / "noise.pt")]
    plain = run_process([*cmd, str(tmp_path / "plain.pt"), *every], cache_dir, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    diffusers_images = torch.load(tmp_path / "plain.pt")
    assert diffusers_images.shape == images.shape
    assert (diffusers_images - images).abs().max() < 1e-4

    # rlft.sample reads the export too, and draws the same images
    again, _ = generate(out, prompts, images_per_prompt=2)
    assert torch.equal(again, images)


def test_sample_command_writes_captioned_images_and_bad_settings_are_one_line(cache_dir, tiny_path, tmp_path):
    out = tmp_path / "samples"
    cmd = [sys.executable, "-m", "rlft.sample", str(tiny_path), "prompts=a cat|a dog", f"out={out}", "num_steps=3"]
    result = run_process(cmd, cache_dir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["000.png", "001.png", "grid.png", "prompts.json"]
    bad = run_process([*cmd[:4], "prompts=a cat", "steps=3"], cache_dir, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "rlft.sample: error: steps: is not a setting of rlft.sample" in bad.stderr
    missing = run_process([sys.executable, "-m", "rlft.export", str(tmp_path / "nope"), str(tmp_path / "o")], cache_dir)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
