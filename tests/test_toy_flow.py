"""The flow toy model's pretraining (rlft/toy/pretrain_flow.py), a few steps: it writes a
StableDiffusion3Pipeline that model=toy_flow's loader reads, the conditioning it trains on is the
pipeline's own encode_prompt, the same arguments give the same weights, and a stop resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

import rlft.toy.pretrain_flow as pretrain_flow_module
from rlft.sd3 import SD3Policy
from rlft.toy.pretrain import MAX_TOKENS, build_tokenizer
from rlft.toy.pretrain_flow import FLOW_SPECIALS, encode, pretrain_flow
from tests.conftest import REPO

TOY = REPO / "rlft" / "toy" / "weights"


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")


def test_a_short_pretraining_writes_a_pipeline_that_trains_on_its_own_conditioning(tmp_path, monkeypatch):
    from diffusers import StableDiffusion3Pipeline

    kw = dict(vae_from=str(TOY), images=64, steps=6, batch=8, seed=0, log=lambda m: None)
    summary = pretrain_flow(str(tmp_path / "a"), **kw)
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["parameters"]["transformer"] > 1e6
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "a"), text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.vae.config.shift_factor != 0
    prompts = ["a small red circle on a white background", ""]
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=1
    )
    tokenizer = build_tokenizer(FLOW_SPECIALS)
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        states, pooled_ours = encode(pipe.text_encoder, pipe.text_encoder_2, ids)
    torch.testing.assert_close(states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled_ours, pooled, rtol=0, atol=0)
    # the pooled embedding (which conditions every block) is read at the end-of-text token, so it has
    # seen the whole prompt (transformers' CLIP pools at the highest token id when eos_token_id is 2)
    eos = tokenizer.eos_token_id
    assert eos != 2 and pipe.text_encoder.config.eos_token_id == eos
    with torch.no_grad():
        out = pipe.text_encoder(ids)
        at_eos = out.last_hidden_state[torch.arange(len(ids)), (ids == eos).int().argmax(dim=-1)]
        torch.testing.assert_close(out.text_embeds, pipe.text_encoder.text_projection(at_eos), rtol=0, atol=0)
    policy = SD3Policy.from_pretrained(str(tmp_path / "a"), max_sequence_length=1)
    assert policy.latent_shape == (8, 8, 8) and policy.resolution == 32

    # the same arguments, stopped in the last step (resumable states every 2 steps here) and run again:
    # the second invocation resumes at step 4 and ends with the same weights
    monkeypatch.setattr(pretrain_flow_module, "SAVE_EVERY", 2)

    def stop_at_the_last_step(message):
        if message.startswith("flow step     5"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_flow(str(tmp_path / "b"), **{**kw, "log": stop_at_the_last_step})
    assert not (tmp_path / "b").exists() and (tmp_path / "b.work" / "flow.pt").is_file()
    resumed = []
    again = pretrain_flow(str(tmp_path / "b"), **{**kw, "log": resumed.append})
    assert "flow: resumed at step 4" in resumed and again["loss"] == summary["loss"]
    first, second = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(first[k], second[k]) for k in first)
