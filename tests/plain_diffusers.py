"""Sample an exported model with plain diffusers (this file imports nothing of rlft):

    python tests/plain_diffusers.py <export dir> <noise.pt> <out.pt> prompt [prompt ...]

Full finetuning: the export is the pipeline. LoRA: the base model named in rlft_export.json, then
``pipe.load_lora_weights(<export dir>)``. The sampler is the exported DDIM scheduler with the run's
eta and guidance; x_T and each step's noise come from noise.pt [B, S+1, C, h, w] (passed to
``DDIMScheduler.step`` as ``variance_noise``), so the images can be compared with rlft's.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

export, noise_file, out_file, prompts = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
assert not any(name.startswith("rlft") for name in sys.modules)
info = json.loads((export / "rlft_export.json").read_text())
sampler = info["sampler"]
if info["kind"] == "lora":
    pipe = StableDiffusionPipeline.from_pretrained(info["base_model"], safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(info["scheduler_config"])
    pipe.load_lora_weights(str(export))
else:
    pipe = StableDiffusionPipeline.from_pretrained(str(export), safety_checker=None)
noise = torch.load(noise_file)
steps = iter(range(1, noise.shape[1]))
plain_step = pipe.scheduler.step


def step_with_our_noise(model_output, timestep, sample, eta=0.0, generator=None, **kwargs):
    # eta and generator in the signature: the pipeline passes them only to a step that names them
    return plain_step(model_output, timestep, sample, eta=eta, variance_noise=noise[:, next(steps)], **kwargs)


pipe.scheduler.step = step_with_our_noise
images = pipe(
    prompts,
    num_inference_steps=sampler["num_steps"],
    guidance_scale=sampler["guidance_scale"],
    eta=sampler["eta"],
    latents=noise[:, 0],
    output_type="pt",
).images
assert not any(name.startswith("rlft") for name in sys.modules)
torch.save(images, out_file)
