"""Draw the scene a toy prompt describes (with random placement and size jitter).

Every shape has an *extent* r: it fits in the square [cx - r, cx + r] x [cy - r, cy + r].
Pixels are tested at their centres (x + 0.5, y + 0.5) with hard edges, so a
rendered image holds exactly the palette colours and the alignment reward can
re-draw the same shapes it reads back.

    circle    dx^2 + dy^2 <= r^2                             area pi r^2
    square    |dx|, |dy| <= 0.85 r                           area 2.89 r^2
    triangle  -r <= dy <= r,  |dx| <= (dy + r) / 2  (apex up) area 2 r^2, centroid at dy = r/3
    cross     a plus sign with arms of half-width r/3         area 20/9 r^2

Sizes (extent in pixels at 32x32, scaled with the image size):
small 3.0-4.0, medium (no size word) 4.5-5.5, large 6.5-7.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from rlft.toy.grammar import PALETTE, Scene

SIZE_RANGES = {"small": (3.0, 4.0), "medium": (4.5, 5.5), "large": (6.5, 7.5)}  # extents at 32x32
SHAPE_AREA = {"circle": math.pi, "square": 0.85**2 * 4, "triangle": 2.0, "cross": 20 / 9}  # area / r^2
SHAPE_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "cross": 0.0}  # area centroid - centre, / r
GAP = 1.0  # pixels between the bounding squares of two objects
BASE_SIZE = 32


@dataclass(frozen=True)
class Placed:
    """One drawn object: colour and shape names, centre (cx, cy) and extent r in pixels."""

    color: str
    shape: str
    cx: float
    cy: float
    r: float


def size_range(size: str, image_size: int) -> tuple[float, float]:
    lo, hi = SIZE_RANGES[size]
    k = image_size / BASE_SIZE
    return lo * k, hi * k


def shape_mask(shape: str, cx: float, cy: float, r: float, image_size: int) -> np.ndarray:
    """Boolean mask [H, W] of one shape (pixel centres inside it)."""
    return shape_masks(shape, [cx], [cy], [r], image_size)[0]


def shape_masks(shape: str, cx, cy, r, image_size: int) -> np.ndarray:
    """Boolean masks [N, H, W] of N placements of one shape (centres cx, cy and extents r, each [N]).

    The geometry is evaluated in float32 with each bound rounded to float32 once, so every mask is
    the same whether it is drawn alone or among others."""

    def f32(values) -> np.ndarray:  # [N, 1, 1]: one value per mask, rounded once to float32
        return np.asarray(values, dtype=np.float64).astype(np.float32)[:, None, None]

    c = np.arange(image_size, dtype=np.float32) + 0.5
    r64 = np.asarray(r, dtype=np.float64)
    dx, dy = c[None, None, :] - f32(cx), c[None, :, None] - f32(cy)
    if shape == "circle":
        return dx * dx + dy * dy <= f32(r64 * r64)
    if shape == "square":
        half = f32(0.85 * r64)
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        r32 = f32(r64)
        return (dy >= -r32) & (dy <= r32) & (np.abs(dx) <= (dy + r32) / 2)
    if shape == "cross":
        arm, r32 = f32(r64 / 3), f32(r64)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r32)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r32))
    raise ValueError(f"unknown shape '{shape}'")


def cell_range(index: int, r: float, image_size: int) -> tuple[float, float]:
    """Allowed centre coordinates for grid cell ``index`` (0, 1, 2) along one axis, keeping the shape inside."""
    third = image_size / 3
    return max(index * third, r), min((index + 1) * third, image_size - r)


def relation_holds(a: Placed, b: Placed, relation: str, slack: float = 0.0) -> bool:
    """A <relation> B: B is at least r_a + r_b + GAP away along the relation's axis, in the right
    direction, and the offset across that axis is at most half of it (both up to ``slack`` pixels)."""
    along, across = _axes(a, b, relation)
    return along >= a.r + b.r + GAP - slack and abs(across) <= along / 2 + slack


def _axes(a: Placed, b: Placed, relation: str) -> tuple[float, float]:
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


def _apart(placed: list[Placed]) -> bool:
    for i, p in enumerate(placed):
        for q in placed[:i]:
            if max(abs(p.cx - q.cx), abs(p.cy - q.cy)) < p.r + q.r + GAP:
                return False
    return True


def layout(scene: Scene, rng: np.random.Generator, image_size: int = BASE_SIZE) -> list[Placed]:
    """Random placement of the scene's objects that satisfies its place, count and relation."""
    radii = [rng.uniform(*size_range(o.size, image_size)) for o in scene.objects]
    if scene.relation is None:
        o, r = scene.objects[0], radii[0]
        if scene.place is not None:
            row, col = scene.place
            cx, cy = rng.uniform(*cell_range(col, r, image_size)), rng.uniform(*cell_range(row, r, image_size))
            return [Placed(o.color, o.shape, cx, cy, r)]
        radii = [r] + [rng.uniform(*size_range(o.size, image_size)) for _ in range(scene.count - 1)]
    for _ in range(10_000):  # rejection sampling; valid layouts are common (>1%) for every scene
        objects = scene.objects if scene.relation else scene.objects * scene.count
        placed = [
            Placed(o.color, o.shape, rng.uniform(r, image_size - r), rng.uniform(r, image_size - r), r)
            for o, r in zip(objects, radii)
        ]
        if _apart(placed) and (scene.relation is None or relation_holds(*placed, scene.relation)):
            return placed
    raise RuntimeError(f"no layout found for {scene}")


def draw(placed: list[Placed], background: str, image_size: int = BASE_SIZE) -> np.ndarray:
    """Image [3, H, W] float32 in [0, 1]: the background colour, then each object in order."""
    image = np.empty((3, image_size, image_size), dtype=np.float32)
    image[:] = np.asarray(PALETTE[background], dtype=np.float32)[:, None, None]
    for p in placed:
        mask = shape_mask(p.shape, p.cx, p.cy, p.r, image_size)
        image[:, mask] = np.asarray(PALETTE[p.color], dtype=np.float32)[:, None]
    return image


def render(scene: Scene, rng: np.random.Generator, image_size: int = BASE_SIZE) -> np.ndarray:
    """One random image of the scene  [3, H, W] float32 in [0, 1]."""
    return draw(layout(scene, rng, image_size), scene.background_color, image_size)


def render_batch(scenes: list[Scene], seed: int, image_size: int = BASE_SIZE) -> torch.Tensor:
    """Images of ``scenes`` from one seed  [B, 3, H, W] float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([render(s, rng, image_size) for s in scenes]))
