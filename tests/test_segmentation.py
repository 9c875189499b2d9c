"""reward=segmentation on a tiny random SegFormer saved in the published layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlft.errors import ConfigError
from rlft.rewards.segmentation import Segmentation


@pytest.fixture(scope="module")
def tiny_segformer(tmp_path_factory):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    torch.manual_seed(0)
    labels = ["wall", "sky", "tree"]
    config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=16,
        num_labels=3, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
    )  # fmt: skip
    path = tmp_path_factory.mktemp("segformer")
    SegformerForSemanticSegmentation(config).save_pretrained(path)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(path)
    return path


def test_score_is_the_mean_class_probability_of_the_processor_pipeline(tiny_segformer):
    from PIL import Image
    from transformers import AutoImageProcessor, SegformerForSemanticSegmentation

    reward = Segmentation(str(tiny_segformer), target_class="sky")
    assert reward.target == 1
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), generator=g).float() / 255  # exact in uint8
    out = reward(images, ["", ""], [{}, {}])
    assert out.maps.shape == (2, 32, 32) and torch.allclose(out.maps.sum(dim=(1, 2)), out.scores)
    # independently: the model's own image processor on PIL images, then the model, upsample, softmax
    processor = AutoImageProcessor.from_pretrained(tiny_segformer, backend="pil")
    model = SegformerForSemanticSegmentation.from_pretrained(tiny_segformer).eval()
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    with torch.no_grad():
        logits = model(**processor(images=pil, return_tensors="pt")).logits
    probs = F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False).softmax(dim=1)[:, 1]
    assert torch.allclose(out.scores, probs.mean(dim=(1, 2)), atol=2e-3), (out.scores, probs.mean(dim=(1, 2)))
    assert torch.allclose(out.maps * 32 * 32, probs, atol=2e-2)


def test_bad_target_and_missing_weights_say_what_to_set(tiny_segformer, tmp_path):
    with pytest.raises(ConfigError, match="reward.target_class: 'cat' is not a label.*wall, sky, tree"):
        Segmentation(str(tiny_segformer), target_class="cat")
    with pytest.raises(ConfigError, match="reward.path: '/nonexistent/seg' does not exist"):
        Segmentation("/nonexistent/seg", target_class="sky")
    assert Segmentation(str(tiny_segformer), target_class=2).target == 2
