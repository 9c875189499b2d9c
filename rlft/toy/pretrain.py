"""Pretrain the toy text-to-image model on rendered scenes; write it in the diffusers layout.

    python -m rlft.toy.pretrain --out rlft/toy/weights      # make toy-weights (~2 h on 2 CPU cores)
    # more pretraining of a trained model, here on 80% relation scenes:
    python -m rlft.toy.pretrain --out DIR --init-from rlft/toy/weights --unet-steps 1200 --unet-lr 3e-4 \\
        --relation-share 0.8

Stopped at any point, the same command continues where it was: every stage keeps its state
(weights, optimizer, EMA, step) in ``<out>.work/`` every few hundred steps, and every batch and
every noise draw comes from a generator seeded by (seed, stage, step), so a resumed run ends
with the same weights as an uninterrupted one.

The result is a ``StableDiffusionPipeline`` directory (model_index.json,
tokenizer/, text_encoder/, unet/, vae/, scheduler/) that ``model=toy`` loads
with the same code as Stable Diffusion. Three stages, all on train-split
prompts only (the unseen split is never shown):

1. render ``--images`` scenes (half single-object, half two-object prompts) at 32x32;
2. train a small AutoencoderKL (32x32x3 -> 8x8x8, a 4x factor as in PXPO's pooling; eight
   latent channels, because four blur squares into circles and shift colours) on them,
   encode every image, and set ``scaling_factor`` = 1 / std(latents);
3. train a word-level CLIP text encoder and a UNet2DConditionModel jointly with
   the v-prediction loss, 10% of prompts dropped to "" for classifier-free
   guidance, with an exponential moving average of weights.

The noise schedule is Stable Diffusion's scaled-linear betas rescaled to a zero
terminal SNR, sampled with "trailing" timesteps (Lin et al., "Common Diffusion
Noise Schedules and Sample Steps are Flawed", WACV 2024, sections 3.1-3.3; v-prediction
because epsilon cannot be predicted at SNR 0). With SD's own schedule, x_T keeps
sqrt(abar_T) = 0.068 of the image; on an 8x8x8 latent that leak is enough to read
where the object is, so a model trained on it places objects by the noise and
ignores "in the top right corner": the previous toy model's place sub-score was
0.18 (chance 0.11), and 1,500 steps of this loss on it raised it to 0.72
(experiments/README.md, "The toy model").

Everything is seeded; on one machine with the same thread count the same
arguments give the same weights (tests/test_toy.py runs a few steps twice).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlft.errors import RlftError
from rlft.seeding import seeded_generator
from rlft.toy.grammar import (
    BACKGROUNDS,
    COLOR_NAMES,
    N_SINGLE,
    PALETTE,
    PLACES,
    PLURALS,
    RELATIONS,
    SHAPES,
    decode,
    split_codes,
)
from rlft.toy.render import BASE_SIZE, render

MAX_TOKENS = 20  # longest grammar prompt: 15 words + start + end
LATENT_CHANNELS = 8
VAE_STAGE, UNET_STAGE = 1, 2  # the first part of every generator key of a stage


def vocabulary() -> list[str]:
    """Every word of the grammar (a word-level tokenizer needs no merges)."""
    words = {"a", "an", "two", "three", "small", "large", "on", "background"}
    words |= set(PALETTE) | set(SHAPES) | set(PLURALS.values())
    for phrase in (*PLACES.values(), *RELATIONS):
        words |= set(phrase.split())
    return sorted(words)


SPECIALS = ("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>")


def build_tokenizer(specials: tuple[str, ...] = SPECIALS):
    """A word-level tokenizer (lower-cased, whitespace-split, start/end tokens), saved as tokenizer.json;
    ``specials`` in id order (the UNet toy's: end of text at id 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    vocab = {w: i for i, w in enumerate(specials + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        model_max_length=MAX_TOKENS,
    )


def build_models(tokenizer, seed: int):
    """Random-initialised text encoder, VAE and UNet of the toy architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
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
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=BASE_SIZE,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=BASE_SIZE // 4,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return text_encoder, vae, unet


def toy_scheduler():
    """The toy model's schedule: SD's betas rescaled to zero terminal SNR, trailing timesteps,
    v-prediction (a DDIM scheduler; ``sampler=ddpm`` reads the same config)."""
    from diffusers import DDIMScheduler

    from rlft.models import sd_scheduler

    return DDIMScheduler.from_config(
        sd_scheduler().config,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
    )


def render_dataset(n: int, seed: int, relation_share: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered train-split scenes, a ``relation_share`` of them two-object (relation) prompts and
    the rest single-object ones  ([n,3,32,32] in [-1,1], texts)."""
    rng = np.random.default_rng(seed)
    train = split_codes("train")
    singles, relations = train[train < N_SINGLE], train[train >= N_SINGLE]
    codes = np.where(
        rng.random(n) < 1 - relation_share, rng.choice(singles, n), rng.choice(relations, n)
    )  # one draw per image, in a fixed order
    scenes = [decode(c) for c in codes]
    images = np.stack([render(s, rng) for s in scenes])
    return torch.from_numpy(images) * 2 - 1, [s.text() for s in scenes]


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    """The generator of one training step: its batch, dropout and noise depend on nothing else."""
    return seeded_generator(seed, stage, step)


def _batch(n: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """``batch`` distinct indices of ``n``."""
    return torch.randperm(n, generator=g)[:batch]


class _Checkpoint:
    """One stage's resumable state in ``work/<name>.pt``, written atomically every ``every`` steps."""

    def __init__(self, work: Path | None, name: str, every: int):
        self.path = None if work is None else Path(work) / f"{name}.pt"
        self.every = every

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        return torch.load(self.path, weights_only=True)

    def maybe_save(self, step: int, steps: int, state) -> None:
        """After ``step`` (0-based) when a period ends (never after the last step: the stage's result is)."""
        if self.path is None or (step + 1) % self.every or step + 1 == steps:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": step + 1, **state()}, tmp)
        os.replace(tmp, self.path)


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, lr: float, seed: int, log, work=None) -> float:
    """Reconstruction (MSE) + 1e-6 KL, as SD's KL-f8 autoencoder, at a 4x factor."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt, start, loss_avg = _Checkpoint(work, "vae", 250), 0, 0.0
    saved = ckpt.load()
    if saved is not None:
        vae.load_state_dict(saved["vae"])
        opt.load_state_dict(saved["opt"])
        start, loss_avg = saved["step"], saved["loss_avg"]
        log(f"vae: resumed at step {start}")
    vae.train()
    for step in range(start, steps):
        g = _step_generator(seed, VAE_STAGE, step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        x = images[_batch(len(images), batch, g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # unclipped at lr 2e-3 it diverged
        opt.step()
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps}  loss {loss_avg:.5f}")
        ckpt.maybe_save(
            step, steps, lambda la=loss_avg: {"vae": vae.state_dict(), "opt": opt.state_dict(), "loss_avg": la}
        )
    vae.eval()
    return loss_avg


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 512, keep_scale: bool = False) -> torch.Tensor:
    """Posterior means, scaled by 1 / their std (written into the VAE config; with ``keep_scale``, by the
    config's scaling_factor, which a trained UNet was trained with)  [n, 8, 8, 8]."""
    z = torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])
    if not keep_scale:
        vae.register_to_config(scaling_factor=1.0 / z.std().item())
    return z * vae.config.scaling_factor


@torch.no_grad()
def reconstruction_accuracy(vae, images: torch.Tensor, latents: torch.Tensor) -> float:
    """Fraction of pixels whose palette colour (as toy_alignment reads it) survives encode + decode."""
    from rlft.toy.rewards import classify

    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return (classify(decoded / 2 + 0.5, 0.3) == classify(images / 2 + 0.5, 0.3)).float().mean().item()


def train_denoiser(
    text_encoder, unet, scheduler, latents, ids, empty_ids, steps, batch, lr, seed, log, work=None
) -> float:
    """The diffusion loss ||y - f_theta(sqrt(abar) z + sqrt(1 - abar) eps, t, c)||^2 with the scheduler's
    target y: v = sqrt(abar) eps - sqrt(1 - abar) z (v-prediction, Salimans & Ho 2022) or eps; text
    encoder and UNet trained together; prompts dropped to "" with probability 0.1; EMA(0.999) of both."""
    from diffusers.training_utils import EMAModel

    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema_unet, ema_text = EMAModel(unet.parameters(), decay=0.999), EMAModel(text_encoder.parameters(), decay=0.999)
    ckpt, start, loss_avg = _Checkpoint(work, "denoiser", 500), 0, 0.0
    state = ckpt.load()
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        start, loss_avg = state["step"], state["loss_avg"]
        log(f"unet: resumed at step {start}")
    text_encoder.train()
    unet.train()
    abar = scheduler.alphas_cumprod
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    for step in range(start, steps):
        g = _step_generator(seed, UNET_STAGE, step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = _batch(len(latents), batch, g)
        z0, tokens = latents[idx], ids[idx].clone()
        tokens[torch.rand(len(idx), generator=g) < 0.1] = empty_ids
        t = torch.randint(0, len(abar), (len(idx),), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, text_encoder(tokens)[0]).sample
        target = a.sqrt() * eps - (1 - a).sqrt() * z0 if v_prediction else eps
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"unet step {step:5d}/{steps}  loss {loss_avg:.4f}")
        ckpt.maybe_save(
            step,
            steps,
            lambda la=loss_avg: {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "ema_unet": ema_unet.state_dict(),
                "ema_text": ema_text.state_dict(),
                "loss_avg": la,
            },
        )
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    text_encoder.eval()
    unet.eval()
    return loss_avg


def _trained_denoiser(path: str, tokenizer):
    """The text encoder and UNet of the pretrained toy model at ``path``, to be trained further."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    parts = ("tokenizer", "text_encoder", "unet", "vae", "pretrain.json")
    if not all((Path(path) / part).exists() for part in parts):
        raise RlftError(f"{path} is not a pretrained toy model directory (it needs {', '.join(parts)})")
    if AutoTokenizer.from_pretrained(Path(path) / "tokenizer").get_vocab() != tokenizer.get_vocab():
        raise RlftError(f"{path} has another vocabulary than this grammar's: it cannot be pretrained further")
    return CLIPTextModel.from_pretrained(Path(path) / "text_encoder"), UNet2DConditionModel.from_pretrained(
        Path(path) / "unet"
    )


def pretrain(
    out: str,
    images: int = 96_000,
    vae_steps: int = 2500,
    unet_steps: int = 8000,
    batch: int = 64,
    seed: int = 0,
    log=print,
    work: str | None = None,
    vae_from: str | None = None,
    init_from: str | None = None,
    relation_share: float = 0.5,
    unet_lr: float = 1e-3,
) -> dict:
    """All three stages; writes the pipeline to ``out`` and returns a summary (also saved as pretrain.json).
    ``work`` (default ``<out>.work``) keeps the resumable state; it is removed when the pipeline is written.
    ``vae_from``: a toy pipeline directory whose VAE replaces stage 2 (an earlier run of the same
    stage: same images, steps and seed), recorded in the summary. ``init_from``: a toy pipeline
    directory whose VAE is kept and whose text encoder and UNet stage 3 continues from (more
    pretraining of a trained model, e.g. on more relation prompts: ``relation_share``, the fraction
    of two-object scenes, at peak learning rate ``unet_lr``)."""
    if not 0 <= relation_share <= 1:
        raise RlftError(f"relation_share is the fraction of two-object scenes, in [0, 1]; got {relation_share}")
    if init_from is not None:
        if vae_from not in (None, init_from):
            raise RlftError("init_from takes the VAE of the model it continues: leave vae_from unset")
        vae_from = init_from
    from rlft.models import save_pipeline

    start = time.time()
    work_dir = Path(work) if work is not None else Path(str(out).rstrip("/") + ".work")
    clock = work_dir / "wall.json"  # seconds spent by earlier, interrupted invocations
    earlier = json.loads(clock.read_text())["wall_s"] if clock.is_file() else 0.0

    def log_and_clock(message: str) -> None:
        log(message)
        work_dir.mkdir(parents=True, exist_ok=True)
        clock.write_text(json.dumps({"wall_s": earlier + time.time() - start}))

    tokenizer = build_tokenizer()
    if init_from is None:
        text_encoder, vae, unet = build_models(tokenizer, seed)
    else:  # the VAE comes from vae_from (= init_from) below
        text_encoder, unet = _trained_denoiser(init_from, tokenizer)
    scheduler = toy_scheduler()
    pixels, texts = render_dataset(images, seed, relation_share)
    log_and_clock(f"rendered {len(texts)} scenes in {time.time() - start:.0f} s")
    vae_done = work_dir / "vae_final.pt"
    if vae_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").eval()
        vae_loss = float(json.loads((Path(vae_from) / "pretrain.json").read_text())["vae_loss"])
        log_and_clock(f"vae: taken from {vae_from}")
    elif vae_done.is_file():
        state = torch.load(vae_done, weights_only=True)
        vae.load_state_dict(state["vae"])
        vae_loss = state["loss"]
        vae.eval()
        log_and_clock("vae: trained already (resumed)")
    else:
        vae_loss = train_vae(vae, pixels, vae_steps, batch, 1e-3, seed, log_and_clock, work_dir)
        torch.save({"vae": vae.state_dict(), "loss": vae_loss}, vae_done.with_suffix(".tmp"))
        os.replace(vae_done.with_suffix(".tmp"), vae_done)
    latents = encode_latents(vae, pixels, keep_scale=init_from is not None)
    vae_accuracy = reconstruction_accuracy(vae, pixels[:512], latents[:512])
    tok = lambda prompts: tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    ids, empty_ids = tok(texts).input_ids, tok([""]).input_ids[0]
    log_and_clock(
        f"vae done at {time.time() - start:.0f} s, scaling_factor {vae.config.scaling_factor:.4f}, "
        f"pixels whose palette colour survives encode+decode: {vae_accuracy:.4f}"
    )
    unet_loss = train_denoiser(
        text_encoder,
        unet,
        scheduler,
        latents,
        ids,
        empty_ids,
        unet_steps,
        batch,
        unet_lr,
        seed,
        log_and_clock,
        work=work_dir,
    )
    save_pipeline(out, tokenizer, text_encoder, unet, vae, scheduler)
    summary = {
        "images": images,
        "vae_steps": vae_steps,
        "vae_from": vae_from,
        "init_from": init_from,
        "relation_share": relation_share,
        "unet_lr": unet_lr,
        "unet_steps": unet_steps,
        "batch": batch,
        "seed": seed,
        "vae_loss": round(vae_loss, 6),
        "vae_pixel_accuracy": round(vae_accuracy, 4),
        "unet_loss": round(unet_loss, 5),
        "parameters": {
            "unet": sum(p.numel() for p in unet.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        },
        "latent_channels": LATENT_CHANNELS,
        "schedule": "scaled_linear, zero terminal SNR, trailing, v_prediction",
        "wall_s": round(earlier + time.time() - start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "palette": {"colors": list(COLOR_NAMES), "backgrounds": [b for b in BACKGROUNDS if b]},
    }
    Path(out, "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work_dir, ignore_errors=True)
    log(f"wrote {out} in {summary['wall_s']} s")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    parser.add_argument("--images", type=int, default=96_000)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--unet-steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-from", help="reuse the VAE of this toy pipeline directory (an earlier run's)")
    parser.add_argument(
        "--init-from", help="continue from this toy pipeline directory: its VAE, its text encoder and UNet trained on"
    )
    parser.add_argument("--relation-share", type=float, default=0.5, help="fraction of two-object scenes")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="peak learning rate of the denoiser stage")
    args = parser.parse_args()
    try:
        pretrain(
            args.out,
            args.images,
            args.vae_steps,
            args.unet_steps,
            args.batch,
            args.seed,
            vae_from=args.vae_from,
            init_from=args.init_from,
            relation_share=args.relation_share,
            unet_lr=args.unet_lr,
        )
    except RlftError as exc:  # a model that cannot be pretrained further: one line
        parser.error(str(exc))


if __name__ == "__main__":
    main()
