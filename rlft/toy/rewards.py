"""Programmatic rewards of the toy world: they read the prompt and judge the image.

toy_alignment  (scalar in [0, 1], plus a per-pixel map that sums to it)

    1. Each pixel is labelled with the nearest palette colour, or "other" when
       none lies within ``color_tolerance`` (RGB distance).
    2. The *ideal scene* is fitted to the image: for each described object, the
       largest connected regions of its colour give its centre and extent, which
       are then constrained to what the prompt allows (size range, grid cell,
       the relation between two objects); a missing object is put where the
       prompt says. The ideal scene is drawn with the renderer's shapes.
    3. A pixel *agrees* when its label equals the ideal scene's label there.

        r = w_bg * mean_{ideal background pixels} agree
          + (1 - w_bg) * mean_{objects k} mean_{ideal pixels of k} agree

    i.e. a balanced accuracy: missing, misplaced, mis-shaped, mis-coloured or
    extra objects and a wrong background all cost. The renderer's own image of
    the prompt scores ~1; an empty canvas of the right background scores w_bg
    (1/3 by default). The map holds each pixel's term (weight x agree) so that
    map.sum() == r, which is PXPO's "image reward = sum of its pixel rewards"
    (``pixel_map=balanced``). The weights depend on the ideal scene fitted to
    each image, so one position weighs differently in two images of a prompt;
    ``pixel_map=agree`` gives PXPO the agreement itself, agree_ij / (H W), one
    weight for every pixel of every image (the map then sums to plain pixel
    accuracy; the score stays r).

    Sub-scores (metrics only, each in [0, 1]; NaN where the prompt does not name
    the attribute) say *what* an image gets right. An object is *found* when a
    connected region of its colour has at least MIN_PIXELS pixels; the found
    regions are read without the prompt's constraints:

        background  mean_{ideal background pixels} agree (the reward's background term)
        color       fraction of described objects found in their colour
        shape       fraction of found objects whose region the described shape fits best
                    (highest IoU among the four shapes, each fitted freely)
        size        fraction of found objects whose fitted extent is nearest the described
                    size's range (small / medium / large)
        place       place prompts: the object's fitted centre lies where the renderer puts
                    centres for the described grid cell (up to FIT_SLACK pixels)
        count       single-object prompts: as many regions of the colour as the count says
        relation    relation prompts: both objects found and "A <relation> B" holds between
                    their free fits (up to FIT_SLACK pixels)

toy_color  (PXPO's colour feedback; scalar in [0, 1] plus its map)

    r = mean_{pixels} (1 - ||x_ij - c|| / sqrt(3)),  c the target colour (RGB in [0, 1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rlft.errors import ConfigError
from rlft.rewards.base import Reward, RewardOutput
from rlft.rewards.color import ColorTarget
from rlft.toy.grammar import PALETTE, ObjectSpec, ParseError, Scene, parse
from rlft.toy.render import (
    GAP,
    SHAPE_AREA,
    SHAPE_CENTROID_DY,
    SIZE_RANGES,
    Placed,
    cell_range,
    relation_holds,
    shape_mask,
    shape_masks,
    size_range,
)

PALETTE_NAMES = tuple(PALETTE)
FIT_SLACK = 1.0  # pixels a fitted relation may miss by (the fit's own error) before it is enforced
MIN_PIXELS = 6  # at 32x32 (scaled with the area): the smallest region that counts as a found object
STEPS = np.array([-0.25, 0.0, 0.25])  # pixels: the offsets a fit tries around its first guess
PARTS = ("background", "color", "shape", "size", "place", "count", "relation")
PALETTE_RGB = torch.tensor([PALETTE[n] for n in PALETTE_NAMES])  # [K, 3]


def classify(images: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Palette index of each pixel, -1 where no palette colour is within ``tolerance``  [B, H, W] long."""
    pixels = images.float().permute(0, 2, 3, 1)  # [B, H, W, 3]
    dist = torch.cdist(pixels.reshape(1, -1, 3), PALETTE_RGB.to(pixels)[None]).reshape(*pixels.shape[:3], -1)
    best, index = dist.min(dim=-1)
    return torch.where(best <= tolerance, index, torch.full_like(index, -1)).cpu()


def components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected regions of a boolean mask [H, W], largest first (each a boolean mask)."""
    h, w = mask.shape
    labels = torch.where(torch.from_numpy(mask), torch.arange(1, h * w + 1).reshape(h, w), 0).float()[None, None]
    inside = labels > 0
    while True:  # propagate the largest label through each region
        grown = torch.where(inside, F.max_pool2d(labels, 3, stride=1, padding=1), labels)
        if torch.equal(grown, labels):
            break
        labels = grown
    ids, counts = torch.unique(labels[labels > 0], return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    return [(labels[0, 0] == ids[i]).numpy() for i in order]


def _ious(shape: str, fits: np.ndarray, region: np.ndarray) -> np.ndarray:
    """IoU of ``shape`` drawn at each fit (rows of cx, cy, r  [N, 3]) with a region  [N] float64."""
    masks = shape_masks(shape, fits[:, 0], fits[:, 1], fits[:, 2], region.shape[0])
    inter = (masks & region).sum(axis=(1, 2))
    return inter / np.maximum((masks | region).sum(axis=(1, 2)), 1)


def _fit(region: np.ndarray, shape: str, r_range: tuple[float, float], box) -> tuple[tuple[float, float, float], float]:
    """The allowed shape (extent within r_range, centre within box) closest to a region (max IoU):
    its (cx, cy, r) and that IoU (the first of the candidates, in order, where there are ties)."""
    ys, xs = np.nonzero(region)
    r0 = float(np.clip(math.sqrt(len(xs) / SHAPE_AREA[shape]), *r_range))
    cx0, cy0 = xs.mean() + 0.5, ys.mean() + 0.5 - SHAPE_CENTROID_DY[shape] * r0
    fits = []
    for r in np.clip(r0 + STEPS, *r_range):
        (x_lo, x_hi), (y_lo, y_hi) = box(r)
        cxs, cys = np.clip(cx0 + STEPS, x_lo, x_hi), np.clip(cy0 + STEPS, y_lo, y_hi)
        fits += [(float(cx), float(cy), float(r)) for cx in cxs for cy in cys]
    ious = _ious(shape, np.asarray(fits), region)
    best = int(np.argmax(ious))
    return fits[best], float(ious[best])


def _extent(region: np.ndarray, shape: str) -> tuple[float, float, float]:
    """The free fit of ``shape`` to a region, (cx, cy, r): every fit of the highest IoU on a fine grid,
    averaged (pixel-centre masks make IoU flat over a range of r; its middle is the unbiased estimate)."""
    ys, xs = np.nonzero(region)
    r0 = math.sqrt(len(xs) / SHAPE_AREA[shape])
    cx0, cy0 = xs.mean() + 0.5, ys.mean() + 0.5 - SHAPE_CENTROID_DY[shape] * r0
    fits = np.asarray(
        [(cx0 + dx, cy0 + dy, float(r)) for r in r0 + np.arange(-0.75, 0.76, 0.125) for dx in STEPS for dy in STEPS]
    )
    ious = _ious(shape, fits, region)
    best = ious >= ious.max() - 1e-9
    return tuple(float(v) for v in fits[best].mean(axis=0))


def _free_box(size: int):
    """Centres that keep an extent-r shape inside the image."""
    return lambda r: ((r, size - r), (r, size - r))


def _enforce(a: Placed, b: Placed, relation: str, size: int) -> tuple[Placed, Placed]:
    """Move A and B symmetrically until "A <relation> B" holds (no-op when it already does)."""
    if relation_holds(a, b, relation, slack=FIT_SLACK):
        return a, b
    horizontal = relation in ("left of", "right of")
    sign = 1.0 if relation in ("left of", "above") else -1.0  # B minus A along the axis
    pa, qa = (a.cx, a.cy) if horizontal else (a.cy, a.cx)  # (along, across)
    pb, qb = (b.cx, b.cy) if horizontal else (b.cy, b.cx)
    d = a.r + b.r + GAP
    mid = (pa + pb) / 2
    pa, pb = mid - sign * d / 2, mid + sign * d / 2
    shift = max(a.r - pa, b.r - pb, 0.0) + min(size - a.r - pa, size - b.r - pb, 0.0)
    pa, pb = pa + shift, pb + shift
    if abs(qb - qa) > d / 2:
        mid_q, s = (qa + qb) / 2, math.copysign(1.0, qb - qa)
        qa, qb = mid_q - s * d / 4, mid_q + s * d / 4
    if horizontal:
        return Placed(a.color, a.shape, pa, qa, a.r), Placed(b.color, b.shape, pb, qb, b.r)
    return Placed(a.color, a.shape, qa, pa, a.r), Placed(b.color, b.shape, qb, pb, b.r)


def color_regions(labels: np.ndarray, scene: Scene) -> dict[str, list[np.ndarray]]:
    """The connected regions of each object colour the scene names, largest first."""
    return {o.color: components(labels == PALETTE_NAMES.index(o.color)) for o in scene.objects}


def ideal_scene(labels: np.ndarray, scene: Scene, regions: dict[str, list[np.ndarray]] | None = None) -> list[Placed]:
    """The placement of the scene's objects that best explains a labelled image  (labels [H, W];
    ``regions`` as :func:`color_regions` gives them, computed when not given)."""
    size = labels.shape[0]
    regions = color_regions(labels, scene) if regions is None else regions
    placed: list[Placed] = []
    for k, obj in enumerate(scene.objects):
        r_range = size_range(obj.size, size)
        if scene.place is not None:
            row, col = scene.place

            def box(r, row=row, col=col):
                return cell_range(col, r, size), cell_range(row, r, size)
        else:
            box = _free_box(size)
        copies = scene.count if scene.relation is None else 1
        found = regions[obj.color][:copies]
        for region in found:
            (cx, cy, r), _ = _fit(region, obj.shape, r_range, box)
            placed.append(Placed(obj.color, obj.shape, cx, cy, r))
        for _ in range(copies - len(found)):  # missing: where the prompt puts it, mid size
            r = sum(r_range) / 2
            (x_lo, x_hi), (y_lo, y_hi) = box(r)
            cx, cy = (x_lo + x_hi) / 2, (y_lo + y_hi) / 2
            if scene.relation is not None:
                cx, cy = _default_relation_centre(scene.relation, k, size)
            placed.append(Placed(obj.color, obj.shape, cx, cy, r))
    if scene.relation is not None:
        placed = list(_enforce(placed[0], placed[1], scene.relation, size))
    return placed


def sub_scores(
    labels: np.ndarray,
    scene: Scene,
    regions: dict[str, list[np.ndarray]] | None = None,
    ideal: list[Placed] | None = None,
) -> dict:
    """The image's sub-scores (module docstring), NaN for attributes the prompt does not name
    (``regions`` and ``ideal``, the :func:`ideal_scene`, are computed when not given)."""
    size = labels.shape[0]
    regions = color_regions(labels, scene) if regions is None else regions
    nan = float("nan")
    out = dict.fromkeys(PARTS, nan)
    ideal = ideal_scene(labels, scene, regions) if ideal is None else ideal
    bg_index = PALETTE_NAMES.index(scene.background_color)
    ideal_bg = np.ones(labels.shape, dtype=bool)
    for p in ideal:
        ideal_bg &= ~shape_mask(p.shape, p.cx, p.cy, p.r, size)
    out["background"] = float((labels[ideal_bg] == bg_index).mean()) if ideal_bg.any() else nan
    copies = scene.count if scene.relation is None else 1
    fits, counts = free_fits(scene, regions, size)
    out["color"] = sum(min(n, copies) for n in counts) / (copies * len(scene.objects))
    if scene.relation is None:
        out["count"] = float(counts[0] == scene.count)
    if fits:
        shapes, sizes = [], []
        for obj, region, fit in fits:
            r = fit.r
            ious = {s: _fit(region, s, (0.5, size / 2), _free_box(size))[1] for s in SHAPE_AREA}
            shapes.append(max(ious, key=ious.get) == obj.shape)
            gaps = {z: max(lo - r, r - hi, 0.0) for z, (lo, hi) in ((z, size_range(z, size)) for z in SIZE_RANGES)}
            sizes.append(min(gaps, key=gaps.get) == obj.size)
        out["shape"], out["size"] = float(np.mean(shapes)), float(np.mean(sizes))
    if scene.place is not None:
        out["place"] = 0.0
        if fits:
            (row, col), (_, _, fit) = scene.place, fits[0]
            cx, cy, r = fit.cx, fit.cy, fit.r
            inside = [
                lo - FIT_SLACK <= v <= hi + FIT_SLACK
                for v, (lo, hi) in ((cx, cell_range(col, r, size)), (cy, cell_range(row, r, size)))
            ]
            out["place"] = float(all(inside))
    if scene.relation is not None:
        out["relation"] = 0.0
        if len(fits) == 2:
            out["relation"] = float(relation_holds(fits[0][2], fits[1][2], scene.relation, slack=FIT_SLACK))
    return out


def free_fits(
    scene: Scene, regions: dict[str, list[np.ndarray]], size: int
) -> tuple[list[tuple[ObjectSpec, np.ndarray, Placed]], list[int]]:
    """The objects found, read without the prompt's constraints: (object, region, the free fit of its
    shape there) for each described object (each copy of a counted one) whose colour has a region of at
    least MIN_PIXELS (scaled with the area), largest regions first; and how many such regions each
    object's colour has."""
    min_pixels = MIN_PIXELS * (size / 32) ** 2
    copies = scene.count if scene.relation is None else 1
    fits, counts = [], []
    for obj in scene.objects:
        big = [r for r in regions[obj.color] if r.sum() >= min_pixels]
        counts.append(len(big))
        fits += [(obj, region, Placed(obj.color, obj.shape, *_extent(region, obj.shape))) for region in big[:copies]]
    return fits, counts


def _default_relation_centre(relation: str, k: int, size: int) -> tuple[float, float]:
    near, far, mid = size / 4, 3 * size / 4, size / 2
    first, second = {
        "left of": ((near, mid), (far, mid)),
        "right of": ((far, mid), (near, mid)),
        "above": ((mid, near), (mid, far)),
        "below": ((mid, far), (mid, near)),
    }[relation]
    return first if k == 0 else second


class ToyAlignment(Reward):
    """Does the image show the scene its toy prompt describes? (see the module docstring)"""

    world = "toy"  # rlft/presets.py: the images it judges
    name = "toy_alignment"
    gives_maps = True

    def __init__(self, background_weight: float = 1 / 3, color_tolerance: float = 0.3, pixel_map: str = "balanced"):
        if not 0.0 <= background_weight <= 1.0:
            raise ValueError(f"background_weight must lie in [0, 1], got {background_weight}")
        if pixel_map not in ("balanced", "agree"):
            raise ConfigError("reward.pixel_map", f"'{pixel_map}' is not one of balanced, agree")
        self.background_weight = background_weight
        self.color_tolerance = color_tolerance
        self.pixel_map = pixel_map

    def check_prompts(self, prompts: Sequence[str], key: str = "dataset") -> None:
        for p in prompts:
            _scene(p, key)

    def score(self, images, prompts, metadata) -> RewardOutput:
        labels = classify(images, self.color_tolerance).numpy()  # [B, H, W]
        scores, maps, parts = [], [], []
        for lab, prompt in zip(labels, prompts):
            scene = _scene(prompt)
            regions = color_regions(lab, scene)
            ideal = ideal_scene(lab, scene, regions)
            weight, agree = self.pixel_terms(lab, scene, regions, ideal)
            scores.append(float((weight * agree).sum()))
            maps.append(weight * agree if self.pixel_map == "balanced" else agree / agree.size)
            parts.append(sub_scores(lab, scene, regions, ideal))
        maps = torch.from_numpy(np.stack(maps).astype(np.float32))  # [B, H, W]
        parts = {k: torch.tensor([p[k] for p in parts], dtype=torch.float32) for k in PARTS}
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), maps, parts=parts)

    def pixel_terms(
        self, labels: np.ndarray, scene: Scene, regions: dict | None = None, placed: list[Placed] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each pixel's weight and its agreement with the ideal scene (``placed``, computed when not
        given)  [H, W] float32 each; sum(weight x agree) is the reward."""
        size = labels.shape[0]
        placed = ideal_scene(labels, scene, regions) if placed is None else placed
        ideal = np.full_like(labels, PALETTE_NAMES.index(scene.background_color))
        for p in placed:
            ideal[shape_mask(p.shape, p.cx, p.cy, p.r, size)] = PALETTE_NAMES.index(p.color)
        agree = (labels == ideal).astype(np.float32)
        weight = np.zeros(labels.shape, dtype=np.float32)
        background = ideal == PALETTE_NAMES.index(scene.background_color)
        weight[background] = self.background_weight / max(background.sum(), 1)
        colors = {o.color for o in scene.objects}
        for color in colors:
            mine = ideal == PALETTE_NAMES.index(color)
            weight[mine] = (1 - self.background_weight) / (len(colors) * max(mine.sum(), 1))
        return weight, agree


class ToyColor(ColorTarget):
    """The colour target with the toy world's palette names (rlft.rewards.color)."""

    name = "toy_color"
    palette = PALETTE


def _scene(prompt: str, key: str = "dataset") -> Scene:
    try:
        return parse(prompt)
    except ParseError as exc:
        raise ConfigError(
            key,
            f"reward=toy_alignment cannot read the prompt '{prompt}': {exc}",
            "it judges toy-grammar prompts only: use dataset=toy_small, toy_large or toy_unseen, or another reward",
        ) from None
