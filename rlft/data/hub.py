"""Prompt sets published as Hugging Face dataset repos: HPDv2, its benchmark, Pick-a-Pic, DrawBench, Parti.

Each set names its repo and the files in it that hold the prompts (glob patterns). Where the
files come from, first match wins:

1. ``path``: a local file, or a local directory laid out like the repo (a copy of it);
2. the Hugging Face cache (with ``HF_HUB_OFFLINE=1``, the cache alone);
3. the hub, which fills the cache (``huggingface_hub.snapshot_download`` of the named files only).

Without network, cache or local copy, start-up fails naming the repo and ``dataset.path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlft.data import Prompt, PromptDataset, prompts_from_rows, read_rows
from rlft.errors import ConfigError, moved_hint


class HubPrompts(PromptDataset):
    """The prompts in ``column`` of the ``files`` of the dataset repo ``repo`` (or of a local copy).

    ``metadata`` lists the fields kept with each prompt (e.g. Parti's Category); ``unique`` keeps the
    first of repeated prompts (HPDv2 lists a prompt once per judged image pair). Files are read in
    sorted order, so the prompt order, and with it the seeded prompt stream, is the same everywhere.
    """

    def __init__(
        self,
        repo: str,
        files: list[str],
        column: str = "prompt",
        path: str | None = None,
        revision: str | None = None,
        metadata: list[str] | None = None,
        unique: bool = True,
        name: str = "prompts",
    ):
        if not files:
            raise ConfigError("dataset.files", "is empty", "name the repo files that hold the prompts")
        self.name = name
        paths = self._local_files(path, files) if path else self._hub_files(repo, files, revision)
        rows = [row for p in paths for row in read_rows(p, column, metadata)]
        self.prompts = prompts_from_rows(rows, column, path or repo, metadata, unique)

    @staticmethod
    def _match(root: Path, files: Sequence[str], source: str) -> list[Path]:
        found = sorted({p for pattern in files for p in root.glob(pattern) if p.is_file()})
        if not found:
            raise ConfigError(
                "dataset.path",
                f"no file in '{source}' matches {list(files)}",
                "point dataset.path at a copy of the repo (or at the prompt file itself), or set dataset.files",
            )
        return found

    def _local_files(self, path: str, files: Sequence[str]) -> list[Path]:
        local = Path(path).expanduser()
        if local.is_file():
            return [local]
        if not local.is_dir():
            raise ConfigError("dataset.path", f"'{path}' does not exist", "set dataset.path to a file or directory")
        return self._match(local, files, path)

    def _hub_files(self, repo: str, files: Sequence[str], revision: str | None) -> list[Path]:
        from huggingface_hub import snapshot_download

        try:
            root = snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=list(files))
        except Exception as exc:  # offline and not cached, no such repo, no network
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                "dataset.path",
                f"cannot fetch {list(files)} of the hub dataset '{repo}' ({detail})",
                "download them and set dataset.path to the file or folder, or fill the Hugging Face cache "
                "and set HF_HUB_OFFLINE=1" + moved_hint(repo, "dataset.repo"),
            ) from None
        return self._match(Path(root), files, f"hub dataset {repo}")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]
