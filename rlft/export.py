"""`python -m rlft.export <run dir | checkpoint dir> <out dir>`: a finetuned model in diffusers' formats.

    full finetuning  <out>/ is a StableDiffusionPipeline directory (the finetuned UNet, the base
                     model's other parts, and the scheduler the run sampled with; for SD3 a
                     StableDiffusion3Pipeline with the finetuned transformer):
                         pipe = StableDiffusionPipeline.from_pretrained("<out>")
    LoRA             <out>/pytorch_lora_weights.safetensors, the adapter in the layout (and with
                     the rank and alpha) that diffusers reads (the UNet's or SD3's transformer's):
                         pipe = StableDiffusionPipeline.from_pretrained("<base model>")
                         pipe.load_lora_weights("<out>")

Both write <out>/rlft_export.json: the base model, the checkpoint, and the sampler the run
trained with (scheduler, steps, eta, guidance scale), which `python -m rlft.sample <out>` reads.
A run directory exports its latest complete checkpoint; a run with ``trainer.ema_decay`` exports its
moving-average weights (the ones its evaluations scored). Nothing is unpickled (rlft/checkpoint.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from rlft import checkpoint as ckpt
from rlft.errors import RlftError

EXPORT_FILE = "rlft_export.json"
LORA_FILE = "pytorch_lora_weights.safetensors"


def find_checkpoint(source: Path) -> Path:
    """``source`` itself when it is a complete checkpoint, else the latest one of the run it names."""
    source = Path(source).expanduser()
    if (source / ckpt.COMPLETE_MARKER).exists():
        return source
    if not source.exists():
        raise RlftError(f"{source} does not exist (name a run directory or one of its checkpoints/epoch_* folders)")
    done = ckpt.complete_checkpoints(source)
    if not done:
        raise RlftError(f"{source} holds no complete checkpoint (checkpoints/epoch_*/{ckpt.COMPLETE_MARKER})")
    return done[-1]


def load_finetuned(source: Path, base: str | None = None):
    """(policy with the checkpoint's trainable weights, the run's resolved config, the checkpoint).
    ``base`` replaces the run's model.path (a base model that moved since the run)."""
    from rlft.config import build

    checkpoint = find_checkpoint(source)
    marker, trainable, _ = ckpt.read(checkpoint)
    ema = ckpt.read_ema(checkpoint)
    if ema is not None:  # trainer.ema_decay: the moving average is the model the run evaluated
        trainable = ema
    cfg = OmegaConf.create(marker["config"])
    if base is not None:
        cfg.model.path = str(base)
    elif not Path(cfg.model.path).exists() and str(cfg.model.path).startswith("/"):
        raise RlftError(
            f"the run's base model {cfg.model.path} does not exist here; pass --base <its directory or hub id>"
        )
    cfg.model.builder = None  # a base model that would have to be built is not the run's base
    policy = build(cfg.model, "model")
    try:
        policy.load_trainable_state_dict(trainable)
    except (KeyError, RuntimeError, ValueError) as e:
        raise RlftError(f"{checkpoint} does not fit the base model {cfg.model.path}: {e}") from None
    policy.unet.eval()
    return policy, cfg, checkpoint


# runs and exports before samplers were components named the family in sampler.scheduler
_FAMILIES = {"ddim": "rlft.sampling.DDIM", "ddpm": "rlft.sampling.DDPM"}


def sampler_settings(sampler) -> dict:
    """A sampler component's config as a plain dict (``_target_`` and its values), from a run's
    ``cfg.sampler`` or an export's record; an older record's ``scheduler: ddim|ddpm`` becomes its target."""
    settings = dict(OmegaConf.to_container(sampler, resolve=True) if OmegaConf.is_config(sampler) else sampler)
    family = settings.pop("scheduler", None)
    if "_target_" not in settings and family is not None:
        settings["_target_"] = _FAMILIES[family]
        if family == "ddpm":
            settings.pop("eta", None)
    return settings


def build_sampler(settings: dict, scheduler_config):
    """The sampler of ``settings`` (:func:`sampler_settings`), set up on a model's scheduler config."""
    from rlft.config import build, validate_component

    node = OmegaConf.create(settings)
    validate_component("sampler", node, training=False)
    return build(node, "sampler").setup(scheduler_config)


def export(source: Path, out: Path, base: str | None = None) -> Path:
    """Write the finetuned model of ``source`` (run or checkpoint) to ``out``; returns ``out``."""
    policy, cfg, checkpoint = load_finetuned(source, base)
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise RlftError(f"{out} exists and is not empty; choose a new output directory")
    out.mkdir(parents=True, exist_ok=True)
    scheduler = build_sampler(sampler_settings(cfg.sampler), policy.scheduler_config).scheduler
    kind = policy.save_export(out, scheduler)
    info = {
        "kind": kind,
        "pipeline": policy.pipeline_class,
        "model_settings": policy.drawing_settings(),  # e.g. SD3's resolution and T5 tokens
        "base_model": str(cfg.model.path),
        "checkpoint": str(checkpoint.resolve()),
        "seed": cfg.seed,
        "eval_seed": cfg.trainer.eval_seed,
        "sampler": sampler_settings(cfg.sampler),
        "scheduler_config": dict(scheduler.config),
    }
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=1, default=str))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlft.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a run directory (its latest checkpoint) or a checkpoint")
    parser.add_argument("out", type=Path, help="a new directory for the export")
    parser.add_argument("--base", help="the base model, where it has moved since the run (a directory or hub id)")
    args = parser.parse_args(argv)
    from rlft.models import quiet_libraries

    quiet_libraries()
    try:
        out = export(args.source, args.out, args.base)
    except RlftError as e:
        print(f"rlft.export: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    info = json.loads((out / EXPORT_FILE).read_text())
    if info["kind"] == "lora":
        print(f"LoRA adapter written to {out / LORA_FILE}; load it with pipe.load_lora_weights({str(out)!r})")
    else:
        print(f"pipeline written to {out}; load it with {info['pipeline']}.from_pretrained({str(out)!r})")


if __name__ == "__main__":
    main()
