"""Does PXPO on a painted map change the disliked regions more than the liked ones? (the feedback studio)

    python experiments/feedback_study.py                       # the preset (4 inner epochs) and 1 inner epoch
    python experiments/feedback_study.py --seeds 8 --epochs 12 --prompt "a red circle"

For each seed s: the toy model's sample of the prompt from seed s's noise (rlft.studio: candidate s),
one studio round of PXPO (experiment=pxpo_feedback) on a map that likes the left half and dislikes
the right half, and again from scratch on the mirror image of that map (so that where the object
happens to lie cancels out). Each round reports the mean absolute pixel change (0-255) inside the
liked and the disliked region, redrawn from the same noise. Printed per setting: the mean of
(disliked - liked) over the 2 x seeds rounds with its standard error, and how many rounds had
disliked > liked.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import numpy as np

SETTINGS = {
    "pxpo_feedback (4 inner epochs)": [],
    "1 inner epoch": ["algorithm.num_inner_epochs=1"],
}


def halves(size: tuple[int, int], mirror: bool) -> np.ndarray:
    H, W = size
    m = np.full((H, W), 128, dtype=np.uint8)
    m[:, : W // 2], m[:, W // 2 :] = (0, 255) if mirror else (255, 0)
    return m


def main() -> None:
    from rlft.models import quiet_libraries
    from rlft.studio import Studio

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("overrides", nargs="*", help="more config overrides for every round")
    args = parser.parse_args()
    quiet_libraries()
    print(f"'{args.prompt}', {args.epochs} epochs per round, seeds 0-{args.seeds - 1} x (map, mirror image)")
    for name, extra in SETTINGS.items():
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for seed in range(args.seeds):
                for mirror in (False, True):
                    studio = Studio(["trainer.progress_bar=false", *extra, *args.overrides], root=tmp)
                    studio.generate(args.prompt, n=1, first_seed=seed)
                    studio.pick(0)
                    r = studio.train(halves(studio.display_size, mirror), epochs=args.epochs)
                    rows.append((r.liked_change, r.disliked_change))
                    where = f"seed {seed}" + (" (mirror image)" if mirror else "")
                    print(f"  {name}, {where}: liked {r.liked_change:.2f}, disliked {r.disliked_change:.2f}")
        diff = [d - li for li, d in rows]
        se = statistics.stdev(diff) / len(diff) ** 0.5
        liked, disliked = (statistics.mean(c) for c in zip(*rows))
        print(
            f"{name}: liked {liked:.1f}, disliked {disliked:.1f}; disliked - liked {statistics.mean(diff):+.2f} ± "
            f"{se:.2f} (SE over {len(diff)} rounds), disliked > liked in {sum(d > 0 for d in diff)} of {len(diff)}"
        )


if __name__ == "__main__":
    main()
