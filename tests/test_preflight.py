"""The pre-flight (rlft/preflight.py): every file a run needs, found before any weights load; all the
missing ones in one line, fast, without the hub client's retries."""

from __future__ import annotations

import time

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlft import preflight as pf
from rlft.config import register_configs
from rlft.errors import RlftError
from tests.conftest import REPO, run_cli, timeout_s
from tests.helpers import write_hub_cache


def test_an_empty_cache_offline_names_every_missing_file_at_once(cache_dir, tmp_path):
    """PRDP's multi-reward preset with HF_HUB_OFFLINE=1 and an empty Hugging Face cache: one line names
    the SD pipeline, each reward component's weights and every prompt set, each with its key, in
    seconds (about 5 s on an idle 2-core machine; the bound is generous) and before anything loads."""
    start = time.perf_counter()
    result = run_cli(
        [f"paths.output_root={tmp_path / 'out'}", "experiment=prdp_multi_reward"],
        cache_dir,
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")},
    )
    wall = time.perf_counter() - start
    err = result.stderr
    assert result.returncode == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("rlft: error:")]
    assert len(lines) == 1 and "of the files this run needs are missing (HF_HUB_OFFLINE=1)" in lines[0]
    keys = [
        "model.path: diffusion pipeline 'CompVis/stable-diffusion-v1-4'",
        "reward.rewards.pickscore.path: PickScore model",
        "reward.rewards.pickscore.processor_path: CLIP processor and tokenizer",
        "reward.rewards.hpsv2.path: HPS checkpoint 'xswu/HPSv2'",
        "reward.rewards.aesthetic.mlp_path: aesthetic predictor weights",
        "reward.rewards.aesthetic.clip_path: CLIP ViT-L/14 'openai/clip-vit-large-patch14'",
        "dataset.path: prompt files 'yuvalkirstain/pickapic_v1_no_images'",
        "eval_datasets.drawbench.path: prompt files 'sayakpaul/drawbench'",
        "eval_datasets.pickapic.path",
        "eval_datasets.photo.path",
    ]
    for key in keys:
        assert key in lines[0], key
    assert "run directory" not in result.stdout  # the runner never started: nothing was loaded
    assert "Retrying" not in err and "huggingface_hub" not in err
    assert wall < timeout_s(20), wall


def _config(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def test_without_network_a_cached_run_goes_offline(tmp_path, monkeypatch):
    """The hub cannot be reached (a closed port stands in for it): what is cached is found, the run goes
    on with HF_HUB_OFFLINE=1 and says so; what is not is named with its key."""
    hub = tmp_path / "hub"
    write_hub_cache(hub, "xswu/HPSv2", {"HPS_v2_compressed.pt": b"weights"}, repo_type="model")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(pf, "HUB_HOST", ("127.0.0.1", 9))  # nothing listens: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg = _config(["model=tiny_random", "reward=hpsv2", "dataset=simple_animals", "~dataset@eval_datasets.unseen"])
    assert [n.key for n in pf.needs(cfg)] == ["reward.path"]
    assert pf.preflight(cfg).startswith("the hub cannot be reached: running offline")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cfg.reward.version = "v2.1"  # HPS_v2.1_compressed.pt is not cached
    with pytest.raises(RlftError, match=r"1 of the files this run needs are missing \(the hub cannot be reached\)"):
        pf.preflight(cfg)
