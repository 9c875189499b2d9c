"""FLUX.1 (rlft/flux.py) on a tiny random pipeline in the published layout: it samples exactly like
FluxPipeline (distilled guidance, and true CFG on top), refuses what it cannot load with the fix, and
every algorithm trains it through the unchanged runner; the exports load in plain diffusers. The
algorithms' gradient identities run on it through conftest's ``family`` fixture."""

from __future__ import annotations

import math

import pytest
import torch

from rlft.errors import ConfigError
from rlft.flow_sampling import FlowODE
from rlft.flux import FluxPolicy
from tests.conftest import export_and_reload, train_every_algorithm


def _pipeline_latents(pipe, prompts, noise, steps, **kwargs):
    """FluxPipeline's final latents from x_T = ``noise`` [B, C, h, w] (packed in, unpacked out)."""
    b, c, h, w = noise.shape
    packed = type(pipe)._pack_latents(noise, b, c, h, w)
    out = pipe(
        prompts, latents=packed, num_inference_steps=steps, height=32, width=32, max_sequence_length=16,
        output_type="latent", **kwargs,
    ).images  # fmt: skip
    return type(pipe)._unpack_latents(out, 32, 32, pipe.vae_scale_factor)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_sampling_matches_the_published_pipeline(tiny_flux_path, cfg):
    """flow_ode + the policy from x_T == FluxPipeline's latents: the distilled guidance 3.5 alone
    (sampler.guidance_scale 1), and with true classifier-free guidance 2 on top (the pipeline's
    true_cfg_scale with the empty negative prompt). FLUX's sigmas 1, ..., 1/N shifted by mu."""
    from diffusers import FluxPipeline

    policy = FluxPolicy.from_pretrained(str(tiny_flux_path), finetune="full", max_sequence_length=16, resolution=32)
    assert policy.latent_shape == (4, 8, 8) and policy.scheduler_config["use_dynamic_shifting"]
    sampler = FlowODE(num_steps=4, guidance_scale=cfg).setup(policy.scheduler_config)
    prompts = ["a red circle", "two cats"]
    cond = policy.encode(prompts)
    assert cond.inputs["encoder_hidden_states"].shape == (2, 16, 32)  # T5's 16 tokens
    assert cond.inputs["pooled_projections"].shape == (2, 16) and cond.negative["pooled_projections"].shape == (1, 16)
    noise = torch.randn(2, 5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = sampler.sample(policy, cond, noise, lambda lp: lp.mean(dim=(1, 2, 3)))
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_path), local_files_only=True)
    extra = {"negative_prompt": ["", ""], "true_cfg_scale": cfg} if cfg > 1 else {}
    want = _pipeline_latents(pipe, prompts, noise[:, 0], 4, guidance_scale=3.5, **extra)
    torch.testing.assert_close(traj.latents[:, -1], want, rtol=1e-5, atol=1e-5)
    # the pipeline's schedule: mu for 16 tokens, sigmas 1, 3/4, 1/2, 1/4 before the shift
    e = math.exp(policy.scheduler_config["mu"])
    shifted = [e / (e + (1 / s - 1)) for s in (1.0, 0.75, 0.5, 0.25)]
    torch.testing.assert_close(sampler.scheduler.sigmas[:4].double(), torch.tensor(shifted, dtype=torch.float64))
    assert traj.images.shape == (2, 3, 32, 32) and not traj.stochastic.any()


def test_bad_flux_inputs_say_what_to_set(tiny_flux_path, tiny_sd3_path):
    with pytest.raises(ConfigError, match="model.resolution: 36 px is not a multiple of 8"):  # VAE 4 x packing 2
        FluxPolicy.from_pretrained(str(tiny_flux_path), resolution=36)
    with pytest.raises(ConfigError, match="not a FLUX pipeline"):  # it has every part FLUX has, named alike
        FluxPolicy.from_pretrained(str(tiny_sd3_path))
    from rlft.sd3 import SD3Policy

    with pytest.raises(ConfigError, match="holds a FluxPipeline, not an SD3 pipeline"):
        SD3Policy.from_pretrained(str(tiny_flux_path))


def test_weights_read_in_half_precision_train_as_lora_in_fp32_on_cpu(tiny_flux_path):
    """model.load_dtype=bfloat16 reads the transformer in bf16 (the 12B model never sits in fp32 on the
    host); on CPU the policy computes in fp32 and only the adapters train; full finetuning is refused."""
    policy = FluxPolicy.from_pretrained(
        str(tiny_flux_path), finetune="lora", lora_rank=4, max_sequence_length=16, resolution=32, load_dtype="bfloat16"
    )
    assert policy.pipe.vae.dtype == torch.bfloat16 and {p.dtype for p in policy.trainable_parameters()} == {
        torch.float32
    }
    assert any(p.dtype == torch.bfloat16 for p in policy.unet.parameters())
    policy.to("cpu", torch.float32)
    assert {p.dtype for p in policy.unet.parameters()} == {torch.float32}
    cond = policy.encode(["a cat"])
    sampler = FlowODE(num_steps=2, guidance_scale=1.0).setup(policy.scheduler_config)
    with torch.no_grad():
        traj = sampler.sample(policy, cond, torch.Generator().manual_seed(0), lambda lp: lp.mean(dim=(1, 2, 3)))
    assert torch.isfinite(traj.images).all()
    with pytest.raises(ConfigError, match="model.load_dtype: bfloat16 weights cannot be finetuned in full"):
        FluxPolicy.from_pretrained(str(tiny_flux_path), finetune="full", load_dtype="bfloat16")


def test_every_algorithm_trains_flux_through_the_runner_and_the_export_leaves_rlft(cache_dir, tiny_flux_path, tmp_path):
    """DDPO (LoRA, and full), PRDP, GRPO and PXPO (toy_color's per-pixel map) each take an epoch on the
    tiny FLUX through the unchanged runner; the exports load in plain diffusers (FluxPipeline, the
    adapter by load_lora_weights) and draw, by the Euler ODE from the same x_T, what rlft draws."""
    from diffusers import FluxPipeline

    from rlft.sample import generate, load_model

    root = tmp_path / "runs"
    train_every_algorithm(root, ["model=tiny_random_flux", "sampler.guidance_scale=1"], cache_dir)

    prompts = ["a cat", "a dog"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    base = FluxPipeline.from_pretrained(str(tiny_flux_path))
    before = _pipeline_latents(base, prompts, noise, 4, guidance_scale=3.5)
    for name in ("ddpo_lora", "ddpo_full"):
        out = tmp_path / f"export_{name}"
        policy, settings, ours, pipe = export_and_reload(
            root / name, out, cache_dir, FluxPipeline, tiny_flux_path, prompts, noise, guidance_scale=1.0
        )
        assert isinstance(policy, FluxPolicy) and settings["guidance_scale"] == 1
        plain = _pipeline_latents(pipe, prompts, noise, 4, guidance_scale=3.5)
        assert (plain - before).abs().max() > 1e-3, name  # the export carries the finetuned weights
        torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)
        # rlft.sample reads the export as it reads the run
        assert torch.equal(generate(out, prompts)[0], generate(root / name, prompts)[0])
    # a plain FLUX pipeline is sampled as its own pipeline samples: the Euler ODE, no CFG batch
    _, settings = load_model(str(tiny_flux_path))
    assert settings["_target_"] == "rlft.flow_sampling.FlowODE" and settings["guidance_scale"] == 1.0
