"""The toy world's prompt grammar: coloured shapes on a coloured background.

Two prompt templates, each a product of attribute axes (a mixed-radix code
names every prompt, so prompt ``i`` of a split is decoded in O(1) and no list
of strings is ever stored):

* single:   "<count> [size] <colour> <shape>[s] [place] [on a <bg> background]"
            e.g. "two small red circles on a black background",
                 "a large blue cross in the top left corner"
* relation: "a [size] <colour> <shape> <relation> a [size] <colour> <shape> [on a <bg> background]"
            e.g. "a small red circle left of a blue square on a white background"

Rules: the two objects of a relation differ in colour, the background differs
from every object colour, "two"/"three" exclude a place and the large size
(so that every described scene fits in 32x32 pixels).

Splits (fixed, disjoint, deterministic):

* ``unseen``: every prompt that names a held-out colour-shape pair (HELD_OUT),
  and every relation that gives both objects a size word *and* a background,
  i.e. four modifiers where no train prompt has more than three.
* ``train``: everything else (>100,000 prompts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from rlft.data import Prompt, PromptDataset, spread_indices
from rlft.errors import ConfigError

# palette (RGB in [0, 1]); object colours are also allowed as backgrounds
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.75, 0.1),
    "blue": (0.1, 0.25, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "orange": (1.0, 0.55, 0.0),
    "cyan": (0.1, 0.85, 0.9),
    "pink": (1.0, 0.5, 0.75),
}
NEUTRALS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}
PALETTE = {**COLORS, **NEUTRALS}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = ("small", "medium", "large")  # "medium" is never written: it is the size when none is named
# (row, column) cells of a 3x3 grid and their phrases
PLACES = {
    (0, 0): "in the top left corner",
    (0, 1): "at the top",
    (0, 2): "in the top right corner",
    (1, 0): "on the left",
    (1, 1): "in the centre",
    (1, 2): "on the right",
    (2, 0): "in the bottom left corner",
    (2, 1): "at the bottom",
    (2, 2): "in the bottom right corner",
}
PLACE_CELLS = tuple(PLACES)
# single-object layouts: one object placed anywhere, one object in a cell, or two/three objects anywhere
LAYOUTS = (("one", None),) + tuple(("one", cell) for cell in PLACE_CELLS) + (("two", None), ("three", None))
COUNT = {"one": 1, "two": 2, "three": 3}
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS = (None, *NEUTRALS, *COLOR_NAMES)  # None: not named, drawn white
DEFAULT_BACKGROUND = "white"
HELD_OUT = frozenset({("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square")})
# rewordings of one two-object scene (ToyRephrased): small/large x small/large x the 9 named backgrounds
# that differ from both objects' colours
REWORDINGS = 2 * 2 * (len(BACKGROUNDS) - 1 - 2)


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    size: str = "medium"


@dataclass(frozen=True)
class Scene:
    """What a prompt describes. ``objects`` has one entry (single) or two (relation: A <relation> B)."""

    objects: tuple[ObjectSpec, ...]
    count: int = 1  # copies of objects[0] (single prompts only)
    place: tuple[int, int] | None = None  # grid cell of a single object
    relation: str | None = None
    background: str | None = None

    @property
    def background_color(self) -> str:
        return self.background or DEFAULT_BACKGROUND

    @property
    def modifiers(self) -> int:
        """How many optional parts the prompt names (sizes, place, count, relation, background)."""
        return (
            sum(o.size != "medium" for o in self.objects)
            + (self.place is not None)
            + (self.count > 1)
            + (self.relation is not None)
            + (self.background is not None)
        )

    @property
    def held_out(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT for o in self.objects)

    def text(self) -> str:
        a = self.objects[0]
        if self.relation is None:
            count = {1: "a", 2: "two", 3: "three"}[self.count]
            words = [count, *_adjectives(a), PLURALS[a.shape] if self.count > 1 else a.shape]
            if count == "a":
                words[0] = _article(words[1])
            if self.place is not None:
                words.append(PLACES[self.place])
        else:
            b = self.objects[1]
            first, second = [*_adjectives(a), a.shape], [*_adjectives(b), b.shape]
            words = [_article(first[0]), *first, self.relation, _article(second[0]), *second]
        if self.background is not None:
            words.append(f"on {_article(self.background)} {self.background} background")
        return " ".join(words)

    def metadata(self) -> dict:
        return {"toy_template": "relation" if self.relation else "single", "toy_modifiers": self.modifiers}


def _adjectives(o: ObjectSpec) -> list[str]:
    return ([o.size] if o.size != "medium" else []) + [o.color]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- codes
# single codes: digits (color, shape, size, layout, background); relation codes:
# (colorA, shapeA, sizeA, relation, colorB, shapeB, sizeB, background), offset by N_SINGLE.
_SINGLE_RADIX = (len(COLOR_NAMES), len(SHAPES), len(SIZES), len(LAYOUTS), len(BACKGROUNDS))
_OBJECT_RADIX = (len(COLOR_NAMES), len(SHAPES), len(SIZES))
_RELATION_RADIX = (*_OBJECT_RADIX, len(RELATIONS), *_OBJECT_RADIX, len(BACKGROUNDS))
N_SINGLE = int(np.prod(_SINGLE_RADIX))
N_RELATION = int(np.prod(_RELATION_RADIX))


def _digits(codes: np.ndarray, radix: tuple[int, ...]) -> list[np.ndarray]:
    """Mixed-radix digits, most significant first."""
    out, rest = [], np.asarray(codes)
    for base in reversed(radix):
        out.append(rest % base)
        rest = rest // base
    return out[::-1]


def _background_color_index(bg: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of a background digit, -1 for none/neutral backgrounds."""
    first = 1 + len(NEUTRALS)
    return np.where(bg >= first, bg - first, -1)


def _single_valid_and_unseen(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    color, shape, size, layout, bg = _digits(codes, _SINGLE_RADIX)
    multiple = np.array([COUNT[c] > 1 for c, _ in LAYOUTS])[layout]
    valid = (_background_color_index(bg) != color) & ~(multiple & (size == SIZES.index("large")))
    return valid, _held(color, shape)


def _relation_valid_and_unseen(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ca, sa, za, _rel, cb, sb, zb, bg = _digits(codes, _RELATION_RADIX)
    bgc = _background_color_index(bg)
    valid = (ca != cb) & (bgc != ca) & (bgc != cb)
    medium = SIZES.index("medium")
    complex_ = (za != medium) & (zb != medium) & (bg != 0)
    return valid, _held(ca, sa) | _held(cb, sb) | complex_


def _held(color: np.ndarray, shape: np.ndarray) -> np.ndarray:
    table = np.zeros((len(COLOR_NAMES), len(SHAPES)), dtype=bool)
    for c, s in HELD_OUT:
        table[COLOR_NAMES.index(c), SHAPES.index(s)] = True
    return table[color, shape]


@functools.cache
def split_codes(split: str) -> np.ndarray:
    """Sorted prompt codes of a split ("train", "unseen" or "all")  [n] int64."""
    if split not in ("train", "unseen", "all"):
        raise ValueError(f"unknown toy split '{split}': use train, unseen or all")
    singles = np.arange(N_SINGLE, dtype=np.int64)
    relations = np.arange(N_RELATION, dtype=np.int64)
    s_valid, s_unseen = _single_valid_and_unseen(singles)
    r_valid, r_unseen = _relation_valid_and_unseen(relations)
    if split == "all":
        keep_s, keep_r = s_valid, r_valid
    else:
        want = split == "unseen"
        keep_s, keep_r = s_valid & (s_unseen == want), r_valid & (r_unseen == want)
    return np.concatenate([singles[keep_s], N_SINGLE + relations[keep_r]])


def decode(code: int) -> Scene:
    """The scene of one prompt code."""
    code = int(code)
    if code < N_SINGLE:
        color, shape, size, layout, bg = (int(d) for d in _digits(np.int64(code), _SINGLE_RADIX))
        count, place = LAYOUTS[layout]
        return Scene(
            objects=(ObjectSpec(COLOR_NAMES[color], SHAPES[shape], SIZES[size]),),
            count=COUNT[count],
            place=place,
            background=BACKGROUNDS[bg],
        )
    ca, sa, za, rel, cb, sb, zb, bg = (int(d) for d in _digits(np.int64(code - N_SINGLE), _RELATION_RADIX))
    return Scene(
        objects=(
            ObjectSpec(COLOR_NAMES[ca], SHAPES[sa], SIZES[za]),
            ObjectSpec(COLOR_NAMES[cb], SHAPES[sb], SIZES[zb]),
        ),
        relation=RELATIONS[rel],
        background=BACKGROUNDS[bg],
    )


def encode(scene: Scene) -> int:
    """The prompt code of a scene (inverse of :func:`decode`); ValueError for a scene no prompt describes."""
    relation = scene.relation is not None
    layout = ({1: "one", 2: "two", 3: "three"}.get(scene.count), scene.place)
    try:
        if len(scene.objects) != 1 + relation or (relation and (scene.count != 1 or scene.place is not None)):
            raise ValueError("one object (a count or a place) or two objects and a relation")
        bg = BACKGROUNDS.index(scene.background)
        objects = [(COLOR_NAMES.index(o.color), SHAPES.index(o.shape), SIZES.index(o.size)) for o in scene.objects]
        if relation:
            code = int(
                np.ravel_multi_index((*objects[0], RELATIONS.index(scene.relation), *objects[1], bg), _RELATION_RADIX)
            )
            valid = _relation_valid_and_unseen(np.int64(code))[0]
            code += N_SINGLE
        else:
            code = int(np.ravel_multi_index((*objects[0], LAYOUTS.index(layout), bg), _SINGLE_RADIX))
            valid = _single_valid_and_unseen(np.int64(code))[0]
    except ValueError as exc:  # an unknown colour, shape, size, relation, background or layout
        raise ValueError(f"no toy prompt describes {scene} ({exc})") from None
    if not bool(valid):
        raise ValueError(f"no toy prompt describes {scene} (the grammar's rules exclude it)")
    return int(code)


# --------------------------------------------------------------------------- parsing
_PLACE_OF = {phrase: cell for cell, phrase in PLACES.items()}


class ParseError(ValueError):
    pass


def _parse_object(words: list[str], i: int, plural: bool) -> tuple[ObjectSpec, int]:
    size = "medium"
    if i < len(words) and words[i] in ("small", "large"):
        size, i = words[i], i + 1
    if i >= len(words) or words[i] not in COLORS:
        raise ParseError(f"expected a colour ({', '.join(COLOR_NAMES)}) at word {i + 1}")
    color, i = words[i], i + 1
    shape = words[i] if i < len(words) else ""
    if plural:
        shape = {p: s for s, p in PLURALS.items()}.get(shape, "")
    if shape not in SHAPES:
        raise ParseError(f"expected a shape ({', '.join(SHAPES)}) at word {i + 1}")
    return ObjectSpec(color, shape, size), i + 1


@functools.lru_cache(maxsize=65536)
def parse(text: str) -> Scene:
    """The scene a toy-grammar prompt describes (inverse of :meth:`Scene.text`); ParseError otherwise."""
    words = text.lower().replace(",", " ").split()
    background = None
    if len(words) >= 4 and words[-1] == "background" and words[-4] == "on" and words[-3] in ("a", "an"):
        background, words = words[-2], words[:-4]
        if background not in PALETTE:
            raise ParseError(f"unknown background colour '{background}'")
    if not words or words[0] not in ("a", "an", "two", "three"):
        raise ParseError("a toy prompt starts with 'a', 'an', 'two' or 'three'")
    count = {"a": 1, "an": 1, "two": 2, "three": 3}[words[0]]
    first, i = _parse_object(words, 1, plural=count > 1)
    rest = " ".join(words[i:])
    if not rest:
        return Scene((first,), count=count, background=background)
    if rest in _PLACE_OF and count == 1:
        return Scene((first,), place=_PLACE_OF[rest], background=background)
    for relation in RELATIONS:
        if count == 1 and rest.startswith(relation + " ") and rest.split()[len(relation.split())] in ("a", "an"):
            j = i + len(relation.split()) + 1
            second, j = _parse_object(words, j, plural=False)
            if j != len(words):
                break
            return Scene((first, second), relation=relation, background=background)
    raise ParseError(f"cannot read '{rest}' (expected a place, a relation or 'on a <colour> background')")


# --------------------------------------------------------------------------- as a prompt dataset
class CodedPrompts(PromptDataset):
    """Toy prompts held as their codes (``self.codes``), each decoded on demand."""

    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> Prompt:
        scene = decode(self.codes[index])
        return Prompt(scene.text(), scene.metadata())


class ToyPrompts(CodedPrompts):
    """The prompts of one split, decoded on demand (O(1) per prompt, nothing stored but the codes).

    ``limit``: keep that many prompts, half single-object and half two-object, spread
    evenly over each (dataset=toy_small); ``None`` keeps the whole split (toy_large, toy_unseen).
    ``template``: keep only ``single`` (one object, a count or a place) or ``relation`` (two objects)
    prompts, ``None`` both; with a ``limit``, that many spread over the one kind (toy_relations: the 16
    relation prompts of toy_small). Each prompt's metadata names its template and how many modifiers it has.
    """

    def __init__(self, split: str = "train", limit: int | None = None, template: str | None = None):
        if split not in ("train", "unseen", "all"):
            raise ConfigError("dataset.split", f"unknown toy split '{split}'", "use train, unseen or all")
        if template not in (None, "single", "relation"):
            raise ConfigError("dataset.template", f"unknown toy template '{template}'", "use single, relation or null")
        codes = split_codes(split)
        if template is not None:
            codes = codes[codes < N_SINGLE] if template == "single" else codes[codes >= N_SINGLE]
        if limit is not None:
            if limit < 2:
                raise ConfigError("dataset.limit", f"must be at least 2, got {limit}", "or null for the whole split")
            if template is not None:
                codes = codes[spread_indices(len(codes), limit)]
            else:
                singles, relations = codes[codes < N_SINGLE], codes[codes >= N_SINGLE]
                codes = np.concatenate(
                    [
                        singles[spread_indices(len(singles), limit // 2)],
                        relations[spread_indices(len(relations), limit - limit // 2)],
                    ]
                )
        self.codes = codes
        kind = "" if template is None else f"_{template}"
        self.name = f"toy_{split}{kind}" if limit is None else f"toy_{split}{kind}_{limit}"

    def evaluation_prompts(self, n: int) -> list[Prompt]:
        """``n`` fixed prompts, stratified: half single-object and half relation prompts, each half dealt
        in turn over the first object's (colour, shape) pairs that occur, each pair's prompts drawn without
        replacement by a fixed generator (so sizes, layouts, relations and backgrounds vary as in the split).
        The same every call."""
        if n >= len(self.codes):
            return [self[i] for i in range(len(self.codes))]
        picks, rng = [], np.random.default_rng(0)
        halves = (self.codes < N_SINGLE, self.codes >= N_SINGLE)
        sizes = (n - n // 2, n // 2) if halves[0].any() and halves[1].any() else (n, 0)
        for mask, want in zip(halves if halves[0].any() else halves[::-1], sizes):
            index = np.nonzero(mask)[0]
            strata = _first_object(self.codes[index])
            keys = np.unique(strata)
            for k, key in enumerate(keys):
                members = index[strata == key]
                take = want // len(keys) + (k < want % len(keys))
                picks += rng.choice(members, min(take, len(members)), replace=False).tolist()
        return [self[i] for i in sorted(picks)]


def _first_object(codes: np.ndarray) -> np.ndarray:
    """(colour, shape) of each code's first object, as one int."""
    single = codes < N_SINGLE
    color, shape = np.empty_like(codes), np.empty_like(codes)
    if single.any():
        c, s, *_ = _digits(codes[single], _SINGLE_RADIX)
        color[single], shape[single] = c, s
    if (~single).any():
        c, s, *_ = _digits(codes[~single] - N_SINGLE, _RELATION_RADIX)
        color[~single], shape[~single] = c, s
    return color * len(SHAPES) + shape


class ToyRephrased(CodedPrompts):
    """Held-out rewordings of a prompt set's two-object scenes: what a run learned on its prompts,
    asked in words no train prompt uses.

    Each relation prompt of ``of`` (the training set: ``of: ${dataset}``) gives ``per_prompt``
    prompts with the same two objects (colour and shape), the same relation and both objects'
    sizes named, on a named background: four modifiers, which puts every one of them in the
    ``unseen`` split (no train prompt has more than three). ``swap``: the two objects trade places
    in the sentence ("a green circle left of a red circle" for "a red circle left of a green
    circle"), so the relation asks for the mirrored layout. Evaluated side by side (the same sizes
    and backgrounds in both), the two sets tell a rule learned from the words (both gain) from a
    layout learned per pair of objects (the reworded prompts gain, the swapped ones lose):
    experiments/README.md, "What the demo learns". Which sizes and background a prompt gets is
    fixed by the source prompt's code. Single-object prompts of ``of`` are skipped.
    """

    def __init__(self, of: PromptDataset, swap: bool = False, per_prompt: int = 8):
        if not isinstance(of, PromptDataset):
            raise ConfigError("dataset.of", f"is {type(of).__name__}, not a prompt set", "of: ${dataset}")
        if per_prompt < 1:
            raise ConfigError("dataset.per_prompt", f"must be at least 1, got {per_prompt}")
        if per_prompt > REWORDINGS:
            raise ConfigError(
                "dataset.per_prompt",
                f"must be at most {REWORDINGS} (2 x 2 sizes x 9 backgrounds a pair can have), got {per_prompt}",
            )
        if isinstance(of, CodedPrompts):
            codes = of.codes
        else:  # a prompt file of toy prompts
            try:
                codes = np.array([encode(parse(of[i].text)) for i in range(len(of))], dtype=np.int64)
            except ValueError as exc:  # ParseError included
                raise ConfigError(
                    "dataset.of", f"the training prompts hold one outside the toy grammar: {exc}"
                ) from None
        sources = np.unique(codes[codes >= N_SINGLE])
        if len(sources) == 0:
            raise ConfigError(
                "dataset.of",
                f"{getattr(of, 'name', 'the prompt set')} has no two-object (relation) prompts to reword",
                "train on relation prompts (dataset=toy_relations), or evaluate without the rewordings: "
                "~dataset@eval_datasets.rephrased ~dataset@eval_datasets.swapped",
            )
        # rewordings depend on the objects and the relation only: one source per (A, relation, B), the
        # first in code order (a large set has at most 3,584 of them; the 8 of the demo are 8)
        ca, sa, _, rel, cb, sb, _, _ = _digits(sources - N_SINGLE, _RELATION_RADIX)
        _, first = np.unique(np.stack([ca, sa, rel, cb, sb], axis=1), axis=0, return_index=True)
        sources = sources[np.sort(first)]
        self.codes = np.concatenate([self._variants(int(c), swap, per_prompt) for c in sources])
        self.name = f"toy_{'swapped' if swap else 'rephrased'}_{getattr(of, 'name', 'prompts')}"

    @staticmethod
    def _variants(code: int, swap: bool, n: int) -> np.ndarray:
        """Up to ``n`` codes: the source's objects with both sizes named and a background, the objects
        keeping their sizes when ``swap`` trades their places in the sentence."""
        source = decode(code)
        a, b = source.objects
        named = ("small", "large")  # both sizes named (4 modifiers with the relation and a background)
        bgs = [bg for bg in BACKGROUNDS if bg is not None and bg not in (a.color, b.color)]
        choices = [(za, zb, bg) for za in named for zb in named for bg in bgs]
        codes = []
        for i in sorted(np.random.default_rng(code).permutation(len(choices))[:n]):
            za, zb, bg = choices[i]
            pair = (ObjectSpec(a.color, a.shape, za), ObjectSpec(b.color, b.shape, zb))
            codes.append(encode(Scene(pair[::-1] if swap else pair, relation=source.relation, background=bg)))
        return np.array(codes, dtype=np.int64)
