"""`python -m rlft.sample <source> prompts=... [key=value ...]`: captioned images from a model.

<source> is a run directory (its latest checkpoint), a checkpoint directory, a directory that
`python -m rlft.export` wrote, or any diffusers Stable Diffusion (1.x or 3) pipeline (hub id or path).
Images are sampled as the run evaluates: image i of the list (each prompt repeated
``images_per_prompt`` times) from the noise of generator (seed, EVAL, eval_seed, i)
(rlft/seeding.py), with the run's sampler. So `rlft.sample <run> prompts=<its evaluation
prompts>` redraws the run's own evaluation images.

    prompts=...            "a cat|a dog" (separated by |) or a prompt file (.txt, .json, .jsonl, .csv)
    out=samples            where the PNGs and grid.png go
    images_per_prompt=1
    seed, eval_seed, num_steps, eta, noise_level, guidance_scale, batch_size   (default: the run's,
                           else the sampler defaults: DDIM, or the Euler ODE for a flow model)
    sampler=flow_ode       another sampler family with its defaults (ddim, ddpm, flow_sde, flow_ode),
                           e.g. a flow run's images by the deterministic ODE

The same from Python: ``images, prompts = generate(source, ["a cat"])``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rlft import checkpoint as ckpt
from rlft.errors import ConfigError, RlftError

KEYS = {
    "prompts": str,
    "out": str,
    "images_per_prompt": int,
    "seed": int,
    "eval_seed": int,
    "num_steps": int,
    "eta": float,
    "noise_level": float,
    "guidance_scale": float,
    "sampler": str,
    "batch_size": int,
}


SAMPLERS = {  # the sampler=... setting: the sampler group's options
    "ddim": "rlft.sampling.DDIM",
    "ddpm": "rlft.sampling.DDPM",
    "flow_sde": "rlft.flow_sampling.FlowSDE",
    "flow_ode": "rlft.flow_sampling.FlowODE",
}


def _is_run(source: Path) -> bool:
    return (source / ckpt.COMPLETE_MARKER).exists() or bool(ckpt.complete_checkpoints(source))


def load_model(source: str):
    """(policy, settings): settings holds the sampler, seed and eval_seed the source was trained with."""
    from rlft.config import TrainerConfig
    from rlft.export import EXPORT_FILE, LORA_FILE, build_sampler, load_finetuned, sampler_settings
    from rlft.flow_sampling import FlowODE
    from rlft.models import policy_class
    from rlft.sampling import DDIM

    path = Path(source).expanduser()
    if path.is_dir() and _is_run(path):
        policy, cfg, _ = load_finetuned(path)
        return policy, {**sampler_settings(cfg.sampler), "seed": cfg.seed, "eval_seed": cfg.trainer.eval_seed}
    export = path / EXPORT_FILE
    if export.is_file():
        info = json.loads(export.read_text())
        settings = {**sampler_settings(info["sampler"]), "seed": info["seed"], "eval_seed": info["eval_seed"]}
        drawing = info.get("model_settings", {})
        if info["kind"] == "lora":  # the base model with the adapter
            family = policy_class(info["base_model"], info.get("pipeline"))
            policy = family.from_pretrained(info["base_model"], finetune="full", **drawing)
            scheduler = build_sampler(_sampler_part(settings), policy.scheduler_config).scheduler
            policy.load_lora(path, LORA_FILE, scheduler)
            policy.unet.eval()
            return policy, settings
        policy = policy_class(source, info.get("pipeline")).from_pretrained(source, finetune="full", **drawing)
    else:  # a plain pipeline: its family's default sampler (a flow model: the Euler ODE, as its pipeline)
        policy = policy_class(source).from_pretrained(source, finetune="full")
        default = (FlowODE if policy.flow_matching else DDIM)(**_guidance(policy))
        settings = {**default.settings(), "seed": 0, "eval_seed": TrainerConfig().eval_seed}
    policy.unet.eval()
    return policy, settings


def _guidance(policy) -> dict:
    """The sampler's guidance scale where the family has its own (FLUX: 1, its guidance is distilled)."""
    return {} if policy.default_guidance_scale is None else {"guidance_scale": policy.default_guidance_scale}


def _sampler_part(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("seed", "eval_seed")}


def read_prompts(value: str) -> list[str]:
    """``a|b`` or a prompt file (rlft.data's formats: one prompt per line or row)."""
    path = Path(value).expanduser()
    if path.suffix and path.is_file():
        from rlft.data import PromptFile

        dataset = PromptFile(str(path))
        return [dataset[i].text for i in range(len(dataset))]
    prompts = [p.strip() for p in value.split("|") if p.strip()]
    if not prompts:
        raise ConfigError("prompts", "holds no prompt", 'give prompts="a cat|a dog" or a prompt file')
    return prompts


@torch.no_grad()
def generate(source, prompts: list[str], images_per_prompt: int = 1, **overrides):
    """Images [N, 3, H, W] in [0, 1] and their prompts (each repeated ``images_per_prompt`` times),
    sampled as the run evaluates (module docstring); ``overrides`` replace the settings' values."""
    from hydra.utils import get_object

    from rlft.export import build_sampler
    from rlft.seeding import EVAL, sample_noise

    policy, settings = load_model(str(source))
    unknown = set(overrides) - set(KEYS)
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown setting", f"known: {', '.join(KEYS)}")
    family = overrides.pop("sampler", None)
    if family is not None:  # another sampler family (its defaults), e.g. the flow ODE for a flow run
        if family not in SAMPLERS:
            raise ConfigError("sampler", f"unknown sampler '{family}'", f"known: {', '.join(SAMPLERS)}")
        settings = {
            **get_object(SAMPLERS[family])(**_guidance(policy)).settings(),
            "seed": settings["seed"],
            "eval_seed": settings["eval_seed"],
        }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    sampler = build_sampler(_sampler_part(settings), policy.scheduler_config)
    every = [p for p in prompts for _ in range(images_per_prompt)]
    images = []
    for start in range(0, len(every), sampler.batch_size):
        chunk = every[start : start + sampler.batch_size]
        keys = [(settings["seed"], EVAL, settings["eval_seed"], start + i) for i in range(len(chunk))]
        traj = sampler.sample(
            policy,
            policy.encode(chunk, sampler.negative_prompt),
            sample_noise(keys, sampler.num_steps, policy.latent_shape),
            lambda lp: lp.mean(dim=(1, 2, 3)),
        )
        images.append(traj.images)
    return torch.cat(images), every


def save(images: torch.Tensor, prompts: list[str], out: Path) -> list[Path]:
    """One PNG per image (NNN.png) and a captioned grid.png in ``out``."""
    from PIL import Image

    from rlft.loggers import captioned_grid
    from rlft.rewards.base import to_uint8

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        files.append(out / f"{i:03d}.png")
        Image.fromarray(to_uint8(image).permute(1, 2, 0).numpy()).save(files[-1])
    captioned_grid(images, prompts).save(out / "grid.png")
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return files


def _parse(argv: list[str]) -> tuple[str, dict]:
    if not argv or "=" in argv[0]:
        raise RlftError('usage: python -m rlft.sample <run | checkpoint | model dir> prompts="a cat|a dog" [key=value]')
    values = {}
    for item in argv[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ConfigError(key, "is not a setting of rlft.sample", f"known: {', '.join(KEYS)}")
        try:
            values[key] = KEYS[key](value)
        except ValueError:
            raise ConfigError(key, f"'{value}' is not a {KEYS[key].__name__}") from None
    if "prompts" not in values:
        raise ConfigError("prompts", "is required", 'give prompts="a cat|a dog" or a prompt file')
    return argv[0], values


def main(argv: list[str] | None = None) -> None:
    from rlft.models import quiet_libraries

    try:
        source, values = _parse(sys.argv[1:] if argv is None else argv)
        quiet_libraries()
        prompts = read_prompts(values.pop("prompts"))
        out = Path(values.pop("out", "samples"))
        images, every = generate(source, prompts, values.pop("images_per_prompt", 1), **values)
        save(images, every, out)
    except RlftError as e:
        print(f"rlft.sample: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(f"{len(images)} images of {len(prompts)} prompt(s) written to {out} (grid: {out / 'grid.png'})")


if __name__ == "__main__":
    main()
