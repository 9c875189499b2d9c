"""The papers' prompt sets (HPDv2 + benchmark, Pick-a-Pic, DrawBench, Parti) from small local files in
each publication's own format, through the dataset configs; the Hugging Face cache path offline."""

from __future__ import annotations

import csv
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlft.config import build, register_configs
from rlft.errors import ConfigError
from tests.conftest import REPO


def _dataset(option: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"dataset={option}", *overrides])
    return build(OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True)), "dataset")


def _texts(data) -> list[str]:
    return [data[i].text for i in range(len(data))]


def test_hpdv2_train_json_keeps_each_prompt_once_in_first_seen_order(tmp_path):
    # HPDv2 train.json: one object per judged image set, a prompt repeated once per set
    rows = [
        {"prompt": "a red fox in snow ", "human_preference": [0, 1], "image_path": ["0.jpg", "1.jpg"]},
        {"prompt": "a castle at dusk", "human_preference": [1, 0], "image_path": ["2.jpg", "3.jpg"]},
        {"prompt": "a red fox in snow", "human_preference": [1, 0], "image_path": ["4.jpg", "5.jpg"]},
        {"prompt": "  ", "human_preference": [1, 0], "image_path": ["6.jpg", "7.jpg"]},
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    for path in (tmp_path / "train.json", tmp_path):  # the file itself, or a copy of the repo
        data = _dataset("hpdv2", f"dataset.path={path}")
        assert _texts(data) == ["a red fox in snow", "a castle at dusk"]
        assert data.name == "hpdv2" and data[0].metadata == {}


def test_hpdv2_benchmark_sets_from_a_copy_of_the_repo(tmp_path):
    styles = {"anime": 3, "concept-art": 2, "paintings": 2, "photo": 4}
    (tmp_path / "benchmark").mkdir()
    for style, n in styles.items():  # each a JSON list of prompt strings
        (tmp_path / "benchmark" / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(n)]))
    anime = _dataset("hpdv2_anime", f"dataset.path={tmp_path}")
    assert _texts(anime) == ["anime prompt 0", "anime prompt 1", "anime prompt 2"] and anime.name == "hpdv2_anime"
    assert len(_dataset("hpdv2_concept_art", f"dataset.path={tmp_path}")) == 2
    assert len(_dataset("hpdv2_photo", f"dataset.path={tmp_path}")) == 4
    assert len(_dataset("hpdv2_benchmark", f"dataset.path={tmp_path}")) == sum(styles.values())


def test_pickapic_parquet_shards_train_and_test_unique(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir = tmp_path / "data"
    data_dir.mkdir()

    def shard(name, captions):
        table = pa.table({"caption": captions, "best_image_uid": [f"u{i}" for i in range(len(captions))]})
        pq.write_table(table, data_dir / name)

    shard("train-00001-of-00002.parquet", ["a dog", "a frog"])
    shard("train-00000-of-00002.parquet", ["a cat", "a dog", ""])
    shard("test_unique-00000-of-00001.parquet", ["a teapot"])
    train = _dataset("pickapic", f"dataset.path={tmp_path}")
    assert _texts(train) == ["a cat", "a dog", "a frog"]  # shards in order, repeats and empties dropped
    assert _texts(_dataset("pickapic_test", f"dataset.path={tmp_path}")) == ["a teapot"]


def test_drawbench_csv_and_parti_tsv_keep_their_category_fields(tmp_path):
    with (tmp_path / "drawbench.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["Prompts", "Category"], ["A red colored car.", "Colors"], ["Two cats.", "Counting"]])
    draw = _dataset("drawbench", f"dataset.path={tmp_path}")
    assert _texts(draw) == ["A red colored car.", "Two cats."] and draw[1].metadata == {"Category": "Counting"}

    rows = [["Prompt", "Category", "Challenge", "Note"], ["bond", "Abstract", "Basic", ""]]
    rows.append(["a tiger reading, oil on canvas", "Animals", "Style & Format", "from a note"])
    (tmp_path / "PartiPrompts.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    parti = _dataset("parti", f"dataset.path={tmp_path / 'PartiPrompts.tsv'}")
    assert _texts(parti) == ["bond", "a tiger reading, oil on canvas"]
    assert parti[1].metadata == {"Category": "Animals", "Challenge": "Style & Format"}


def test_bad_local_copies_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path: '.*nope' does not exist"):
        _dataset("parti", f"dataset.path={tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match=r"dataset.path: no file in .* matches \['PartiPrompts.tsv'\]"):
        _dataset("parti", f"dataset.path={tmp_path}")
    (tmp_path / "PartiPrompts.tsv").write_text("prompt\tCategory\nbond\tAbstract\n")
    with pytest.raises(ConfigError, match=r"dataset.column: 'Prompt' is not a field .* \(fields: prompt, Category\)"):
        _dataset("parti", f"dataset.path={tmp_path}")
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(ConfigError, match="dataset.path: .* holds no prompts"):
        _dataset("hpdv2", f"dataset.path={tmp_path}")
