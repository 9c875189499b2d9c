"""Prompt datasets and the deterministic, resumable prompt stream.

A dataset is an indexable list of :class:`Prompt` (text + metadata a reward may
read). :class:`PromptStream` turns it into an endless sequence of shuffled
passes; every process draws the same global batch of prompt indices and keeps
its own contiguous slice, so all images of one prompt live on one process.
Drawing a batch is O(batch) plus one permutation per pass over the dataset;
the stream's whole state is one integer (its position).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlft.errors import ConfigError


def spread_indices(size: int, n: int) -> np.ndarray:
    """``min(n, size)`` indices spread evenly over range(size), first and last included."""
    return np.linspace(0, size - 1, num=min(n, size)).round().astype(int)


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


class PromptDataset:
    """An indexable set of prompts."""

    name: str = "prompts"

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Prompt:
        raise NotImplementedError

    def evaluation_prompts(self, n: int) -> list[Prompt]:
        """``n`` fixed prompts spread evenly over the dataset (the same every call)."""
        return [self[int(i)] for i in spread_indices(len(self), n)]


class PromptList(PromptDataset):
    """Prompts given in the config: ``template`` formats each item ("A painting of a {}")."""

    def __init__(self, prompts: list[str], template: str = "{}", name: str = "prompts"):
        if not prompts:
            raise ConfigError("dataset.prompts", "is empty", "give at least one prompt")
        self.name = name
        self.prompts = [template.format(p) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return Prompt(self.prompts[index])


def _packaged_lines(name: str) -> list[str]:
    text = resources.files("rlft.data").joinpath("prompts", f"{name}.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


class PackagedPrompts(PromptList):
    """A prompt set shipped with rlft (``rlft/data/prompts/<name>.txt``), e.g. DDPO's simple_animals."""

    def __init__(self, name: str, template: str = "{}"):
        try:
            lines = _packaged_lines(name)
        except FileNotFoundError:
            known = sorted(p.stem for p in Path(__file__).parent.joinpath("prompts").glob("*.txt"))
            raise ConfigError(
                "dataset.name", f"no packaged prompt set '{name}'", f"known: {', '.join(known)}"
            ) from None
        super().__init__(lines, template=template, name=name)


def _article(noun: str) -> str:
    return "an" if noun[:1].lower() in "aeiou" else "a"


class NounsActivities(PromptDataset):
    """DDPO's prompt-alignment set: "a(n) <noun> <activity>" over all noun x activity pairs."""

    def __init__(self, nouns: str = "simple_animals", activities: str = "activities"):
        self.name = "nouns_activities"
        self.nouns = _packaged_lines(nouns)
        self.activities = _packaged_lines(activities)

    def __len__(self) -> int:
        return len(self.nouns) * len(self.activities)

    def __getitem__(self, index: int) -> Prompt:
        noun = self.nouns[index // len(self.activities)]
        activity = self.activities[index % len(self.activities)]
        return Prompt(f"{_article(noun)} {noun} {activity}", {"noun": noun, "activity": activity})


PROMPT_FILE_TYPES = (".txt", ".json", ".jsonl", ".csv", ".tsv", ".parquet")


def _not_utf8(key: str, path: Path, e: UnicodeDecodeError) -> ConfigError:
    return ConfigError(key, f"'{path}' is not UTF-8 text (byte {e.start}: {e.reason})", "save it as UTF-8")


def read_rows(
    path: Path, column: str, fields: Sequence[str] | None = None, key: str = "dataset.path"
) -> list[dict[str, Any]]:
    """The rows of a prompt file, by suffix: .txt (one prompt per line), .json (a list of strings or of
    objects), .jsonl (one object per line), .csv / .tsv (a header row), .parquet (only ``column`` and
    ``fields`` are read when ``fields`` is given). A plain prompt (a .txt line, a string in a .json list)
    becomes ``{column: prompt}``."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".jsonl", ".json", ""):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(key, path, e) from None
    if suffix in (".txt", ""):
        return [{column: line.strip()} for line in text.splitlines() if line.strip()]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(key, f"'{path}' line {number} is not JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rows[-1], dict):
                kind = type(rows[-1]).__name__
                raise ConfigError(key, f"'{path}' line {number} is a JSON {kind}", "expected an object")
        return rows
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(key, f"'{path}' is not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
        if not isinstance(items, list):
            raise ConfigError(key, f"'{path}' holds a JSON {type(items).__name__}", "expected a list of prompts")
        return [item if isinstance(item, dict) else {column: item} for item in items]
    if suffix in (".csv", ".tsv"):
        try:
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        except UnicodeDecodeError as e:
            raise _not_utf8(key, path, e) from None
        except csv.Error as e:
            raise ConfigError(key, f"'{path}' is not a readable {suffix[1:].upper()} file ({e})") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        wanted = None if fields is None else [c for c in (column, *fields) if c in names]
        return pq.read_table(path, columns=wanted or None).to_pylist()
    raise ConfigError(key, f"unknown prompt file type '{suffix}'", f"use one of {', '.join(PROMPT_FILE_TYPES)}")


def prompts_from_rows(
    rows: list[Mapping[str, Any]],
    column: str,
    source: str,
    metadata: Sequence[str] | None = None,
    unique: bool = False,
    key: str = "dataset",
) -> list[Prompt]:
    """Prompts from ``rows[i][column]`` (stripped; empty ones dropped). ``metadata`` names the fields kept
    with each prompt (None: every other field). ``unique`` keeps the first of repeated prompts."""
    if not rows:
        raise ConfigError(f"{key}.path", f"'{source}' holds no prompts", "add one prompt per line or row")
    if column not in rows[0]:
        raise ConfigError(f"{key}.column", f"'{column}' is not a field of '{source}'", f"fields: {', '.join(rows[0])}")
    missing = [m for m in metadata or () if m not in rows[0]]
    if missing:
        raise ConfigError(f"{key}.metadata", f"{missing} are not fields of '{source}'", f"fields: {', '.join(rows[0])}")
    prompts, seen = [], set()
    for row in rows:
        text = str(row[column] or "").strip()
        if not text or (unique and text in seen):
            continue
        seen.add(text)
        fields = metadata if metadata is not None else [k for k in row if k != column]
        prompts.append(Prompt(text, {k: row[k] for k in fields}))
    if not prompts:
        raise ConfigError(f"{key}.path", f"'{source}' holds only empty prompts")
    return prompts


class PromptFile(PromptDataset):
    """Prompts from a local file: .txt (one per line), .json, .jsonl, .csv, .tsv or .parquet.

    ``column`` names the field holding the prompt (default "prompt");
    the other fields become the prompt's metadata.
    """

    def __init__(self, path: str, column: str = "prompt"):
        p = Path(path).expanduser()
        self.name = p.stem
        if not p.is_file():
            raise ConfigError("dataset.path", f"prompt file '{path}' does not exist", "set dataset.path to a file")
        self.prompts = prompts_from_rows(read_rows(p, column), column, path)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]


class PromptStream:
    """Endless stream of prompt indices: pass k is a permutation of the dataset seeded by (seed, k)."""

    def __init__(self, dataset: PromptDataset, seed: int, shuffle: bool = True):
        if len(dataset) == 0:
            raise ConfigError("dataset", "holds no prompts")
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._pass, self._order = -1, None

    def _order_of(self, k: int) -> torch.Tensor:
        if k != self._pass:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0]))
                self._order = torch.randperm(n, generator=g)
            else:
                self._order = torch.arange(n)
            self._pass = k
        return self._order

    def next_indices(self, n: int) -> list[int]:
        """The next ``n`` global prompt indices (identical on every process)."""
        out, size = [], len(self.dataset)
        while len(out) < n:
            k, offset = divmod(self.position, size)
            take = min(n - len(out), size - offset)
            out.extend(self._order_of(k)[offset : offset + take].tolist())
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "size": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["size"] != len(self.dataset):
            raise ConfigError("dataset", f"holds {len(self.dataset)} prompts but the checkpoint's held {state['size']}")
        self.position = int(state["position"])


def shard(items: Sequence, rank: int, world: int) -> list:
    """Contiguous slice ``rank`` of ``world`` equal slices (len(items) must divide)."""
    per = len(items) // world
    return list(items[rank * per : (rank + 1) * per])
