"""FLUX.1 (rectified flow, an MMDiT with single-stream blocks) as a policy, and a tiny random one.

The second flow family beside Stable Diffusion 3 (rlft/sd3.py), through the same seam: the runner, the
samplers (``sampler=flow_sde`` / ``flow_ode``, rlft/flow_sampling.py) and every algorithm are unchanged.
What differs from SD3 is the pipeline's, done as ``FluxPipeline`` does it:

* prompts: CLIP's pooled embedding [B, 768] and T5's per-token states [B, L, 4096]
  (``FluxPipeline.encode_prompt``); text position ids are zeros;
* latents: the policy's state is the VAE latent [B, 16, h, w] (so the SDE, its log-density and PXPO's
  pooling see the usual image grid); the transformer reads it packed into 2x2 patches,
  [B, (h/2)(w/2), 64], with the image position ids (row, column), and its velocity is unpacked
  back. Packing is a permutation, so the element-wise Gaussian of a step is the same either way;
* timesteps: the transformer takes sigma = t / 1000; FLUX.1-dev is guidance-distilled: the guidance
  scale is an input of the transformer (``model.guidance``, 3.5), not a second batch, so its runs
  set ``sampler.guidance_scale=1`` (a value > 1 adds true classifier-free guidance on top with the
  negative prompt, as the pipeline's ``true_cfg_scale``);
* the schedule: the unshifted sigmas 1, ..., 1/N, shifted by mu for the image's token count
  (``use_dynamic_shifting``).

Only the transformer trains: LoRA (Flow-GRPO's FLUX targets: the attention, added-KV and
feed-forward projections, r 64, alpha 128) or the whole transformer, as ``policy.unet``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rlft.models import _unwrap
from rlft.policy import Conditioning
from rlft.sd3 import SD3Policy, _t5_char_tokenizer

# Flow-GRPO's LoRA targets for FLUX (scripts/train_flux.py): both streams' attention and feed-forward
FLUX_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


class FluxPolicy(SD3Policy):
    """The text encoders (frozen), transformer (trainable, as ``unet``), VAE and scheduler config of one
    ``FluxPipeline``. ``resolution``: image side in px (default 1024, the pipeline's); ``guidance``:
    the distilled guidance scale the transformer reads (FLUX.1-dev: 3.5; ignored by a transformer
    without a guidance embedding, FLUX.1-schnell); ``max_sequence_length``: T5 tokens (512)."""

    family_name = "a FLUX"
    default_guidance_scale = 1.0  # rlft.sample's sampler for a plain FLUX pipeline: no CFG batch, as the pipeline

    def __init__(self, pipe, guidance: float = 3.5, **options):
        super().__init__(pipe, **options)
        self.guidance = guidance
        self.scheduler_config["sigmas"] = "linspace"  # FluxPipeline's sigmas 1, ..., 1/N

    @staticmethod
    def token_patch(config) -> int:
        return 2 * config.patch_size  # 2x2 latent pixels packed into one token

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        revision: str | None = None,
        variant: str | None = None,
        finetune: Literal["lora", "full"] = "lora",
        lora_rank: int = 64,
        lora_alpha: float = 128.0,
        lora_target_modules: list[str] = list(FLUX_LORA_TARGETS),  # noqa: B006 (read-only)
        gradient_checkpointing: bool = False,
        builder: str | None = None,
        resolution: int | None = None,
        max_sequence_length: int = 512,
        guidance: float = 3.5,
        load_dtype: Literal["bfloat16", "float16"] | None = None,
    ) -> FluxPolicy:
        """Load a ``FluxPipeline`` from the hub or a local directory (see rlft/models.py); ``load_dtype``:
        read the weights in half precision (rlft/sd3.py ``load_options``)."""
        pipe = cls._load(path, revision, variant, builder, finetune, load_dtype)
        return cls(
            pipe,
            guidance=guidance,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=tuple(lora_target_modules),
            gradient_checkpointing=gradient_checkpointing,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
        )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (_unwrap(self.unet).config.in_channels // 4, side, side)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        """T5's per-token states [B, L, D] and CLIP's pooled embedding [B, P] of the prompts and of the
        negative prompt, by the pipeline's ``encode_prompt``."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=[*prompts, negative_prompt],
            prompt_2=None,
            device=self.text_encoder.device,
            max_sequence_length=self.max_sequence_length,
        )
        inputs = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        return Conditioning({k: v[:-1] for k, v in inputs.items()}, {k: v[-1:] for k, v in inputs.items()})

    def denoise(self, x: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """The transformer's velocity at x_t [b, C, h, w] and timesteps t = 1000 sigma: packed into 2x2
        patches with their position ids, sigma and the guidance scale in, unpacked out  [b, C, h, w]."""
        pipe, (b, c, h, w) = type(self.pipe), x.shape
        transformer = _unwrap(self.unet)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        text = inputs["encoder_hidden_states"]
        v = self.unet(
            hidden_states=pipe._pack_latents(x, b, c, h, w),
            timestep=t / 1000,
            guidance=guidance,
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
            img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
            return_dict=False,
            **inputs,
        )[0]
        f = self.vae_scale_factor
        return pipe._unpack_latents(v, h * f, w * f, f)

    # ------------------------------------------------------------------ leaving rlft
    pipeline_class = "FluxPipeline"

    def drawing_settings(self) -> dict:
        return {**super().drawing_settings(), "guidance": self.guidance}


# --------------------------------------------------------------------------- tiny random FLUX


def build_tiny_random_flux(path: str, seed: int = 0, resolution: int = 32) -> None:
    """Write a tiny random-initialised FLUX.1 pipeline (the published classes and layout).

    32x32 images through a 4x VAE with a shift factor (8x8x4 latents, 16 packed tokens of 16 channels),
    one double-stream and one single-stream block with a guidance embedding and RoPE over (text,
    row, column), a 2-layer CLIP text encoder (its pooled output), a 1-layer T5 encoder,
    character-level tokenizers, and FLUX's scheduler (dynamic shift, base 0.5 / max 1.15)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from rlft.models import _char_bpe_tokenizer

    torch.manual_seed(seed)
    out = Path(path)
    tokenizer = _char_bpe_tokenizer(out / "_tok_src", max_length=16)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    t5_tokenizer = _t5_char_tokenizer(max_length=16)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8,
        )
    )  # fmt: skip
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=resolution, scaling_factor=0.36, shift_factor=0.12,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
    ).save_pretrained(out)
    shutil.rmtree(out / "_tok_src", ignore_errors=True)
