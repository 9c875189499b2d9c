"""The toy world: a self-made text-to-image world that runs offline on a CPU (README "The toy world").

grammar   coloured-shape prompts, 100k+ of them, with fixed train / unseen splits and rewordings
render    draws the scene a prompt describes
rewards   toy_alignment (scalar + per-pixel map) and toy_color
pretrain  trains the toy model on rendered scenes; its weights ship in ``weights/``
"""

from pathlib import Path

from rlft.toy.grammar import ToyPrompts, ToyRephrased

WEIGHTS = Path(__file__).parent / "weights"

__all__ = ["WEIGHTS", "ToyPrompts", "ToyRephrased"]
