"""What an evaluation measures, and the before/after record of a run.

Every evaluation scores the same prompts of each evaluation set with the same noise
(``trainer.eval_num_prompts`` prompts x ``trainer.eval_images_per_prompt`` seeds), so any two
evaluations of a run are paired image by image. Per set ``<name>`` it logs

    eval/<name>/reward/mean, /std, /se        mean over images; se over per-prompt means (rlft/stats.py)
    eval/<name>/reward/<part>/mean, /se       each sub-score the reward reports (NaN-free prompts only)
    eval/<name>/<held>/mean, /se, /<part>/... each held-out reward (``eval_rewards.<held>``), never trained on
    eval/<name>/reward/gain, /gain_se         paired gain over prompts since the first evaluation (and
    eval/<name>/<held>/gain, /gain_se         per held-out reward): the numbers a hacked run gives away
    eval/<name>/drift/rmse/mean, /se          distance of each image from the first evaluation's image of
    eval/<name>/drift/clip/mean, /se          the same prompt and noise (the base model's, at epoch 0)
    eval/<name>/diversity/rmse/mean, /se      per prompt, the mean distance between its images (seeds)
    eval/<name>/diversity/clip/mean, /se

with the distances

    rmse(x, y) = sqrt(mean_{c,h,w} (x - y)^2)     pixels in [0, 1] (the uint8 images saved to disk)
    clip(x, y) = 1 - cos(E(x), E(y))              E: the image encoder of a CLIP-based reward the run
                                                  already has loaded (none in the toy world)

Diversity is computed per image, as its mean distance to the other images of its prompt; the mean of
those over a prompt's images is exactly the prompt's mean pairwise distance, so the per-prompt means
(and their standard error over prompts) are those of mode collapse. The first evaluation's images
are kept in ``eval/base.pt`` (made once: a resumed run measures drift from the same images), the
latest ones in ``eval/latest.pt``.

Each evaluation shows the same ``trainer.log_images`` images (the first seed of prompts spread over the
set) next to the run's first evaluation of them. The first evaluation is kept in the run directory
(``eval/first.pt``), so a resumed run still compares against it; at the end of a run the summary
states each set's paired gain over prompts with its standard error, per sub-score and held-out reward
too, and ``before_after.png`` shows the showcase images of the first and the last evaluation.
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
BASE_FILE = Path("eval") / "base.pt"
LATEST_FILE = Path("eval") / "latest.pt"
# names an eval_rewards entry cannot take: they are the keys of the training reward, drift and diversity
RESERVED_NAMES = ("reward", "drift", "diversity", "prompt")
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
    held_out: dict[str, torch.Tensor] = field(default_factory=dict)  # held-out reward -> [N]
    held_out_parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # -> part -> [N]
    drift: dict[str, torch.Tensor] = field(default_factory=dict)  # "rmse" / "clip" -> [N]
    diversity: dict[str, torch.Tensor] = field(default_factory=dict)  # "rmse" / "clip" -> [N]
    images: torch.Tensor | None = None  # all N images, uint8 (not kept in first.pt: base.pt has them)
    features: torch.Tensor | None = None  # [N, D] CLIP image features, where a reward gives them
    eval_seed: int | None = None  # the noise's seed: evaluations pair image by image only under the same one

    def families(self) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Every scored quantity by its metric prefix: the reward, each held-out reward (with their
        sub-scores), drift/<kind> and diversity/<kind>."""
        out = {"reward": (self.scores, self.parts)}
        out.update({h: (v, self.held_out_parts.get(h, {})) for h, v in self.held_out.items()})
        out.update({f"drift/{k}": (v, {}) for k, v in self.drift.items()})
        out.update({f"diversity/{k}": (v, {}) for k, v in self.diversity.items()})
        return out

    def metrics(self, name: str, first: EvalResult | None = None) -> dict[str, float]:
        out = {
            f"eval/{name}/reward/mean": float(self.scores.mean()),
            f"eval/{name}/reward/std": float(self.scores.std(unbiased=False)),
        }
        for family, (total, parts) in self.families().items():
            for part, values in {"": total, **parts}.items():
                mean, se, n = mean_se(values.tolist(), self.prompts)
                key = f"eval/{name}/{family}/{part + '/' if part else ''}"
                if n and (part or family != "reward"):
                    out[key + "mean"] = mean
                if not math.isnan(se):  # one prompt has no standard error
                    out[key + "se"] = se
        if self.pairs_with(first) and len(set(self.prompts)) > 1:
            before = first.families()
            for family in ["reward", *self.held_out]:
                if family not in before:
                    continue
                try:
                    g = paired_gain(before[family][0].tolist(), self.families()[family][0].tolist(), self.prompts)
                except ValueError:  # fewer than two prompts with values on both sides
                    continue
                out[f"eval/{name}/{family}/gain"], out[f"eval/{name}/{family}/gain_se"] = g.gain, g.se
        return out

    def pairs_with(self, other: EvalResult | None) -> bool:
        """Whether ``other`` scored the same prompts with the same noise (its images pair with these)."""
        return (
            other is not None
            and other.prompts == self.prompts
            and (other.eval_seed is None or self.eval_seed is None or other.eval_seed == self.eval_seed)
        )

    def captions(self) -> list[str]:
        return [f"epoch {self.epoch} r={float(self.scores[i]):.2f} | {self.prompts[i]}" for i in self.showcase_index]

    def table(self) -> tuple[list[str], list[list]]:
        """One row per image: its prompt, reward, held-out rewards, drift and diversity."""
        columns = {"prompt": self.prompts, "reward": self.scores.tolist()}
        columns.update({h: v.tolist() for h, v in self.held_out.items()})
        columns.update({f"drift_{k}": v.tolist() for k, v in self.drift.items()})
        columns.update({f"diversity_{k}": v.tolist() for k, v in self.diversity.items()})
        return list(columns), [list(row) for row in zip(*columns.values())]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "prompts": self.prompts,
            "scores": self.scores,
            "parts": self.parts,
            "showcase": self.showcase,
            "showcase_index": self.showcase_index,
            "held_out": self.held_out,
            "held_out_parts": self.held_out_parts,
            "drift": self.drift,
            "diversity": self.diversity,
            "eval_seed": self.eval_seed,
        }


def rmse(a: torch.Tensor, b: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Per-image RMSE of uint8 images [N, 3, H, W] (pixels read as [0, 1]): sqrt(mean_{c,h,w} (a - b)^2),
    ``chunk`` images at a time (float64 copies of a whole evaluation of large images would not fit)."""
    out = [
        (a[i : i + chunk].double() - b[i : i + chunk].double()).div(255).pow(2).flatten(1).mean(1).sqrt()
        for i in range(0, len(a), chunk)
    ]
    return torch.cat(out).float() if out else torch.zeros(0)


def cosine_distance(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-row 1 - cos(f, g) of feature matrices [N, D]."""
    return (1 - torch.nn.functional.cosine_similarity(f.double(), g.double(), dim=-1)).float()


def mean_distance_to_others(prompts: list[str], distance, n: int) -> torch.Tensor:
    """[n]: for each image, its mean ``distance(i, j)`` to the other images of its prompt (NaN if it has none).
    Averaged over a prompt's images this is the prompt's mean pairwise distance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = torch.full((n,), math.nan)
    for members in groups.values():
        if len(members) < 2:
            continue
        index = torch.tensor(members)
        for i in members:
            others = index[index != i]
            out[i] = distance(torch.full_like(others, i), others).double().mean().float()
    return out


def measure_drift_and_diversity(result: EvalResult, base: dict | None, feature_source: str | None = None) -> None:
    """Fill ``result.drift`` (from ``base``'s images of the same prompts and noise) and ``result.diversity``;
    the feature drift only when ``base``'s features come from the same encoder (``feature_source``)."""
    images, features, n = result.images, result.features, len(result.prompts)
    if images is None:
        return
    result.diversity["rmse"] = mean_distance_to_others(result.prompts, lambda i, j: rmse(images[i], images[j]), n)
    if features is not None:
        result.diversity["clip"] = mean_distance_to_others(
            result.prompts, lambda i, j: cosine_distance(features[i], features[j]), n
        )
    if base is None or base["prompts"] != result.prompts or base["images"].shape != images.shape:
        return
    if base.get("eval_seed") is not None and result.eval_seed is not None and base["eval_seed"] != result.eval_seed:
        return  # other noise: the images do not pair
    result.drift["rmse"] = rmse(images, base["images"])
    same_encoder = base.get("feature_source") == feature_source
    if features is not None and base.get("features") is not None and same_encoder:
        if base["features"].shape == features.shape:
            result.drift["clip"] = cosine_distance(features, base["features"])


def base_record(result: EvalResult, feature_source: str | None = None) -> dict:
    """What eval/base.pt keeps of an evaluation set: its epoch, noise seed, prompts, images and features
    (and which encoder made them)."""
    return {
        "epoch": result.epoch,
        "eval_seed": result.eval_seed,
        "prompts": result.prompts,
        "images": result.images,
        "features": result.features,
        "feature_source": feature_source,
    }


def save_records(run_dir: Path, path: Path, records: dict[str, dict]) -> None:
    """Write eval/base.pt or eval/latest.pt atomically."""
    target = Path(run_dir) / path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    torch.save(records, tmp)
    os.replace(tmp, target)


def load_records(run_dir: Path, path: Path) -> dict[str, dict]:
    target = Path(run_dir) / path
    if not target.is_file():
        return {}
    return torch.load(target, weights_only=True)


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
    if len(first.scores) != len(last.scores) or not last.pairs_with(first):
        return [head + "; the evaluation prompts or noise changed, no paired gain"]
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
    held = []
    for h, before in first.held_out.items():
        if h in last.held_out:
            try:
                g = paired_gain(before.tolist(), last.held_out[h].tolist(), first.prompts)
            except ValueError:  # applies to fewer than two prompts
                continue
            held.append(f"{h} {g.before:.4f} -> {g.before + g.gain:.4f} ({g.gain:+.4f} ± {g.se:.4f}, {g.z:+.1f} SE)")
    if held:
        lines.append(f"  held-out rewards on {name} (paired gain ± SE over prompts): " + ", ".join(held))
    drift = [f"{k} {float(v.mean()):.4f}" for k, v in last.drift.items()]
    diversity = [
        f"{k} {float(first.diversity[k].nanmean()):.4f} -> {float(v.nanmean()):.4f}"
        for k, v in last.diversity.items()
        if k in first.diversity
    ]
    if drift or diversity:
        lines.append(
            f"  on {name}: drift from the first evaluation's images "
            + (", ".join(drift) or "n/a")
            + "; diversity between seeds "
            + (", ".join(diversity) or "n/a")
        )
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
