"""HPSv2 / v2.1 on a shrunk open_clip ViT-H-14 saved as the published HPS checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rlft.errors import ConfigError
from rlft.rewards.hps import HPSv2
from tests.conftest import FAST, read_metrics, run_cli
from tests.helpers import TINY_HPS_SIZE, save_tiny_hps, write_hub_cache

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SIZE = TINY_HPS_SIZE


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    path = tmp_path_factory.mktemp("hps")
    save_tiny_hps(path)
    return path


def _reference_pixels(image: torch.Tensor) -> torch.Tensor:
    """The HPS evaluation transform by hand: longest side to SIZE (bicubic), zero padding split as
    (pad // 2, pad - pad // 2), then the OpenAI CLIP mean/std."""
    pil = Image.fromarray((image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    w, h = pil.size
    scale = SIZE / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    resized = np.asarray(pil.resize((nw, nh), Image.BICUBIC))
    canvas = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    top, left = (SIZE - nh) // 2, (SIZE - nw) // 2
    canvas[top : top + nh, left : left + nw] = resized
    x = torch.from_numpy(canvas).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]


@pytest.mark.parametrize("height,width", [(40, 40), (40, 24)], ids=["square", "portrait-padded"])
def test_hps_is_the_cosine_of_the_checkpoint_clip_with_the_reference_preprocessing(tiny_hps, height, width):
    import open_clip

    reward = HPSv2(path=str(tiny_hps / "HPS_v2_compressed.pt"), arch=str(tiny_hps / "ViT-H-14-tiny.json"))
    reward.batch_size = 2  # two batches
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, height, width, generator=g)
    prompts = ["a cat", "a dog on a mat", "an astronaut riding a horse, oil painting"]
    out = reward(images, prompts, [{}] * 3)
    assert out.scores.shape == (3,) and reward.name == "hpsv2"
    # independently: a fresh model with the checkpoint's weights, the transform by hand, open_clip.tokenize
    model = open_clip.create_model("ViT-H-14-tiny", pretrained=None).eval()
    model.load_state_dict(torch.load(tiny_hps / "HPS_v2_compressed.pt", weights_only=True)["state_dict"])
    pixels = torch.stack([_reference_pixels(im) for im in images])
    with torch.no_grad():
        a = model.encode_image(pixels)
        b = model.encode_text(open_clip.tokenize(prompts))
    expected = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))  # no logit scale
    assert torch.allclose(out.scores, expected, atol=1e-5), (out.scores, expected)
    assert (out.scores.abs() <= 1).all()


def test_hps_v21_reads_its_own_checkpoint_name_and_logs_as_hpsv2_1(tiny_hps, tmp_path):
    v21 = tmp_path / "HPS_v2.1_compressed.pt"
    v21.write_bytes((tiny_hps / "HPS_v2_compressed.pt").read_bytes())
    reward = HPSv2(version="v2.1", path=str(v21), arch=str(tiny_hps / "ViT-H-14-tiny.json"))
    assert reward.name == "hpsv2_1"
    with pytest.raises(ConfigError, match="reward.path: HPS checkpoint .* does not exist.*HPS_v2.1_compressed.pt"):
        HPSv2(version="v2.1", path=str(tmp_path / "missing.pt"))


def test_hps_bad_settings_fail_with_the_key(tiny_hps, tmp_path):
    with pytest.raises(ConfigError, match="reward.version: unknown HPS version 'v3'"):
        HPSv2(version="v3", path=str(tiny_hps / "HPS_v2_compressed.pt"))
    with pytest.raises(ConfigError, match="reward.arch: 'ViT-Q-99' is not an open_clip architecture"):
        HPSv2(path=str(tiny_hps / "HPS_v2_compressed.pt"), arch="ViT-Q-99")
    with pytest.raises(ConfigError, match="reward.path: .* does not fit open_clip ViT-B-32"):
        HPSv2(path=str(tiny_hps / "HPS_v2_compressed.pt"), arch="ViT-B-32")
    (tmp_path / "truncated.pt").write_bytes((tiny_hps / "HPS_v2_compressed.pt").read_bytes()[:1000])
    with pytest.raises(ConfigError, match="reward.path: cannot read .*truncated.pt' as an HPS checkpoint"):
        HPSv2(path=str(tmp_path / "truncated.pt"), arch=str(tiny_hps / "ViT-H-14-tiny.json"))
    with pytest.raises(ConfigError, match="reward.dtype: 'half' is not one of"):
        HPSv2(path=str(tiny_hps / "HPS_v2_compressed.pt"), dtype="half")


def test_offline_run_from_a_populated_hub_cache(cache_dir, tmp_path):
    """HF_HUB_OFFLINE=1 with the HPS checkpoint and the HPDv2 prompt files in the Hugging Face cache: a
    PRDP epoch with reward=hpsv2 on dataset=hpdv2, evaluated on a benchmark set, runs; with an empty
    cache it stops before training, naming the key to set."""
    arch, checkpoint = save_tiny_hps(tmp_path)
    hub = tmp_path / "hub"
    write_hub_cache(hub, "xswu/HPSv2", {"HPS_v2_compressed.pt": checkpoint.read_bytes()}, repo_type="model")
    rows = [{"prompt": p, "human_preference": [1, 0]} for p in ["a cat", "a dog", "a cat", "an owl", "a fox"]]
    write_hub_cache(hub, "ymhao/HPDv2", {"train.json": json.dumps(rows).encode()})
    write_hub_cache(hub, "zhwang/HPDv2", {"benchmark/anime.json": json.dumps(["anime cat", "anime owl"]).encode()})
    args = [
        *FAST, "algorithm=prdp", "reward=hpsv2", f"reward.arch={arch}", "dataset=hpdv2",
        "+dataset@eval_datasets.anime=hpdv2_anime", "trainer.epochs=1", "trainer.eval_every=1",
        "trainer.eval_num_prompts=2", "trainer.checkpoint_every=0", f"paths.output_root={tmp_path / 'out'}",
        "run_name=hps",
    ]  # fmt: skip
    result = run_cli(args, cache_dir, env={"HF_HUB_CACHE": str(hub)})
    assert result.returncode == 0, result.stderr[-3000:]
    logged = {k: v for row in read_metrics(tmp_path / "out" / "hps") for k, v in row.items()}
    assert {"eval/seen/reward/mean", "eval/anime/reward/mean", "reward/mean"} <= set(logged), sorted(logged)
    assert -1 <= logged["eval/anime/reward/mean"] <= 1  # a cosine

    empty = run_cli(args, cache_dir, env={"HF_HUB_CACHE": str(tmp_path / "empty")})
    assert empty.returncode == 2 and "Traceback" not in empty.stderr, empty.stderr[-3000:]
    assert "3 of the files this run needs are missing (HF_HUB_OFFLINE=1)" in empty.stderr, empty.stderr[-3000:]
    assert "reward.path: HPS checkpoint 'xswu/HPSv2' is not in the Hugging Face cache" in empty.stderr
    assert "dataset.path: prompt files 'ymhao/HPDv2' is not in the Hugging Face cache" in empty.stderr
    assert "eval_datasets.anime.path: prompt files 'zhwang/HPDv2'" in empty.stderr
