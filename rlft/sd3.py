"""Stable Diffusion 3 / 3.5 (rectified flow, MMDiT) as a policy (rlft/policy.py), and a tiny random one.

The pipeline loads through ``DiffusionPipeline.from_pretrained`` like every model here; prompts are
encoded by the pipeline's own ``encode_prompt`` (two CLIP encoders' penultimate states, padded and
joined with T5's, and their two pooled embeddings), so conditioning is exactly the published
pipeline's. The transformer predicts a velocity v(x_t, t, c) at float timesteps t = 1000 sigma;
classifier-free guidance is v_u + w (v_c - v_u), as in ``StableDiffusion3Pipeline``; latents
decode as z / scaling_factor + shift_factor. Sample it with ``sampler=flow_sde`` (train) or
``sampler=flow_ode`` (rlft/flow_sampling.py).

Only the transformer trains: LoRA adapters (Flow-GRPO's targets: the attention and added-KV
projections, r 32, alpha 64) or the whole transformer. It sits where every policy keeps its
denoiser, ``policy.unet``, so the runner, checkpoints, EMA and the reference policy treat it like
a UNet (rlft/models.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rlft.errors import ConfigError
from rlft.flow_sampling import shift_mu
from rlft.models import DiffusionPolicy, _unwrap, load_pipeline
from rlft.policy import Conditioning

# Flow-GRPO's LoRA targets for SD3.5 (image and text streams' attention projections)
SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
SD3_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class SD3Policy(DiffusionPolicy):
    """The text encoders (frozen), transformer (trainable, as ``unet``), VAE and scheduler config of one
    ``StableDiffusion3Pipeline``. ``resolution``: the image side in pixels (default: the transformer's
    sample size x the VAE factor); ``max_sequence_length``: T5's tokens (the pipeline's default 256)."""

    flow_matching = True  # sampler=flow_sde (train) or flow_ode (evaluate)

    def __init__(
        self,
        pipe,
        finetune: str = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        lora_target_modules: tuple[str, ...] = SD3_LORA_TARGETS,
        gradient_checkpointing: bool = False,
        resolution: int | None = None,
        max_sequence_length: int = 256,
    ):
        self.pipe = pipe  # its encode_prompt; it holds no weights of its own
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        encoders = (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
        self.text_encoders = [e for e in encoders if e is not None]
        for encoder in self.text_encoders:
            encoder.requires_grad_(False).eval()
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.scheduler_config = dict(pipe.scheduler.config)
        self._make_trainable(
            pipe.transformer, finetune, lora_rank, lora_alpha, lora_target_modules, gradient_checkpointing
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        cfg, patch = pipe.transformer.config, self.token_patch(pipe.transformer.config)
        self.resolution = resolution or (cfg.get("sample_size") or self.default_sample_size) * self.vae_scale_factor
        side = self.resolution // self.vae_scale_factor
        if self.resolution % (self.vae_scale_factor * patch):
            raise ConfigError(
                "model.resolution",
                f"{self.resolution} px is not a multiple of {self.vae_scale_factor * patch} "
                f"(the VAE factor {self.vae_scale_factor} x the transformer's patch size {patch})",
            )
        if cfg.get("pos_embed_max_size") and side > cfg.pos_embed_max_size * patch:
            raise ConfigError(
                "model.resolution",
                f"{self.resolution} px is larger than the transformer's position embedding covers",
                f"set model.resolution <= {cfg.pos_embed_max_size * cfg.patch_size * self.vae_scale_factor}",
            )
        self.max_sequence_length = max_sequence_length
        if self.scheduler_config.get("use_dynamic_shifting"):  # the shift for this resolution, as the pipeline's
            self.scheduler_config["mu"] = shift_mu(self.scheduler_config, (side // patch) ** 2)

    default_sample_size = 128  # latent side when the transformer's config names none (FLUX's pipeline's)

    @staticmethod
    def token_patch(config) -> int:
        """Latent pixels per side of one image token: the transformer's patch size."""
        return config.patch_size

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        revision: str | None = None,
        variant: str | None = None,
        finetune: Literal["lora", "full"] = "lora",
        lora_rank: int = 32,
        lora_alpha: float = 64.0,
        lora_target_modules: list[str] = list(SD3_LORA_TARGETS),  # noqa: B006 (read-only)
        gradient_checkpointing: bool = False,
        builder: str | None = None,
        resolution: int | None = None,
        max_sequence_length: int = 256,
        load_dtype: Literal["bfloat16", "float16"] | None = None,
    ) -> SD3Policy:
        """Load a ``StableDiffusion3Pipeline`` from the hub or a local directory (see rlft/models.py);
        ``load_dtype``: read the weights in half precision (``load_options``)."""
        pipe = cls._load(path, revision, variant, builder, finetune, load_dtype, **_left_out(path))
        return cls(
            pipe,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=tuple(lora_target_modules),
            gradient_checkpointing=gradient_checkpointing,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
        )

    family_name = "an SD3"  # how an error names the family

    @classmethod
    def _load(cls, path, revision, variant, builder, finetune: str, load_dtype: str | None, **parts):
        """The family's pipeline (``cls.pipeline_class`` exactly: a variant such as FluxFillPipeline reads
        more input channels than its latents have) with SD3_PARTS, or one ConfigError with the fix."""
        pipe = load_pipeline(path, revision, variant, builder, **parts, **load_options(finetune, load_dtype))
        if type(pipe).__name__ != cls.pipeline_class or any(getattr(pipe, n, None) is None for n in SD3_PARTS):
            raise ConfigError(
                "model",
                f"'{path}' holds a {type(pipe).__name__}, not {cls.family_name} pipeline with {', '.join(SD3_PARTS)}",
                "model=sd35_medium and tiny_random_sd3 load SD3 pipelines; model=flux_dev and tiny_random_flux "
                "FLUX ones; model=sd14, sd15, toy and tiny_random UNet pipelines",
            )
        return pipe

    def to(self, device, dtype: torch.dtype = torch.float32) -> SD3Policy:
        for encoder in self.text_encoders:  # T5 overflows in fp16: bf16 instead
            encoder.to(
                device,
                dtype=torch.bfloat16 if dtype == torch.float16 and encoder.config.model_type == "t5" else dtype,
            )
        self.vae.to(device, dtype=dtype)
        self._denoiser_to(device, dtype)
        return self

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.vae_scale_factor
        return (_unwrap(self.unet).config.in_channels, side, side)

    @torch.no_grad()
    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        """Per-token states [B, 77 + T5 tokens, D] and pooled embeddings [B, P] of the prompts and of the
        negative prompt, by the pipeline's ``encode_prompt`` (the negative encoded the same way)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=[*prompts, negative_prompt],
            prompt_2=None,
            prompt_3=None,
            device=self.text_encoder.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        inputs = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        return Conditioning({k: v[:-1] for k, v in inputs.items()}, {k: v[-1:] for k, v in inputs.items()})

    def denoise(self, x: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """The transformer's velocity at x_t and timesteps t = 1000 sigma  [b, C, h, w]."""
        return self.unet(hidden_states=x, timestep=t, return_dict=False, **inputs)[0]

    # ------------------------------------------------------------------ leaving rlft
    pipeline_class = "StableDiffusion3Pipeline"

    def drawing_settings(self) -> dict:
        return {"resolution": self.resolution, "max_sequence_length": self.max_sequence_length}

    def save_export(self, out: Path, scheduler) -> str:
        """The LoRA adapter in diffusers' layout for the pipeline's transformer, or the whole pipeline
        with ``scheduler``."""
        pipeline = type(self.pipe)
        if self.finetune == "lora":
            layers, metadata = self._lora_layers()
            pipeline.save_lora_weights(out, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
            return "lora"
        parts = {k: getattr(self.pipe, k) for k in self.pipe.components}
        pipeline(**{**parts, "transformer": _unwrap(self.unet), "scheduler": scheduler}).save_pretrained(out)
        return "full"

    def load_lora(self, directory: Path, weight_name: str, scheduler) -> None:
        self.pipe.load_lora_weights(str(directory), weight_name=weight_name)  # into pipe.transformer, our unet


def load_options(finetune: str, load_dtype: str | None) -> dict:
    """``torch_dtype`` for ``from_pretrained`` where the weights are read in half precision: a large
    transformer (FLUX's 12B) then never sits in fp32 on the host. LoRA only: full finetuning keeps
    fp32 master weights, so it is refused with the fix."""
    if load_dtype is None:
        return {}
    if finetune != "lora":
        raise ConfigError(
            "model.load_dtype",
            f"{load_dtype} weights cannot be finetuned in full (the optimizer needs fp32 master weights)",
            "set model.load_dtype=null, or model.finetune=lora",
        )
    return {"torch_dtype": getattr(torch, load_dtype)}


def _left_out(path: str) -> dict:
    """T5 as None where a local pipeline was saved without it (model_index.json does not name it)."""
    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return {}
    named = json.loads(index.read_text())
    return {k: None for k in ("text_encoder_3", "tokenizer_3") if (named.get(k) or [None])[0] is None}


# --------------------------------------------------------------------------- tiny random SD3


def _t5_char_tokenizer(max_length: int):
    """A T5 (Unigram) tokenizer over single printable characters, built without a download."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(chr(c), -3.0) for c in range(33, 127)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _random_clip(tokenizer, width: int, heads: int, ff: int, layers: int, projection_dim: int):
    """A random CLIP text encoder with a projection (SD3's two), positions as many as the tokenizer's."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
            projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip


def build_tiny_random_sd3(path: str, seed: int = 0, resolution: int = 32) -> None:
    """Write a tiny random-initialised Stable Diffusion 3 pipeline (the published classes and layout).

    32x32 images through a 4x VAE with a shift factor (8x8x4 latents), a 2-block MMDiT with 2x2
    patches, two 2-layer CLIP text encoders with projections (pooled 8 + 8), a 1-layer T5 encoder,
    character-level tokenizers, and SD3.5's scheduler (FlowMatchEulerDiscreteScheduler, shift 3)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from rlft.models import _char_bpe_tokenizer

    torch.manual_seed(seed)
    out = Path(path)
    tokenizer = _char_bpe_tokenizer(out / "_tok_src", max_length=16)

    def clip(hidden: int):
        return _random_clip(tokenizer, hidden, heads=2, ff=2 * hidden, layers=2, projection_dim=8)

    t5_tokenizer = _t5_char_tokenizer(max_length=16)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8,
        )
    )  # fmt: skip
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=16, pos_embed_max_size=resolution // 4,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=resolution, scaling_factor=1.5, shift_factor=0.06,
    )  # fmt: skip
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip(8),
        tokenizer=tokenizer,
        text_encoder_2=clip(12),
        tokenizer_2=tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    ).save_pretrained(out)
    shutil.rmtree(out / "_tok_src", ignore_errors=True)


# --------------------------------------------------------------------------- random SD3.5 Medium

# stabilityai/stable-diffusion-3.5-medium's transformer/config.json and vae/config.json (diffusers
# layout): a 24-block MMDiT of width 24 x 64 = 1536 with dual attention in blocks 0-12 and RMS
# QK-norm, 2x2 patches over 16-channel latents; an 8x VAE with scaling 1.5305 and shift 0.0609
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
SD35_MEDIUM_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
# the text encoders' published widths (CLIP ViT-L/14, OpenCLIP bigG/14, T5 v1.1 XXL): what the
# transformer reads; their depth only changes the cost of encoding a prompt
SD35_TEXT_WIDTHS = {"clip_l": (768, 12, 3072), "clip_g": (1280, 20, 5120), "t5": (4096, 64, 10240)}


def build_random_sd35_medium(
    path: str, seed: int = 0, num_layers: int | None = None, text_layers: int = 2, dtype: str = "float32"
) -> None:
    """Write a random-initialised pipeline of Stable Diffusion 3.5 Medium's published configuration.

    The transformer and the VAE are the published ones (``SD35_MEDIUM_TRANSFORMER``, 2.5B parameters
    with ``num_layers`` None; fewer blocks for a quick check) and SD3.5's scheduler (shift 3); the
    three text encoders keep their published widths (what the transformer sees: 4096-wide tokens and
    a 2048-wide pooled vector) with ``text_layers`` layers each and character-level tokenizers, since
    only their depth is left out. Built on the GPU where there is one, saved in ``dtype``. For speed
    and memory checks of the real architecture without a download (``make bench``'s sd35_medium_random
    case); it draws noise."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from rlft.models import _char_bpe_tokenizer

    torch.manual_seed(seed)
    out = Path(path)
    tokenizer = _char_bpe_tokenizer(out / "_tok_src", max_length=77)
    t5_tokenizer = _t5_char_tokenizer(max_length=256)

    def clip(name: str):
        width, heads, ff = SD35_TEXT_WIDTHS[name]
        return _random_clip(tokenizer, width, heads=heads, ff=ff, layers=text_layers, projection_dim=width)

    width, heads, ff = SD35_TEXT_WIDTHS["t5"]
    config = dict(SD35_MEDIUM_TRANSFORMER)
    if num_layers is not None:
        config["num_layers"] = num_layers
        config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < num_layers)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        parts = dict(
            transformer=SD3Transformer2DModel(**config),
            vae=AutoencoderKL(**SD35_MEDIUM_VAE),
            text_encoder=clip("clip_l"),
            text_encoder_2=clip("clip_g"),
            text_encoder_3=T5EncoderModel(
                T5Config(
                    vocab_size=len(t5_tokenizer), d_model=width, d_kv=64, d_ff=ff, num_layers=text_layers,
                    num_heads=heads, feed_forward_proj="gated-gelu", is_gated_act=True,
                )
            ),
        )  # fmt: skip
    for module in parts.values():
        module.to(getattr(torch, dtype))
    StableDiffusion3Pipeline(
        **parts,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=t5_tokenizer,
    ).save_pretrained(out)
    shutil.rmtree(out / "_tok_src", ignore_errors=True)
