"""Run logging: metrics, sample grids, reward histograms and evaluation tables in the run directory,
mirrored to W&B.

Local files (``logger=none``): ``metrics.jsonl`` (one JSON object per logged step),
``samples/<key>_<step>.png`` (captioned grids), ``histograms.jsonl`` (every training reward of each
epoch) and ``tables/<key>_<step>.csv`` (one row per evaluation image: prompt, reward).
``logger=wandb`` also sends each to W&B (scalars, ``wandb.Image`` lists with captions,
``wandb.Histogram``, ``wandb.Table``): online when an API key is configured (``WANDB_API_KEY`` or
``wandb login``), otherwise offline into the run directory, with one line saying how to sync it.
Only the main process logs.
"""

from __future__ import annotations

import csv
import json
import math
import netrc
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

CONSOLE_FILE = "console.log"


def append_console(run_dir: Path, line: str) -> None:
    """Append a console line, with its time, to ``<run>/console.log``."""
    import time

    with open(Path(run_dir) / CONSOLE_FILE, "a") as f:
        f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {line}\n")


class LocalLogger:
    """metrics.jsonl (one JSON object per logged step) and PNG grids under ``samples/``."""

    def __init__(self, images_per_row: int = 4):
        self.images_per_row = images_per_row
        self.run_dir: Path | None = None

    def start(self, run_dir: Path, config: Mapping[str, Any], resume_epoch: int | None) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_epoch is not None and path.exists():
            # drop what a killed run logged after its last checkpoint (the resumed run redoes it), and a
            # last line that a kill cut short
            kept = [line for line in _json_lines(path) if json.loads(line).get("epoch", 0) <= resume_epoch]
            path.write_text("".join(line + "\n" for line in kept))
        elif path.exists():
            path.unlink()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_images(self, key: str, images: torch.Tensor, captions: Sequence[str], step: int) -> Path:
        path = self.run_dir / "samples" / f"{key.replace('/', '_')}_{step:05d}.png"
        captioned_grid(images, captions, self.images_per_row).save(path)
        return path

    def log_figure(self, key: str, path: Path, step: int) -> None:
        """A figure already written to ``path`` (in the run directory): W&B uploads it."""

    def log_histogram(self, key: str, values: torch.Tensor, step: int) -> None:
        row = {"step": step, "key": key, "values": [round(float(v), 6) for v in values.flatten()]}
        with open(self.run_dir / "histograms.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> Path:
        path = self.run_dir / "tables" / f"{key.replace('/', '_')}_{step:05d}.csv"
        path.parent.mkdir(exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([[_plain(v) for v in row] for row in rows])
        return path

    def finish(self) -> None:
        pass


def _json_lines(path: Path) -> list[str]:
    """The lines of a .jsonl file that parse as JSON objects (a killed writer can leave a partial one)."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if isinstance(json.loads(line), dict):
                lines.append(line)
        except json.JSONDecodeError:
            continue
    return lines


class WandbLogger(LocalLogger):
    """LocalLogger plus a W&B run (id kept in the run directory so that resumes continue it)."""

    def __init__(
        self,
        project: str = "rlft",
        entity: str | None = None,
        mode: str = "auto",
        tags: list[str] = [],  # noqa: B006 (read-only)
        group: str | None = None,
        images_per_row: int = 4,
    ):
        super().__init__(images_per_row)
        if mode not in ("auto", "online", "offline", "disabled"):
            from rlft.errors import ConfigError

            raise ConfigError("logger.mode", f"'{mode}' is not one of auto, online, offline, disabled")
        self.project, self.entity, self.mode, self.tags, self.group = project, entity, mode, list(tags), group
        self.run = None

    def start(self, run_dir: Path, config: Mapping[str, Any], resume_epoch: int | None) -> None:
        import wandb

        super().start(run_dir, config, resume_epoch)
        mode = self.mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        choices = _hydra_choices()
        group = self.group or default_group(choices)
        tags = [*self.tags, *(choices[k] for k in TAG_GROUPS if choices.get(k))]
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=group,
            tags=list(dict.fromkeys(tags)),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,
            config=dict(config),
        )
        if mode == "offline":
            print(f"wandb: offline run in {self.run_dir / 'wandb'}; upload later with `wandb sync {self.run.dir}/..`")

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        super().log(metrics, step)
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def log_images(self, key: str, images: torch.Tensor, captions: Sequence[str], step: int) -> Path:
        import wandb

        path = super().log_images(key, images, captions, step)
        self.run.log({key: [wandb.Image(_to_pil(img), caption=cap) for img, cap in zip(images, captions)]}, step=step)
        return path

    def log_figure(self, key: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))}, step=step)

    def log_histogram(self, key: str, values: torch.Tensor, step: int) -> None:
        import wandb

        super().log_histogram(key, values, step)
        self.run.log({key: wandb.Histogram(values.flatten().float().numpy())}, step=step)

    def log_table(self, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> Path:
        import wandb

        path = super().log_table(key, columns, rows, step)
        self.run.log({key: wandb.Table(columns=list(columns), data=[[_plain(v) for v in r] for r in rows])}, step=step)
        return path

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


# the config groups whose choices become W&B tags (filter and compare runs by them)
TAG_GROUPS = ("algorithm", "reward", "model", "dataset", "experiment")


def _hydra_choices() -> dict[str, str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def default_group(choices: Mapping[str, str]) -> str | None:
    """W&B group: one configuration across seeds (``<experiment>/<algorithm>-<reward>-<model>-<dataset>``),
    so that a dashboard averages seeds and compares methods."""
    if not choices:
        return None
    name = "-".join(choices.get(k, "?") for k in ("algorithm", "reward", "model", "dataset"))
    return f"{choices['experiment']}/{name}" if choices.get("experiment") else name


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] floats in [0, 1], or uint8 in [0, 255] (evaluation showcase images) -> PIL RGB."""
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


def overlay_maps(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Reward maps over the images they judge: green where the map is positive, red where negative,
    opacity |m| / max |m| per image (times ``alpha``)  [B, 3, H, W] in [0, 1]."""
    m = maps.float()
    m = m / m.flatten(1).abs().amax(dim=1).clamp_min(1e-12)[:, None, None]  # [-1, 1]
    color = torch.zeros_like(images)
    color[:, 1] = (m > 0).float()
    color[:, 0] = (m < 0).float()
    weight = alpha * m.abs()[:, None]
    return images.float() * (1 - weight) + color * weight


def trained_maps(reward_maps: torch.Tensor, advantages: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """What a pixel-wise algorithm trains on, per image pixel  [B, H, W]: its per-position advantages
    (PXPO, [B, h, w], signed), upsampled to the image; the reward maps where it has none per position."""
    if advantages is None or advantages.ndim != 3:
        return reward_maps
    return torch.nn.functional.interpolate(advantages[:, None].float().cpu(), size=size, mode="nearest")[:, 0]


def captioned_grid(images: torch.Tensor, captions: Sequence[str], per_row: int = 4, cell: int = 128) -> Image.Image:
    """A grid of images (upscaled to ``cell`` pixels) with each caption written under its image."""
    n = len(images)
    cols = max(1, min(per_row, n))
    rows = math.ceil(n / cols)
    text_h = 28
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(_to_pil(img).resize((cell, cell), Image.NEAREST), (x, y))
        for k, line in enumerate(_wrap(cap, 24)[:2]):
            draw.text((x + 2, y + cell + 1 + 12 * k), line, fill="black")
    return grid


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines
