"""Prompt sets, the resumable stream, and the JPEG rewards."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from rlft.data import NounsActivities, PackagedPrompts, PromptFile, PromptList, PromptStream, shard
from rlft.errors import ConfigError
from rlft.rewards.base import RewardOutput, WeightedSum
from rlft.rewards.jpeg import JpegCompressibility, JpegIncompressibility, jpeg_size_kb


def test_packaged_prompt_sets():
    assert len(PackagedPrompts("simple_animals")) == 45
    assert len(PackagedPrompts("imagenet_animals")) == 398
    na = NounsActivities()
    assert len(na) == 45 * 3 and na[0].text == "a cat riding a bike" and na[3 * 2 + 2].text.startswith("a horse")
    assert PackagedPrompts("simple_animals", template="A painting of a {}")[1].text == "A painting of a dog"
    with pytest.raises(ConfigError, match="known: .*simple_animals"):
        PackagedPrompts("nope")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat", "id": 1}\n{"prompt": "a cow", "id": 2}\n')
    (tmp_path / "p.csv").write_text("caption,source\na red bus,x\na blue car,y\n")
    assert [p.text for p in PromptFile(str(tmp_path / "p.txt"))] == ["a cat", "a dog"]
    jl = PromptFile(str(tmp_path / "p.jsonl"))
    assert jl[1].text == "a cow" and jl[1].metadata == {"id": 2}
    assert PromptFile(str(tmp_path / "p.csv"), column="caption")[0].metadata == {"source": "x"}
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        PromptFile(str(tmp_path / "empty.txt"))
    with pytest.raises(ConfigError, match="does not exist"):
        PromptFile(str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="'prompt' is not a field"):
        PromptFile(str(tmp_path / "p.csv"))


@pytest.mark.parametrize(
    "name,content,needle",
    [
        ("latin1.txt", "a caf\xe9\n".encode("latin-1"), r"latin1.txt' is not UTF-8 text \(byte 5"),
        ("bad.jsonl", b'{"prompt": "a cat"}\n{"prompt": "a dog"\n', r"bad.jsonl' line 2 is not JSON"),
        ("list.jsonl", b'["a cat"]\n', r"list.jsonl' line 1 is a JSON list \(expected an object\)"),
        ("bad.json", b'["a cat",', r"bad.json' is not JSON"),
        ("latin1.csv", "prompt\na caf\xe9\n".encode("latin-1"), r"latin1.csv' is not UTF-8 text"),
    ],
)
def test_unreadable_prompt_files_name_the_file_and_the_line(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=r"^dataset.path: .*" + needle):
        PromptFile(str(tmp_path / name))


def test_a_feedback_map_that_is_not_an_image_is_refused_at_start_up(tmp_path):
    from rlft.rewards.feedback import FeedbackMap

    (tmp_path / "map.png").write_text("not an image")
    with pytest.raises(ConfigError, match=r"feedback map '.*map.png' is not a readable image"):
        FeedbackMap(root=str(tmp_path)).check_metadata([{"feedback_map": "map.png"}])


def test_stream_is_deterministic_resumable_and_covers_each_pass():
    data = PromptList([str(i) for i in range(10)])
    a = PromptStream(data, seed=3)
    first = a.next_indices(4) + a.next_indices(6)
    assert sorted(first) == list(range(10))  # one pass = a permutation
    state = a.state_dict()
    cont = a.next_indices(7)
    b = PromptStream(data, seed=3)
    b.load_state_dict(state)
    assert b.next_indices(7) == cont
    assert PromptStream(data, seed=3).next_indices(10) == first
    assert PromptStream(data, seed=4).next_indices(10) != first
    assert shard(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_jpeg_reward_formula():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 32, 32, generator=g)
    flat = torch.full((1, 3, 32, 32), 0.5)
    pixels = (noise[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    assert float(jpeg_size_kb(noise)[0]) == pytest.approx(len(buf.getvalue()) / 1000)
    images = torch.cat([noise, flat])
    inc, comp = JpegIncompressibility()(images, ["", ""], [{}, {}]), JpegCompressibility()(images, ["", ""], [{}, {}])
    torch.testing.assert_close(comp.scores, -inc.scores)
    assert inc.scores[0] > inc.scores[1]  # noise is less compressible than a flat image
    assert comp.maps is None and set(comp.components) == {"jpeg_compressibility"}


def test_weighted_sum_composes_and_logs_components():
    images = torch.rand(2, 3, 16, 16)
    total = WeightedSum({"inc": JpegIncompressibility(), "comp": JpegCompressibility()}, {"inc": 2.0, "comp": 0.5})
    out = total(images, ["a", "b"], [{}, {}])
    inc = jpeg_size_kb(images)
    torch.testing.assert_close(out.scores, 2.0 * inc - 0.5 * inc)
    assert set(out.components) == {"inc", "comp"}
    cat = RewardOutput.cat([out, out])
    assert cat.scores.shape == (4,) and cat.components["inc"].shape == (4,)
