"""Stable Diffusion 3 (rlft/sd3.py) on a tiny random pipeline in the published layout: it loads through
model.path, samples exactly like StableDiffusion3Pipeline, and every algorithm trains it through the runner
with LoRA or full finetuning (pi_ref staying fixed while the policy moves: tests/test_prdp.py)."""

from __future__ import annotations

import pytest
import torch

from rlft.errors import ConfigError
from rlft.flow_sampling import FlowODE
from rlft.sd3 import SD3Policy
from tests.conftest import export_and_reload, read_metrics, train_every_algorithm


def test_sampling_matches_the_published_pipeline(tiny_sd3_path):
    """flow_ode + the policy's guided velocity from x_T == StableDiffusion3Pipeline's latents (same x_T,
    steps, guidance and empty negative prompt)."""
    from diffusers import StableDiffusion3Pipeline

    policy = SD3Policy.from_pretrained(str(tiny_sd3_path), finetune="full", max_sequence_length=16)
    assert policy.latent_shape == (4, 8, 8) and policy.scheduler_config["shift"] == 3.0
    sampler = FlowODE(num_steps=4, guidance_scale=4.5).setup(policy.scheduler_config)
    prompts = ["a red circle", "two cats"]
    cond = policy.encode(prompts)
    assert cond.inputs["encoder_hidden_states"].shape == (2, 16 + 16, 32)  # CLIP 16 tokens (padded), T5 16
    assert cond.inputs["pooled_projections"].shape == (2, 16) and cond.negative["pooled_projections"].shape == (1, 16)
    noise = torch.randn(2, 5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = sampler.sample(policy, cond, noise, lambda lp: lp.mean(dim=(1, 2, 3)))
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path), local_files_only=True)
    want = pipe(
        prompts, latents=noise[:, 0], num_inference_steps=4, guidance_scale=4.5, height=32, width=32,
        max_sequence_length=16, output_type="latent",
    ).images  # fmt: skip
    torch.testing.assert_close(traj.latents[:, -1], want, rtol=1e-5, atol=1e-5)
    assert traj.images.shape == (2, 3, 32, 32) and not traj.stochastic.any()


def test_bad_sd3_inputs_say_what_to_set(tiny_sd3_path, tiny_path):
    with pytest.raises(ConfigError, match="model.resolution: 36 px is not a multiple of 8"):
        SD3Policy.from_pretrained(str(tiny_sd3_path), resolution=36)
    with pytest.raises(ConfigError, match="set model.resolution <= 64"):  # 8 patches of 2 latents of 4 px
        SD3Policy.from_pretrained(str(tiny_sd3_path), resolution=72)
    with pytest.raises(ConfigError, match="not an SD3 pipeline"):
        SD3Policy.from_pretrained(str(tiny_path))


def test_every_algorithm_trains_sd3_through_the_runner_and_the_export_leaves_rlft(cache_dir, tiny_sd3_path, tmp_path):
    """DDPO (LoRA, and full), PRDP, GRPO and PXPO (toy_color's per-pixel map) each take an epoch on the tiny
    SD3 through the unchanged runner; the exports load in plain diffusers (StableDiffusion3Pipeline, the
    adapter by load_lora_weights) and draw, by the Euler ODE from the same x_T, what rlft's policy draws."""
    from diffusers import StableDiffusion3Pipeline

    from rlft.sample import generate, load_model

    root = tmp_path / "runs"
    train_every_algorithm(root, ["model=tiny_random_sd3"], cache_dir)
    assert next(r for r in read_metrics(root / "prdp") if "train/prdp_pairs" in r)["train/prdp_pairs"] > 0

    prompts = ["a cat", "a dog"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    draw = dict(latents=noise, num_inference_steps=4, guidance_scale=4.5, height=32, width=32, max_sequence_length=16)
    before = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))(prompts, **draw, output_type="latent").images
    for name in ("ddpo_lora", "ddpo_full"):
        out = tmp_path / f"export_{name}"
        _, _, ours, pipe = export_and_reload(
            root / name, out, cache_dir, StableDiffusion3Pipeline, tiny_sd3_path, prompts, noise, guidance_scale=4.5
        )
        plain = pipe(prompts, **draw, output_type="latent").images
        assert (plain - before).abs().max() > 1e-3, name  # the export carries the finetuned weights
        torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)
        # rlft.sample reads the export as it reads the run, with the run's sampler or another family
        assert torch.equal(generate(out, prompts)[0], generate(root / name, prompts)[0])
        ode = generate(out, prompts, sampler="flow_ode", num_steps=4)[0]
        assert torch.equal(ode, generate(root / name, prompts, sampler="flow_ode", num_steps=4)[0])
        assert not torch.equal(ode, generate(out, prompts)[0])
    # a plain SD3 pipeline is sampled as its own pipeline samples: the Euler ODE
    _, settings = load_model(str(tiny_sd3_path))
    assert settings["_target_"] == "rlft.flow_sampling.FlowODE"
