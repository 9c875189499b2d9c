"""Where a toy model's relation prompts go wrong: the objects' order, their axis, or a missing object.

    python experiments/relation_order.py                    # the shipped toy model
    python experiments/relation_order.py EXPORTED_TOY_DIR   # a finetuned one (python -m rlft.export ...)

For 128 stratified two-object prompts of each split x 4 seeds (the evaluation's prompts and noise,
and rlft/toy/quality.py's sampler: 10 DDIM steps, eta 1, CFG 5), each image is read like
toy_alignment's relation sub-score (rlft/toy/rewards.py: each object's largest region of its colour,
fitted freely) and counted as *holds* ("A <relation> B" holds), *swapped* (the opposite relation
holds: the right axis, the objects in the wrong order), *neither* (not on the relation's axis) or
*missing* (an object not found), per relation word. experiments/README.md ("What the demo learns")
has the shipped model's table.
"""

from __future__ import annotations

import argparse
import collections

import torch

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
OUTCOMES = ("holds", "swapped", "neither", "missing")


def outcome(labels, text: str) -> str:
    """What one image of a relation prompt shows (labels: toy_alignment's palette index per pixel)."""
    from rlft.toy.grammar import parse
    from rlft.toy.render import relation_holds
    from rlft.toy.rewards import FIT_SLACK, color_regions, free_fits

    scene = parse(text)
    fits, _ = free_fits(scene, color_regions(labels, scene), labels.shape[0])
    if len(fits) < 2:
        return "missing"
    a, b = fits[0][2], fits[1][2]
    if relation_holds(a, b, scene.relation, slack=FIT_SLACK):
        return "holds"
    return "swapped" if relation_holds(a, b, OPPOSITE[scene.relation], slack=FIT_SLACK) else "neither"


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    from rlft.toy import WEIGHTS
    from rlft.toy.grammar import ToyPrompts, parse
    from rlft.toy.quality import evaluation_images, load_toy
    from rlft.toy.rewards import classify

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(WEIGHTS), help="a toy model directory")
    parser.add_argument("--prompts", type=int, default=128, help="per split")
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args(argv)
    policy, sampler = load_toy(args.model)
    print("| split | relation | images | holds | swapped | neither | missing |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for split in ("train", "unseen"):
        unique = [p.text for p in ToyPrompts(split, template="relation").evaluation_prompts(args.prompts)]
        texts = [t for t in unique for _ in range(args.seeds)]
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for chunk, images in evaluation_images(policy, sampler, texts, steps=10):
            for labels, text in zip(classify(images, 0.3).numpy(), chunk):
                counts[parse(text).relation][outcome(labels, text)] += 1
        for relation in OPPOSITE:
            c = counts[relation]
            n = sum(c.values())
            print(f"| {split} | {relation} | {n} | " + " | ".join(f"{c[o] / n:.2f}" for o in OUTCOMES) + " |")


if __name__ == "__main__":
    main()
