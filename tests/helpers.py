"""Test-only components, addressed from the command line with `reward._target_=tests.helpers...`."""

from __future__ import annotations

import torch

from rlft.learner import Learner, Rows
from rlft.rewards.base import Reward, RewardOutput
from rlft.seeding import seeded_generator


class NaNForPrompt(Reward):
    """Mean brightness, but NaN for every image of ``prompt`` (a reward that breaks); with ``when_env``,
    only while that environment variable is set (the same config before and after the reward is fixed)."""

    name = "nan_for_prompt"

    def __init__(self, prompt: str = "cat", when_env: str | None = None):
        self.prompt, self.when_env = prompt, when_env

    def score(self, images, prompts, metadata) -> RewardOutput:
        import os

        scores = images.mean(dim=(1, 2, 3))
        broken = self.when_env is None or bool(os.environ.get(self.when_env))
        bad = torch.tensor([broken and p == self.prompt for p in prompts])
        return RewardOutput(torch.where(bad, torch.full_like(scores, float("nan")), scores))


class SingleProcessComm:
    """The runner's process communicator for one process: gathers return their input."""

    rank, world_size = 0, 1

    def gather(self, t):
        return t

    def gather_object(self, items):
        return list(items)


class SGDContext(Learner):
    """The runner's TrainContext (rlft/learner.py) over ``policy`` predicting with ``unet`` (a float64 copy),
    for ``algorithm``; records each optimizer step's gradient and parameters, then takes a plain SGD step."""

    def __init__(self, policy, unet, sampler, algorithm, tbs, accum, lr, rows_per_call=None):
        self.unet, self.lr = unet, lr
        self.grads, self.params_before = [], []
        super().__init__(
            policy.with_unet(unet),
            sampler,
            algorithm.reduce_log_prob,
            train_batch_size=tbs,
            gradient_accumulation_steps=accum,
            rows_per_call=rows_per_call,
            generator=torch.Generator().manual_seed(0),
            sample_generator=lambda *key: seeded_generator(0, *key),
            backward=lambda loss, sync: loss.backward(),
            optimizer_step=self._sgd,
        )

    def _sgd(self) -> float:
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.params_before.append([p.detach().clone() for p in params])
        self.grads.append([p.grad.detach().clone() for p in params])
        with torch.no_grad():
            for p in params:
                p -= self.lr * p.grad
                p.grad = None
        return 0.0

    def log_probs(self, rollout, steps):
        """log pi_theta of every sample at every step in ``steps`` (with the graph)  [B, T, ...]."""
        B = rollout.batch_size
        rows = Rows.of(torch.arange(B), steps.expand(B, -1))
        return Rows.unflatten(self._step(self.policy, rollout, rows).log_prob, B)


def eval_table(run, name: str, epoch: int) -> list[tuple[str, float]]:
    """(prompt, reward) of every image of evaluation set ``name`` at ``epoch``, in the run's table order."""
    import csv

    with open(run / "tables" / f"eval_{name}_table_{epoch:05d}.csv") as f:
        return [(row["prompt"], float(row["reward"])) for row in csv.DictReader(f)]


def eval_gain(run, name: str, first: int, last: int):
    """The paired gain over prompts (rlft.stats) of evaluation set ``name`` from epoch ``first`` to ``last``,
    read from the run's evaluation tables (one row per image, the same prompts and noise in the same order)."""
    from rlft.stats import paired_gain

    before, after = eval_table(run, name, first), eval_table(run, name, last)
    return paired_gain([r for _, r in before], [r for _, r in after], [p for p, _ in before])


TINY_HPS_SIZE = 32  # the shrunk model's image size (224 in ViT-H-14)


def save_tiny_hps(path) -> tuple:
    """ViT-H-14's layout (embed_dim, vision_cfg, text_cfg; the CLIP tokenizer's 49408 tokens) with tiny
    widths, saved as an open_clip model config and an HPS checkpoint of random weights
    ({"state_dict": CLIP state dict}). Returns (config .json, checkpoint .pt)."""
    import json

    import open_clip

    config = {
        "embed_dim": 12,
        "vision_cfg": {"image_size": TINY_HPS_SIZE, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    arch = path / "ViT-H-14-tiny.json"
    arch.write_text(json.dumps(config))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14-tiny", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path / "HPS_v2_compressed.pt")
    return arch, path / "HPS_v2_compressed.pt"


def write_hub_cache(cache, repo: str, files: dict, repo_type: str = "dataset") -> None:
    """The Hugging Face cache layout that a download leaves: refs/main -> snapshots/<commit>/<files>."""
    commit = "0" * 40
    root = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        target = root / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
