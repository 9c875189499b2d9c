"""How good a toy model is, per split, template and attribute; several models side by side.

    python -m rlft.toy.quality                                   # the shipped model
    python -m rlft.toy.quality OLD_DIR rlft/toy/weights --grid g.png   # two models, same prompts and noise
    python -m rlft.toy.quality rlft/toy/weights rlft/toy/flow_weights  # the UNet toy beside the flow toy
    make toy-quality                                             # the shipped models against the previous UNet

Every model draws the same images the default run evaluates (``trainer.eval_num_prompts`` = 128
stratified prompts of each split x 2 seeds, image i's noise from (seed 0, EVAL, eval_seed 1234, i),
10 steps unless ``--steps``), each with its family's training sampler as the runs evaluate it: DDIM
with eta 1 and CFG 5 for the UNet toy, the flow SDE (a = 0.7, CFG 4.5, sampler=flow_sde) for the flow
toy; scored by toy_alignment and its sub-scores (rlft/toy/rewards.py). Each cell is the mean over
prompts ± its standard error (rlft/stats.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rlft.stats import mean_se

SPLITS = ("train", "unseen")


@torch.no_grad()
def load_toy(path: str, steps: int = 10):
    """(policy, sampler) of a toy model directory, either family, with the sampler its runs use."""
    from rlft.flow_sampling import FlowSDE
    from rlft.models import policy_class
    from rlft.sampling import DDIM
    from rlft.toy.pretrain_flow import T5_TOKENS

    family = policy_class(path)
    if family.__name__ == "SD3Policy":  # the flow toy: no T5, its zeros one token long
        policy = family.from_pretrained(path, finetune="full", max_sequence_length=T5_TOKENS)
        return policy, FlowSDE(steps).setup(policy.scheduler_config)
    policy = family.from_pretrained(path, finetune="full")
    return policy, DDIM(steps, eta=1.0, guidance_scale=5.0).setup(policy.scheduler_config)


def evaluation_images(policy, sampler, texts: list[str], steps: int, chunk: int = 64):
    """The evaluation's images of ``texts``, ``chunk`` at a time: (texts, images [n, 3, H, W]) pairs,
    image i drawn from the noise (seed 0, EVAL, eval_seed 1234, i) as a run's evaluation draws it."""
    from rlft.seeding import EVAL, sample_noise

    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        noise = sample_noise([(0, EVAL, 1234, i) for i in range(start, start + len(part))], steps, policy.latent_shape)
        yield part, sampler.sample(policy, policy.encode(part), noise, lambda lp: lp.mean(dim=(1, 2, 3))).images


def measure(path: str, prompts: int = 128, seeds: int = 2, steps: int = 10) -> dict:
    """{split: {row: (mean, se, n)}} for rows all / single_object / two_objects / each sub-score, and
    a few images per split (single- and two-object prompts, first seed) for a grid."""
    from rlft.toy.grammar import ToyPrompts, parse
    from rlft.toy.rewards import ToyAlignment

    policy, sampler = load_toy(path, steps)
    reward = ToyAlignment()
    out: dict = {"model": str(path), "steps": steps, "splits": {}, "images": {}}
    for split in SPLITS:
        unique = [p.text for p in ToyPrompts(split).evaluation_prompts(prompts)]
        texts = [p for p in unique for _ in range(seeds)]
        scores, parts, images = [], {}, []
        for chunk, drawn in evaluation_images(policy, sampler, texts, steps):
            r = reward(drawn, chunk, [{}] * len(chunk))
            scores += r.scores.tolist()
            for k, v in r.parts.items():
                parts.setdefault(k, []).extend(v.tolist())
            images.append(drawn)
        images = torch.cat(images)
        single = [parse(t).relation is None for t in texts]
        nan = float("nan")
        rows = {
            "all": mean_se(scores, texts),
            "single_object": mean_se([s if o else nan for s, o in zip(scores, single)], texts),
            "two_objects": mean_se([nan if o else s for s, o in zip(scores, single)], texts),
            **{k: mean_se(v, texts) for k, v in parts.items()},
        }
        out["splits"][split] = rows
        firsts = [i * seeds for i in range(len(unique))]
        pick = [i for i in firsts if single[i]][::16][:4] + [i for i in firsts if not single[i]][::16][:4]
        out["images"][split] = (images[pick], [f"[{split}] r={scores[i]:.2f} | {texts[i]}" for i in pick])
    return out


def table(results: list[dict]) -> str:
    head = "| split | row | " + " | ".join(f"`{r['model']}`" for r in results) + " |"
    lines = [head, "|" + " --- |" * (2 + len(results))]
    for split in SPLITS:
        for row in results[0]["splits"][split]:
            cells = []
            for r in results:
                mean, se, n = r["splits"][split].get(row, (float("nan"),) * 3)
                cells.append(f"{mean:.3f} ± {se:.3f} ({n})")
            lines.append(f"| {split} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from rlft.toy import WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[str(WEIGHTS)], help="toy model directories")
    parser.add_argument("--prompts", type=int, default=128, help="per split")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grid", help="write the models' samples (a row per model and split) to this PNG")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args(argv)
    results = [measure(m, args.prompts, args.seeds, args.steps) for m in args.models]
    print(f"toy_alignment and its sub-scores, mean ± SE over prompts (prompts counted), {args.steps} steps:")
    print(table(results))
    if args.grid:
        from rlft.loggers import captioned_grid

        images, captions = [], []
        for r in results:
            for split in SPLITS:
                imgs, caps = r["images"][split]
                images.append(imgs)
                captions += caps
        captioned_grid(torch.cat(images), captions, per_row=8).save(args.grid)
        print(f"wrote {args.grid}")
    if args.json:
        Path(args.json).write_text(
            json.dumps([{k: r[k] for k in ("model", "steps", "splits")} for r in results], indent=1)
        )


if __name__ == "__main__":
    main()
