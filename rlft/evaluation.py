"""What an evaluation measures, and the before/after record of a run.

Every evaluation scores the same prompts of each evaluation set with the same noise
(``trainer.eval_num_prompts`` prompts x ``trainer.eval_images_per_prompt`` seeds), so any two
evaluations of a run are paired image by image. Per set ``<name>`` it logs

    eval/<name>/reward/mean, /std, /se        mean over images; se over per-prompt means (rlft/stats.py)
    eval/<name>/reward/<part>/mean, /se       each sub-score the reward reports (NaN-free prompts only)

and shows the same ``trainer.log_images`` images (the first seed of prompts spread over the set)
next to the run's first evaluation of them. The first evaluation is kept in the run directory
(``eval/first.pt``), so a resumed run still compares against it; at the end of a run the summary
states each set's paired gain over prompts with its standard error, per sub-score too, and
``before_after.png`` shows the showcase images of the first and the last evaluation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlft.data import spread_indices
from rlft.stats import mean_se, paired_gain

FIRST_FILE = Path("eval") / "first.pt"
BEFORE_AFTER_FILE = "before_after.png"


@dataclass
class EvalResult:
    """One evaluation set's scores, in a fixed image order (the same at every evaluation)."""

    epoch: int
    prompts: list[str]  # the prompt of each image
    scores: torch.Tensor  # [N]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] each, NaN where a part does not apply
    showcase: torch.Tensor | None = None  # the showcase images, uint8 [k, 3, H, W]
    showcase_index: list[int] = field(default_factory=list)  # their positions among the N images

    def metrics(self, name: str) -> dict[str, float]:
        out = {
            f"eval/{name}/reward/mean": float(self.scores.mean()),
            f"eval/{name}/reward/std": float(self.scores.std(unbiased=False)),
        }
        for part, values in {"": self.scores, **self.parts}.items():
            mean, se, n = mean_se(values.tolist(), self.prompts)
            key = f"eval/{name}/reward/{part + '/' if part else ''}"
            if n and part:
                out[key + "mean"] = mean
            if not math.isnan(se):  # one prompt has no standard error
                out[key + "se"] = se
        return out

    def captions(self) -> list[str]:
        return [f"epoch {self.epoch} r={float(self.scores[i]):.2f} | {self.prompts[i]}" for i in self.showcase_index]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "prompts": self.prompts,
            "scores": self.scores,
            "parts": self.parts,
            "showcase": self.showcase,
            "showcase_index": self.showcase_index,
        }


def showcase_indices(num_prompts: int, images_per_prompt: int, k: int) -> list[int]:
    """Image positions of the first seed of ``k`` prompts spread over the set (images grouped by prompt)."""
    return [int(p) * images_per_prompt for p in spread_indices(num_prompts, k)] if k > 0 else []


def save_first(run_dir: Path, results: dict[str, EvalResult]) -> None:
    """Keep a run's first evaluation (written atomically: a kill never leaves half a file)."""
    path = Path(run_dir) / FIRST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({name: r.state_dict() for name, r in results.items()}, tmp)
    os.replace(tmp, path)


def load_first(run_dir: Path) -> dict[str, EvalResult] | None:
    path = Path(run_dir) / FIRST_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)  # tensors, lists and numbers only: nothing in it can run
    return {name: EvalResult(**s) for name, s in state.items()}


def side_by_side(first: EvalResult, now: EvalResult) -> tuple[torch.Tensor, list[str]]:
    """Showcase images interleaved as (first evaluation, now) pairs, with captions."""
    if first.showcase is None or now.showcase is None or first.showcase_index != now.showcase_index:
        return now.showcase, now.captions()
    images = torch.stack([img for pair in zip(first.showcase, now.showcase) for img in pair])
    captions = [c for pair in zip(first.captions(), now.captions()) for c in pair]
    return images, captions


def gain_lines(name: str, dataset_name: str, first: EvalResult, last: EvalResult) -> list[str]:
    """The summary of one set: the reward's paired gain over prompts, then each sub-score's."""
    head = (
        f"evaluation reward on {name} ({dataset_name}): {float(first.scores.mean()):.4f} (epoch {first.epoch}) -> "
        f"{float(last.scores.mean()):.4f} (epoch {last.epoch})"
    )
    if len(first.scores) != len(last.scores) or first.prompts != last.prompts:
        return [head + "; the evaluation prompts changed, no paired gain"]
    if len(set(first.prompts)) < 2:
        return [head]
    lines = [f"{head}; {paired_gain(first.scores.tolist(), last.scores.tolist(), first.prompts)}"]
    parts = []
    for part in first.parts:
        if part not in last.parts:
            continue
        before, after = first.parts[part].tolist(), last.parts[part].tolist()
        try:
            g = paired_gain(before, after, first.prompts)
        except ValueError:  # applies to fewer than two prompts
            continue
        parts.append(f"{part} {g.before:.3f} -> {g.before + g.gain:.3f} ({g.gain:+.3f} ± {g.se:.3f})")
    if parts:
        lines.append(f"  sub-scores on {name} (paired gain ± SE over the prompts each applies to): " + ", ".join(parts))
    return lines


def before_after_grid(pairs: dict[str, tuple[EvalResult, EvalResult]]):
    """Per evaluation set, a row of the first evaluation's showcase images above the last one's."""
    from rlft.loggers import captioned_grid

    images, captions, per_row = [], [], 1
    for name, (first, last) in pairs.items():
        if first.showcase is None or last.showcase is None or first.showcase_index != last.showcase_index:
            continue
        per_row = max(per_row, len(first.showcase_index))
        for r in (first, last):
            images.append(r.showcase)
            captions += [f"[{name}] {c}" for c in r.captions()]
    if not images or any(len(i) != per_row for i in images):
        return None
    return captioned_grid(torch.cat(images), captions, per_row=per_row)
