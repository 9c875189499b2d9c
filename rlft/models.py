"""The UNet family's policy (rlft/policy.py): a text-to-image pipeline in the diffusers layout.

Stable Diffusion from the hub, a local copy of it, and the tiny models of the
tests and the toy world all load through ``DiffusionPipeline.from_pretrained``
(the pipeline class named in model_index.json).
Only the UNet trains: LoRA adapters through peft (``finetune=lora``) or the
whole UNet (``finetune=full``). The frozen reference policy pi_ref (PRDP) is the
pretrained UNet: adapters disabled for LoRA, a frozen copy for full finetuning.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from rlft.errors import ConfigError
from rlft.policy import Conditioning
from rlft.sampling import compute_dtype

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def quiet_libraries() -> None:
    """diffusers, transformers and accelerate: errors only, no progress bars (rlft has its own)."""
    import logging

    import diffusers
    import transformers

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class DiffusionPolicy:
    """Tokenizer, text encoder, UNet (trainable), VAE and scheduler config of one pipeline."""

    flow_matching = False  # a diffusion model: sampler=ddim or ddpm (a flow model: rlft/sd3.py)
    default_guidance_scale: float | None = None  # the sampler's, where the family has its own (rlft/sample.py)

    def __init__(
        self,
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler_config,
        finetune: str = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS,
        gradient_checkpointing: bool = False,
    ):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval()
        self.scheduler_config = scheduler_config
        self._make_trainable(unet, finetune, lora_rank, lora_alpha, lora_target_modules, gradient_checkpointing)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def _make_trainable(self, denoiser, finetune, lora_rank, lora_alpha, lora_target_modules, gradient_checkpointing):
        """The denoiser trains as LoRA adapters (peft) or whole; it is ``self.unet`` whatever its family
        (the runner prepares, checkpoints and averages ``policy.unet``)."""
        self.finetune = finetune
        self.unet = denoiser
        self._reference_unet = None
        if finetune == "lora":
            from peft import LoraConfig

            denoiser.requires_grad_(False)
            denoiser.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(lora_target_modules),
                )
            )
            from diffusers.training_utils import cast_training_params

            cast_training_params(denoiser, dtype=torch.float32)  # adapters fp32 on a half-precision base
        else:
            denoiser.requires_grad_(True)
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str,
        revision: str | None = None,
        variant: str | None = None,
        finetune: Literal["lora", "full"] = "lora",
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: list[str] = list(DEFAULT_LORA_TARGETS),  # noqa: B006 (read-only)
        gradient_checkpointing: bool = False,
        builder: str | None = None,
    ) -> DiffusionPolicy:
        """Load a pipeline from the hub or a local directory (:func:`load_pipeline`)."""
        pipe = load_pipeline(path, revision, variant, builder)
        parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
        if any(getattr(pipe, name, None) is None for name in parts):
            raise ConfigError(
                "model",
                f"'{path}' holds a {type(pipe).__name__}, not a UNet pipeline with {', '.join(parts)}",
                "model=sd14, sd15, toy and tiny_random load UNet pipelines; another family needs its own "
                "policy (rlft/policy.py)",
            )
        return cls(
            pipe.tokenizer,
            pipe.text_encoder,
            pipe.unet,
            pipe.vae,
            pipe.scheduler.config,
            finetune=finetune,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_target_modules=tuple(lora_target_modules),
            gradient_checkpointing=gradient_checkpointing,
        )

    # ------------------------------------------------------------------ use
    def to(self, device, dtype: torch.dtype = torch.float32) -> DiffusionPolicy:
        """Frozen parts in ``dtype`` (half precision on GPU), the denoiser as :meth:`_denoiser_to` puts it."""
        self.text_encoder.to(device, dtype=dtype)
        self.vae.to(device, dtype=dtype)
        self._denoiser_to(device, dtype)
        return self

    def _denoiser_to(self, device, dtype: torch.dtype) -> None:
        """What trains stays fp32 (autocast computes in ``dtype``): the whole denoiser for full finetuning;
        with LoRA the frozen base weights go to ``dtype`` and the adapters alone stay fp32 (as
        ddpo-pytorch and Flow-GRPO keep them), which halves the denoiser's memory in half precision."""
        if self.finetune != "lora":
            self.unet.to(device)
            return
        from diffusers.training_utils import cast_training_params

        self.unet.to(device, dtype=dtype)  # fp32 on CPU, whatever dtype the weights were read in
        cast_training_params(self.unet, dtype=torch.float32)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of x_T."""
        cfg = _unwrap(self.unet).config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text-encoder hidden states  [B, L, D]."""
        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.text_encoder.device
        return self.text_encoder(tok.input_ids.to(device))[0]

    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        """The UNet's conditioning: per-token text states of the prompts and of the negative prompt."""
        embeds = self.encode_prompts([*prompts, negative_prompt])
        return Conditioning({"encoder_hidden_states": embeds[:-1]}, {"encoder_hidden_states": embeds[-1:]})

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        """eps_u + w (eps_c - eps_u) (or the v / x0 the scheduler predicts): one UNet call on the doubled
        batch (the prompts' alone when w = 1), timesteps as floats, the result in at least fp32."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).expand(b)
        dtype = cond.dtype
        if guidance_scale == 1.0:
            y = self.denoise(x.to(dtype), t, cond.inputs)
            return y.to(compute_dtype(y))
        y = self.denoise(torch.cat([x, x]).to(dtype), torch.cat([t, t]), cond.guided())
        y_uncond, y_cond = y.to(compute_dtype(y)).chunk(2)
        return y_uncond + guidance_scale * (y_cond - y_uncond)

    def denoise(self, x: Tensor, t: Tensor, inputs: dict[str, Tensor]) -> Tensor:
        """One call of the denoiser on x_t, float timesteps t and the conditioning inputs  [b, C, h, w]."""
        return self.unet(x, t, **inputs).sample

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [0, 1]  [B, 3, H, W]: z / scaling_factor + shift_factor through the VAE."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        x = self.vae.decode(z).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def with_unet(self, unet) -> DiffusionPolicy:
        """The same policy predicting with another UNet (a copy in float64, a wrapped one): a shallow view."""
        view = copy.copy(self)
        view.unet = unet
        return view

    def reference_policy(self) -> DiffusionPolicy:
        """The frozen pretrained policy pi_ref: adapters off for LoRA, the frozen copy for full finetuning."""
        if self.finetune == "lora":
            return _AdaptersOff(self)
        if self._reference_unet is None:
            raise RuntimeError("call keep_reference() before training starts (full finetuning)")
        return self.with_unet(self._reference_unet)

    def keep_reference(self) -> None:
        """Full finetuning: snapshot the pretrained UNet as pi_ref (LoRA needs no copy)."""
        if self.finetune == "full" and self._reference_unet is None:
            self._reference_unet = copy.deepcopy(_unwrap(self.unet)).requires_grad_(False).eval()

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must hold: the LoRA adapter, or the whole UNet."""
        base = _unwrap(self.unet)
        if self.finetune == "lora":
            from peft import get_peft_model_state_dict

            return get_peft_model_state_dict(base)
        return base.state_dict()

    # ------------------------------------------------------------------ leaving rlft
    pipeline_class = "StableDiffusionPipeline"  # the diffusers class an export loads with

    def drawing_settings(self) -> dict:
        """The loading options besides the weights that change what the model draws (an export records
        them, so that rlft.sample loads it the same way)."""
        return {}

    def _lora_layers(self) -> tuple[dict[str, Tensor], dict]:
        """The adapter (peft's keys), and its rank, alpha and targets (the metadata diffusers reads)."""
        from peft import get_peft_model_state_dict

        base = _unwrap(self.unet)
        config = base.peft_config["default"]
        metadata = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}
        return get_peft_model_state_dict(base), metadata

    def save_export(self, out: Path, scheduler) -> str:
        """Write the finetuned model to ``out`` in diffusers' format: the LoRA adapter
        (pytorch_lora_weights.safetensors), or the whole pipeline with ``scheduler``; returns the kind."""
        from diffusers import StableDiffusionPipeline

        if self.finetune == "lora":
            from diffusers.utils import convert_state_dict_to_diffusers

            layers, metadata = self._lora_layers()  # the UNet's adapter in diffusers' own key layout
            layers = convert_state_dict_to_diffusers(layers)
            StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
            return "lora"
        save_pipeline(out, self.tokenizer, self.text_encoder, _unwrap(self.unet), self.vae, scheduler)
        return "full"

    def load_lora(self, directory: Path, weight_name: str, scheduler) -> None:
        """Load an exported adapter into this (base, ``finetune=full``) policy's UNet, as diffusers does."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.load_lora_weights(str(directory), weight_name=weight_name)

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        base = _unwrap(self.unet)
        if self.finetune == "lora":
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(base, state)
            if getattr(result, "unexpected_keys", None):
                raise RuntimeError(f"checkpoint adapter has unexpected keys: {result.unexpected_keys[:3]}")
        else:
            base.load_state_dict(state)


class _AdaptersOff:
    """pi_ref of a LoRA policy (any family): the policy with its adapters disabled around each prediction."""

    def __init__(self, policy: DiffusionPolicy):
        self._policy = policy

    def __getattr__(self, name: str):
        if name == "_policy":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self._policy, name)

    def with_unet(self, unet) -> _AdaptersOff:
        return _AdaptersOff(self._policy.with_unet(unet))

    def predict(self, x: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float) -> Tensor:
        base = _unwrap(self._policy.unet)
        base.disable_adapters()
        try:
            return self._policy.predict(x, t, cond, guidance_scale)
        finally:
            base.enable_adapters()


def load_pipeline(
    path: str, revision: str | None = None, variant: str | None = None, builder: str | None = None, **parts
):
    """A pipeline from the hub or a local directory; its class is the one model_index.json names.

    ``builder``: dotted path of a function ``f(path)`` that writes the pipeline when ``path`` does not
    exist yet (used by ``model=tiny_random`` and ``model=tiny_random_sd3``). ``parts``: components
    given instead of loaded (None: left out, e.g. SD3's T5).
    """
    from diffusers import DiffusionPipeline
    from hydra.utils import get_object

    if builder:
        ensure_built(path, get_object(builder))
    local = Path(path).is_dir()
    if not local and path.startswith((".", "/", "~")):
        raise ConfigError("model.path", f"'{path}' does not exist", "set model.path to a diffusers directory")
    try:
        return DiffusionPipeline.from_pretrained(
            path,
            revision=revision,
            variant=variant,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=local or None,
            **parts,
        )
    except (OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            "model.path",
            f"cannot load a diffusers pipeline from '{path}': {first}",
            "set model.path to a local directory with model_index.json and the pipeline's parts "
            "(or a hub id when online)",
        ) from None


def policy_class(path: str, pipeline: str | None = None) -> type:
    """The policy family of a pipeline: SD3Policy for Stable Diffusion 3, FluxPolicy for FLUX, else
    DiffusionPolicy. The class is ``pipeline`` when given (an export records it), else the one
    model_index.json names (a local directory, or the hub's or the cache's copy of it)."""
    if pipeline is None:
        index = Path(path).expanduser() / "model_index.json"
        if index.is_file():
            pipeline = json.loads(index.read_text()).get("_class_name", "")
        else:
            from diffusers import DiffusionPipeline

            try:
                pipeline = DiffusionPipeline.load_config(path).get("_class_name", "")
            except (OSError, ValueError):  # not reachable: from_pretrained says so with the fix
                pipeline = ""
    if pipeline.startswith("StableDiffusion3"):
        from rlft.sd3 import SD3Policy

        return SD3Policy
    if pipeline == "FluxPipeline":
        from rlft.flux import FluxPolicy

        return FluxPolicy
    return DiffusionPolicy


def _unwrap(module):
    return getattr(module, "module", module)


def ensure_built(path, build) -> Path:
    """``path``, written by ``build(path)`` (atomically) first when it does not exist yet."""
    if not Path(path).expanduser().exists():
        build_atomically(build, str(path))
    return Path(path)


def build_atomically(build, path: str) -> None:
    """Run ``build(tmpdir)`` and move the result to ``path`` (safe when several processes race)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- writing pipelines
def sd_scheduler():
    """Stable Diffusion's noise schedule (scaled linear betas 0.00085-0.012, 1000 steps), as a DDIM scheduler."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def save_pipeline(path, tokenizer, text_encoder, unet, vae, scheduler) -> None:
    """Write the parts as a StableDiffusionPipeline directory (no safety checker), loadable by from_pretrained."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)


# --------------------------------------------------------------------------- tiny random SD


def _char_bpe_tokenizer(directory: Path, max_length: int):
    """A CLIP BPE tokenizer over single characters (no merges): vocab.json + merges.txt, no download."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)


def build_tiny_random(path: str, seed: int = 0, resolution: int = 32) -> None:
    """Write a tiny random-initialised Stable Diffusion pipeline (same classes, same layout).

    32x32 images, a VAE that downsamples 4x (8x8x4 latents), a 2-block UNet with
    cross-attention, a 2-layer CLIP text encoder and a character-level CLIP tokenizer.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    out = Path(path)
    tokenizer = _char_bpe_tokenizer(out / "_tok_src", max_length=32)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    save_pipeline(out, tokenizer, text_encoder, unet, vae, sd_scheduler())
    shutil.rmtree(out / "_tok_src", ignore_errors=True)
