"""PickScore and the LAION aesthetic predictor on tiny random CLIPs saved in the published layout."""

from __future__ import annotations

import pytest
import torch

from rlft.errors import ConfigError
from rlft.rewards.clip import Aesthetic, AestheticMLP, PickScore


def _tiny_clip_config():
    from transformers import CLIPConfig

    text = dict(
        vocab_size=520, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
    )  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    vision = {**vision, "patch_size": 8, "projection_dim": 12}  # the vision tower alone reads its own
    return CLIPConfig(text_config={**text, "projection_dim": 12}, vision_config=vision, projection_dim=12)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIPModel + CLIPImageProcessor + character-level CLIP tokenizer, as PickScore_v1 is laid out."""
    from transformers import CLIPImageProcessor, CLIPModel

    from rlft.models import _char_bpe_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    model = CLIPModel(_tiny_clip_config())
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.save_pretrained(path)
    tokenizer = _char_bpe_tokenizer(path / "_tok", max_length=77)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _images(n=3, size=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


def test_pickscore_is_exp_logit_scale_times_cosine(tiny_clip):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    reward = PickScore(path=str(tiny_clip), processor_path=str(tiny_clip), batch_size=2)  # two batches
    images, prompts = _images(), ["a cat", "a dog on a mat", "blue"]
    out = reward(images, prompts, [{}] * 3)
    # independently: the full CLIP forward, its own embeddings, cosine by hand
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(prompts, padding=True, return_tensors="pt")
    pixels = processor(images=[img for img in (images * 255).round().to(torch.uint8)], return_tensors="pt")
    with torch.no_grad():
        full = model(pixel_values=pixels["pixel_values"], **tokens)
    a, b = full.image_embeds, full.text_embeds
    cosine = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    expected = torch.exp(torch.tensor(2.0)) * cosine  # the tiny CLIP's logit_scale is 2
    assert torch.allclose(out.scores, expected, atol=1e-5), (out.scores, expected)
    # scale=cosine: the 0-1 scale PRDP reports (its presets use it)
    plain = PickScore(path=str(tiny_clip), processor_path=str(tiny_clip), scale="cosine")(images, prompts, [{}] * 3)
    assert torch.allclose(plain.scores, cosine, atol=1e-6), (plain.scores, cosine)
    with pytest.raises(ConfigError, match="reward.scale: 'raw' is not one of logit, cosine"):
        PickScore(path=str(tiny_clip), processor_path=str(tiny_clip), scale="raw")


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(tiny_clip, tmp_path):
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    head = AestheticMLP(embed_dim=12)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    reward = Aesthetic(mlp_path=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip_path=str(tiny_clip))
    images = _images(seed=3)
    out = reward(images, ["", "", ""], [{}] * 3)
    vision = CLIPVisionModelWithProjection.from_pretrained(tiny_clip).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")(
        images=[img for img in (images * 255).round().to(torch.uint8)], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        e = vision(pixel_values=pixels).image_embeds
        e = e / e.norm(dim=-1, keepdim=True)
        linear = [m for m in head.layers if isinstance(m, torch.nn.Linear)]  # no activations, dropout off
        for layer in linear:
            e = e @ layer.weight.T + layer.bias
    assert torch.allclose(out.scores, e.squeeze(-1), atol=1e-5), (out.scores, e)


def test_missing_weights_name_the_key_to_set(tmp_path):
    with pytest.raises(ConfigError, match="reward.mlp_path: aesthetic predictor weights .* do not exist"):
        Aesthetic(mlp_path=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="reward.processor_path: '/nonexistent/clip' does not exist"):
        PickScore(path="/nonexistent/pick", processor_path="/nonexistent/clip")


def test_clipscore_is_100_times_the_clamped_cosine(tiny_clip):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from rlft.rewards.clip import ClipScore

    reward = ClipScore(path=str(tiny_clip))
    images, prompts = _images(seed=5), ["a cat", "a dog on a mat", "blue"]
    out = reward(images, prompts, [{}] * 3)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")(
        images=[img for img in (images * 255).round().to(torch.uint8)], return_tensors="pt"
    )["pixel_values"]
    tokens = AutoTokenizer.from_pretrained(tiny_clip)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(pixel_values=pixels, **tokens)
    cosine = torch.nn.functional.cosine_similarity(full.image_embeds, full.text_embeds, dim=-1)
    assert torch.allclose(out.scores, 100 * cosine.clamp_min(0), atol=1e-3), (out.scores, cosine)


def test_multi_reward_is_10_pickscore_plus_2_hpsv2_plus_005_aesthetic(tiny_clip, tmp_path):
    """reward=multi_reward (PRDP Table 4) composed from config with every component on tiny local weights:
    the total is the weighted sum of the components' own scores, and each component is reported."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlft.config import build, register_configs
    from rlft.rewards.hps import HPSv2
    from tests.conftest import REPO
    from tests.helpers import save_tiny_hps

    arch, checkpoint = save_tiny_hps(tmp_path)
    torch.manual_seed(2)
    torch.save(AestheticMLP(embed_dim=12).state_dict(), tmp_path / "mlp.pth")
    overrides = [
        "reward=multi_reward",
        *(f"reward.rewards.pickscore.{k}={tiny_clip}" for k in ("path", "processor_path")),
        f"reward.rewards.hpsv2.path={checkpoint}",
        f"reward.rewards.hpsv2.arch={arch}",
        f"reward.rewards.aesthetic.mlp_path={tmp_path / 'mlp.pth'}",
        f"reward.rewards.aesthetic.clip_path={tiny_clip}",
    ]
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        node = compose("config", overrides=overrides).reward
    assert node.rewards.pickscore.scale == "cosine"  # PRDP's scale: the weights are the paper's
    reward = build(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), "reward")
    images, prompts = _images(seed=7), ["a cat", "a dog on a mat", "blue"]
    out = reward(images, prompts, [{}] * 3)
    parts = {
        "pickscore": PickScore(path=str(tiny_clip), processor_path=str(tiny_clip), scale="cosine")(
            images, prompts, [{}] * 3
        ).scores,
        "hpsv2": HPSv2(path=str(checkpoint), arch=str(arch))(images, prompts, [{}] * 3).scores,
        "aesthetic": Aesthetic(mlp_path=str(tmp_path / "mlp.pth"), clip_path=str(tiny_clip))(
            images, prompts, [{}] * 3
        ).scores,
    }
    assert set(out.components) == set(parts)
    for name, scores in parts.items():
        assert torch.allclose(out.components[name], scores, atol=1e-6), name
    expected = 10 * parts["pickscore"] + 2 * parts["hpsv2"] + 0.05 * parts["aesthetic"]
    assert torch.allclose(out.scores, expected, atol=1e-5)
    # a component's missing weights are reported under its own key
    node.rewards.hpsv2.path = str(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match=r"reward.rewards.hpsv2.path: HPS checkpoint .*nope.pt' does not exist"):
        build(OmegaConf.create(OmegaConf.to_container(node, resolve=True)), "reward")


def test_a_held_out_clip_reward_gives_the_feature_drift_and_diversity(tiny_clip, cache_dir, tmp_path):
    """+reward@eval_rewards.pick=pickscore beside the training reward: its scores are logged per set,
    and its image encoder measures drift (1 - cos to the base image) and diversity, as a hand computation
    on the saved images gives them; the features are CLIP's projected image embeddings."""
    from transformers import AutoImageProcessor, CLIPModel

    from tests.conftest import FAST, read_metrics, run_cli

    images = _images(seed=7)
    reward = PickScore(path=str(tiny_clip), processor_path=str(tiny_clip), batch_size=2)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    pixels = AutoImageProcessor.from_pretrained(tiny_clip, backend="pil")(
        images=[img for img in (images * 255).round().to(torch.uint8)], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(reward.image_features(images), embeds, atol=1e-5)

    args = [
        f"paths.output_root={tmp_path}",
        "run_name=pick",
        *FAST,
        "trainer.epochs=2",
        "trainer.eval_every=2",
        "trainer.eval_num_prompts=4",
        "trainer.eval_images_per_prompt=3",
        "optimizer.lr=1e-3",
        "+reward@eval_rewards.pick=pickscore",
        f"eval_rewards.pick.path={tiny_clip}",
        f"eval_rewards.pick.processor_path={tiny_clip}",
    ]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    last = read_metrics(tmp_path / "pick")[-1]
    base = torch.load(tmp_path / "pick" / "eval" / "base.pt", weights_only=True)["seen"]
    now = torch.load(tmp_path / "pick" / "eval" / "latest.pt", weights_only=True)["seen"]
    f0, f1 = reward.image_features(base["images"].float() / 255), reward.image_features(now["images"].float() / 255)
    drift = 1 - torch.nn.functional.cosine_similarity(f1.double(), f0.double(), dim=-1)
    assert last["eval/seen/drift/clip/mean"] > 0
    assert abs(last["eval/seen/drift/clip/mean"] - float(drift.mean())) < 1e-5
    diversity = []
    for p in dict.fromkeys(now["prompts"]):
        index = [i for i, q in enumerate(now["prompts"]) if q == p]
        pairs = [(i, j) for i in index for j in index if i < j]
        diversity.append(sum(1 - torch.cosine_similarity(f1[i].double(), f1[j].double(), dim=0) for i, j in pairs) / 3)
    assert abs(last["eval/seen/diversity/clip/mean"] - float(sum(diversity) / 4)) < 1e-5
    scores = reward(now["images"].float() / 255, now["prompts"], [{}] * len(now["prompts"])).scores
    assert abs(last["eval/seen/pick/mean"] - float(scores.mean())) < 1e-3
    assert "held-out rewards on seen (paired gain ± SE over prompts): pick " in result.stdout
