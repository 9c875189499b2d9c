"""Pretrain the flow toy model (``model=toy_flow``): the toy world's scenes in Stable Diffusion 3's
architecture, trained by flow matching; written as a ``StableDiffusion3Pipeline`` directory.

    python -m rlft.toy.pretrain_flow --out rlft/toy/flow_weights     # part of `make toy-weights`

The scenes and the VAE are the UNet toy's (rlft/toy/pretrain.py: the same rendered train-split
images, and its trained VAE, given by ``--vae-from``), with the latents standardised by a
``shift_factor`` (their mean) and a ``scaling_factor`` (1 / their std), as SD3's VAE config has.
The text side is SD3's without T5 (the pipeline then feeds zeros in T5's place): two word-level
CLIP encoders with projections, whose penultimate states are joined and whose pooled
projections condition the MMDiT (``SD3Transformer2DModel``: 6 joint blocks, 1x1 patches on the
8x8x8 latents, so each latent position is a token). The loss is rectified flow's (SD3, Esser et
al. 2024, eq. 6 with the logit-normal time density of section 3.1):

    x_t = (1 - t) x_0 + t eps,   t = sigmoid(n), n ~ N(0, 1),   L = || v_theta(x_t, t, c) - (eps - x_0) ||^2

with 10% of prompts dropped to "" for classifier-free guidance and an EMA(0.999) of the weights.
The conditioning is computed by :func:`encode` exactly as ``StableDiffusion3Pipeline.encode_prompt``
does (tests/test_toy_flow.py checks it on the written pipeline), so training sees what sampling
feeds. Stopped at any point, the same command continues where it was (``<out>.work/``), with every
batch and noise draw from a generator seeded by (seed, stage, step), as rlft/toy/pretrain.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlft.toy.pretrain import (
    MAX_TOKENS,
    _batch,
    _Checkpoint,
    _lr,
    _step_generator,
    build_tokenizer,
    render_dataset,
)

# transformers' CLIP pools the state at the highest token id when eos_token_id is 2 (its legacy rule)
# and at the first end-of-text token otherwise: the pooled embedding, which conditions every SD3
# block, must see the whole prompt, so end of text is id 3 here
FLOW_SPECIALS = ("<|pad|>", "<|startoftext|>", "<|unk|>", "<|endoftext|>")
FLOW_STAGE = 3  # the first part of every generator key of this stage (the UNet toy's are 1 and 2)
T5_TOKENS = 1  # the zeros the pipeline puts in T5's place (no T5 here): one token
CLIP_HIDDEN, CLIP_PROJECTION, JOINT_DIM = 64, 32, 128
SAVE_EVERY = 500  # steps between resumable states


def build_flow_models(tokenizer, seed: int, latent_channels: int = 8, latent_side: int = 8):
    """Random-initialised text encoders (two CLIPs with projections) and MMDiT of the flow toy."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                projection_dim=CLIP_PROJECTION, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )
        )  # fmt: skip

    text_encoder, text_encoder_2 = clip(), clip()
    transformer = SD3Transformer2DModel(
        sample_size=latent_side, patch_size=1, in_channels=latent_channels, out_channels=latent_channels,
        num_layers=6, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=JOINT_DIM,
        caption_projection_dim=128, pooled_projection_dim=2 * CLIP_PROJECTION, pos_embed_max_size=latent_side,
    )  # fmt: skip
    return text_encoder, text_encoder_2, transformer


def flow_scheduler():
    """Rectified flow's Euler scheduler, unshifted: an 8x8 latent needs none of SD3's shift for 1 MP."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def encode(text_encoder, text_encoder_2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token states [B, L + T5_TOKENS, JOINT_DIM], pooled [B, 2 P]) as SD3's encode_prompt builds
    them without T5: each CLIP's penultimate hidden states, joined on features and zero-padded to
    the joint width, then T5's zeros; the two pooled projections joined."""
    one, two = (e(ids, output_hidden_states=True) for e in (text_encoder, text_encoder_2))
    states = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
    states = F.pad(states, (0, JOINT_DIM - states.shape[-1]))
    t5 = states.new_zeros(len(ids), T5_TOKENS, JOINT_DIM)
    return torch.cat([states, t5], dim=-2), torch.cat([one.text_embeds, two.text_embeds], dim=-1)


def train_flow(text_encoders, transformer, latents, ids, empty_ids, steps, batch, lr, seed, log, work=None) -> float:
    """Flow matching (module docstring); text encoders and transformer trained together."""
    from diffusers.training_utils import EMAModel

    modules = [*text_encoders, transformer]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    emas = [EMAModel(m.parameters(), decay=0.999) for m in modules]
    ckpt, start, loss_avg = _Checkpoint(work, "flow", SAVE_EVERY), 0, 0.0
    state = ckpt.load()
    if state is not None:
        for m, s in zip(modules, state["modules"]):
            m.load_state_dict(s)
        for e, s in zip(emas, state["emas"]):
            e.load_state_dict(s)
        opt.load_state_dict(state["opt"])
        start, loss_avg = state["step"], state["loss_avg"]
        log(f"flow: resumed at step {start}")
    for m in modules:
        m.train()
    for step in range(start, steps):
        g = _step_generator(seed, FLOW_STAGE, step)
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        idx = _batch(len(latents), batch, g)
        x0, tokens = latents[idx], ids[idx].clone()
        tokens[torch.rand(len(idx), generator=g) < 0.1] = empty_ids
        t = torch.sigmoid(torch.randn(len(idx), generator=g))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=g)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        states, pooled = encode(*text_encoders, tokens)
        v = transformer(
            hidden_states=xt, timestep=t * 1000, encoder_hidden_states=states, pooled_projections=pooled,
            return_dict=False,
        )[0]  # fmt: skip
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for m, e in zip(modules, emas):
            e.step(m.parameters())
        loss_avg = 0.98 * loss_avg + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == steps - 1:
            log(f"flow step {step:5d}/{steps}  loss {loss_avg:.4f}")
        ckpt.maybe_save(
            step,
            steps,
            lambda la=loss_avg: {
                "modules": [m.state_dict() for m in modules],
                "emas": [e.state_dict() for e in emas],
                "opt": opt.state_dict(),
                "loss_avg": la,
            },
        )
    for m, e in zip(modules, emas):
        e.copy_to(m.parameters())
        m.eval()
    return loss_avg


@torch.no_grad()
def standardised_latents(vae, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Posterior means as SD3's VAE config reads them: (z - shift_factor) * scaling_factor, with the
    mean and 1 / std of z written into the config  [n, C, h, w]."""
    z = torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (z - shift) * scale


def pretrain_flow(
    out: str,
    vae_from: str,
    images: int = 96_000,
    steps: int = 2000,
    batch: int = 64,
    seed: int = 0,
    log=print,
    work: str | None = None,
) -> dict:
    """Writes the flow toy pipeline to ``out`` and returns its summary (also saved as pretrain.json)."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    start = time.time()
    work_dir = Path(work) if work is not None else Path(str(out).rstrip("/") + ".work")
    clock = work_dir / "wall.json"
    earlier = json.loads(clock.read_text())["wall_s"] if clock.is_file() else 0.0

    def log_and_clock(message: str) -> None:
        log(message)
        work_dir.mkdir(parents=True, exist_ok=True)
        clock.write_text(json.dumps({"wall_s": earlier + time.time() - start}))

    tokenizer = build_tokenizer(FLOW_SPECIALS)
    vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae").eval()
    pixels, texts = render_dataset(images, seed)
    latents = standardised_latents(vae, pixels)
    text_encoder, text_encoder_2, transformer = build_flow_models(tokenizer, seed, latents.shape[1], latents.shape[-1])
    tok = lambda prompts: tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
    ids, empty_ids = tok(texts).input_ids, tok([""]).input_ids[0]
    log_and_clock(f"rendered and encoded {len(texts)} scenes in {time.time() - start:.0f} s")
    loss = train_flow(
        [text_encoder, text_encoder_2], transformer, latents, ids, empty_ids, steps, batch, 1e-3, seed,
        log_and_clock, work_dir,
    )  # fmt: skip
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None,
    ).save_pretrained(out)  # fmt: skip
    # no T5: model_index.json omits text_encoder_3 and tokenizer_3; load with text_encoder_3=None,
    # tokenizer_3=None (diffusers' way to drop T5), which SD3Policy.from_pretrained passes for it
    summary = {
        "images": images,
        "vae_from": str(vae_from),
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "loss": round(loss, 5),
        "parameters": {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "text_encoders": sum(p.numel() for m in (text_encoder, text_encoder_2) for p in m.parameters()),
        },
        "objective": "rectified flow, logit-normal(0, 1) times, v = eps - x0",
        "wall_s": round(earlier + time.time() - start, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    Path(out, "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    if os.path.isdir(work_dir):
        shutil.rmtree(work_dir, ignore_errors=True)
    log(f"wrote {out} in {summary['wall_s']} s")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "flow_weights"))
    parser.add_argument("--vae-from", default=str(Path(__file__).parent / "weights"), help="the UNet toy's pipeline")
    parser.add_argument("--images", type=int, default=96_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain_flow(args.out, args.vae_from, args.images, args.steps, args.batch, args.seed)


if __name__ == "__main__":
    main()
