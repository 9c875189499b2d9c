"""Feedback studio: paint what you like and dislike on a sample, and PXPO trains on it.

PXPO's single-image human feedback (Kordzanganeh et al. 2024, section 5) as a loop. A person marks,
pixel by pixel, the regions of one generated image they like and dislike; PXPO redraws that image
from the same noise every epoch and pushes each latent position by its own feedback (the
feedback_map reward, rlft/rewards/feedback.py):

    m^{ij} = (v^{ij} - 127.5) / 127.5   (v: the painted 0-255 map; white liked, black disliked, grey neutral)

so that the liked regions stay and the disliked ones change. Every step of the page is a method
here, callable without a browser (the page, rlft/studio/page.py, only calls them):

    studio = Studio(["model=toy"])                 # the config groups of every run (experiment=pxpo_feedback)
    candidates = studio.generate("a red circle", n=4)
    studio.pick(2)                                 # candidate 2: the first image of a run with seed first_seed + 2
    feedback = strokes_to_map(layers)              # or any 0-255 array the size of studio.display_size
    result = studio.train(feedback)                # PXPO, 12 epochs; result.liked_change, .disliked_change
    studio.undo()                                  # back to the round before
    studio.save()                                  # studio.json: prompt, seed, rounds, the commands below

A session is an ordinary run directory (``<paths.output_root>/studio/<name>``): one checkpoint per
round (``checkpoints/epoch_N``), the maps as PNG (``maps/round_K.png``), the prompt file the run
trained on (``feedback.jsonl``) and ``studio.json`` with the exact command that continues the run
(``python -m rlft ... resume=auto``) and the one that exports it (``python -m rlft.export``).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rlft.errors import RlftError

LIKE_COLOR, DISLIKE_COLOR = "#00c800", "#e00000"  # the page's two brushes
STUDIO_OVERRIDES = ("experiment=pxpo_feedback", "trainer.eval_every=0", "trainer.checkpoint_every=0")
SESSION_FILE = "studio.json"
DISPLAY_SIDE = 384  # the sample is shown (and painted) at about this many pixels a side, enlarged by a whole factor


class StudioError(RlftError):
    """Something the page asked that cannot be done now (no sample picked, an empty map): one line on the page."""


@dataclass
class Round:
    """One press of train: the map, the image redrawn afterwards, and how the image changed per region."""

    round: int
    epochs: int  # the run's epochs after this round
    map: str  # maps/round_K.png (relative to the session)
    image: str  # images/round_K.png: redrawn from the same noise after the round
    liked_change: float  # mean |after - before| (0-255) over the liked pixels of this round's map
    disliked_change: float  # ... over the disliked pixels
    liked_pixels: int
    disliked_pixels: int
    seconds: float


@dataclass
class Session:
    prompt: str
    seed: int
    overrides: list[str]
    rounds: list[Round] = field(default_factory=list)


def strokes_to_map(layers: list[np.ndarray], size: tuple[int, int] | None = None) -> np.ndarray:
    """A 0-255 feedback map from the page's brush layers (RGBA arrays [H, W, 4]): pixels painted with
    the like brush (more green than red) 255, with the dislike brush (more red than green) 0, the rest
    128 (neutral); a later layer paints over an earlier one. ``size`` (H, W): for no layers at all."""
    if not layers:
        if size is None:
            raise StudioError("no strokes: paint liked regions green and disliked ones red")
        return np.full(size, 128, dtype=np.uint8)
    out = np.full(np.asarray(layers[0]).shape[:2], 128, dtype=np.uint8)
    for layer in layers:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[-1] != 4 or layer.shape[:2] != out.shape:
            raise StudioError(f"a brush layer of shape {layer.shape} is not an RGBA image of {out.shape}")
        painted = layer[..., 3] > 0
        red, green = layer[..., 0].astype(int), layer[..., 1].astype(int)
        out[painted & (green > red)] = 255
        out[painted & (red > green)] = 0
    return out


def region_change(before: np.ndarray, after: np.ndarray, feedback: np.ndarray) -> dict[str, float]:
    """Mean absolute pixel change (0-255, averaged over channels) inside the liked (m > 1/2) and the
    disliked (m < -1/2) regions of a 0-255 map, the map resized to the images as the reward reads it."""
    from rlft.rewards.feedback import map_values

    m = map_values(Image.fromarray(feedback), before.shape[:2]).numpy()
    diff = np.abs(after.astype(np.float64) - before.astype(np.float64)).mean(axis=-1)
    liked, disliked = m > 0.5, m < -0.5
    mean = lambda mask: float(diff[mask].mean()) if mask.any() else float("nan")
    return {
        "liked_change": mean(liked),
        "disliked_change": mean(disliked),
        "liked_pixels": int(liked.sum()),
        "disliked_pixels": int(disliked.sum()),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def _to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """[N, 3, H, W] in [0, 1] -> N arrays [H, W, 3] uint8."""
    return list((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


class Studio:
    """The studio's state: a model for drawing candidates, and the session (a run directory) being trained."""

    def __init__(self, overrides: list[str] | tuple[str, ...] = (), root: str | Path | None = None):
        from rlft.config import build, compose_run

        self.overrides = [*STUDIO_OVERRIDES, *overrides]
        # the config every round runs (checked now: a bad override or a model that cannot load is one line)
        self.cfg = compose_run([*self.overrides, "dataset.path=studio.jsonl"])
        self.root = Path(root) if root is not None else Path(self.cfg.paths.output_root) / "studio"
        self.policy = build(self.cfg.model, "model")
        self.policy.to(torch.device("cpu"), torch.float32)
        self.policy.unet.eval()
        self.sampler = build(self.cfg.sampler, "sampler")
        self.sampler.setup(self.policy.scheduler_config)
        side = self.policy.latent_shape[-1] * self.policy.vae_scale_factor
        self.image_size = (side, side)
        scale = max(1, round(DISPLAY_SIDE / side))
        self.display_size = (side * scale, side * scale)
        self.candidates: list[np.ndarray] = []
        self.prompt, self.first_seed = None, 0
        self.dir: Path | None = None  # the session's run directory
        self.session: Session | None = None
        self.original: np.ndarray | None = None  # the picked sample [H, W, 3]

    # ------------------------------------------------------------------ drawing
    @torch.no_grad()
    def _draw(self, policy, prompt: str, seeds: list[int]) -> list[np.ndarray]:
        """The first training image of a run with each seed: noise (seed, SAMPLE, 0, 0), as the runner
        draws epoch 1's sample 0 (and every epoch's, with trainer.fixed_sample_noise)."""
        from rlft.seeding import SAMPLE, sample_noise

        cond = policy.encode([prompt] * len(seeds), self.sampler.negative_prompt)
        noise = sample_noise([(s, SAMPLE, 0, 0) for s in seeds], self.sampler.num_steps, policy.latent_shape)
        traj = self.sampler.sample(policy, cond, noise, lambda lp: lp.mean(dim=(1, 2, 3)))
        return _to_uint8(traj.images)

    def enlarge(self, image: np.ndarray) -> np.ndarray:
        """An image at the display size (each pixel a square block), as the page shows and paints it."""
        return np.asarray(Image.fromarray(image).resize(self.display_size[::-1], Image.NEAREST))

    def generate(self, prompt: str, n: int = 4, first_seed: int = 0) -> list[np.ndarray]:
        """``n`` candidates for ``prompt``, candidate i drawn from the noise of seed ``first_seed + i``."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise StudioError("the prompt is empty: type what the image should show")
        if not 1 <= n <= 16:
            raise StudioError(f"{n} samples: choose 1 to 16")
        self.prompt, self.first_seed = prompt, int(first_seed)
        self.candidates = self._draw(self.policy, prompt, [self.first_seed + i for i in range(n)])
        return self.candidates

    def pick(self, index: int) -> np.ndarray:
        """Start a session on candidate ``index``: a new run directory; returns the sample."""
        if not self.candidates:
            raise StudioError("no samples yet: type a prompt and press generate first")
        if not 0 <= index < len(self.candidates):
            raise StudioError(f"there is no sample {index}: pick one of 0 to {len(self.candidates) - 1}")
        seed = self.first_seed + index
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(self.prompt)}-seed{seed}"
        self.dir = self.root / name
        (self.dir / "images").mkdir(parents=True, exist_ok=False)
        (self.dir / "maps").mkdir()
        self.session = Session(self.prompt, seed, list(self.overrides))
        self.original = self.candidates[index]
        Image.fromarray(self.original).save(self.dir / "images" / "round_0.png")
        self.save()
        return self.original

    @classmethod
    def open(cls, session_dir: str | Path, extra_overrides: list[str] | tuple[str, ...] = ()) -> Studio:
        """A saved session, to go on painting and training."""
        path = Path(session_dir)
        try:
            data = json.loads((path / SESSION_FILE).read_text())
        except (OSError, ValueError) as e:
            raise StudioError(f"{path} is not a studio session ({SESSION_FILE}: {e})") from None
        user = [o for o in data["overrides"] if o not in STUDIO_OVERRIDES]
        studio = cls([*user, *extra_overrides], root=path.parent)
        studio.dir, studio.prompt, studio.first_seed = path, data["prompt"], data["seed"]
        studio.session = Session(data["prompt"], data["seed"], data["overrides"], [Round(**r) for r in data["rounds"]])
        studio.original = np.asarray(Image.open(path / "images" / "round_0.png").convert("RGB"))
        return studio

    @property
    def current(self) -> np.ndarray:
        """The image the next map is painted on: the last round's, or the picked sample."""
        if self.session is None:
            raise StudioError("no sample picked: generate samples and pick one first")
        if not self.session.rounds:
            return self.original
        return np.asarray(Image.open(self.dir / self.session.rounds[-1].image).convert("RGB"))

    # ------------------------------------------------------------------ training
    def _run_overrides(self, epochs: int) -> list[str]:
        """What makes the session's run: every round resumes the one before (same config, more epochs)."""
        assert self.session is not None and self.dir is not None
        return [
            *self.session.overrides,
            f"dataset.path={self.dir / 'feedback.jsonl'}",
            f"reward.root={self.dir}",
            f"seed={self.session.seed}",
            f"paths.output_root={self.dir.parent}",
            f"run_name={self.dir.name}",
            "trainer.keep_checkpoints=1000",  # one per round: undo goes back to the one before
            f"trainer.epochs={epochs}",
        ]

    def check_map(self, feedback) -> np.ndarray:
        """The map as 0-255 [H, W] uint8 at the display or the image size, with something painted."""
        if feedback is None:
            raise StudioError("no map: paint liked regions green and disliked ones red over the sample")
        m = np.asarray(feedback)
        if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
            m = np.asarray(Image.fromarray(m.astype(np.uint8)).convert("L"))
        if m.ndim != 2 or m.shape not in (self.display_size, self.image_size):
            raise StudioError(
                f"the map is {'x'.join(map(str, m.shape))}, the sample is shown at "
                f"{'x'.join(map(str, self.display_size))} (and drawn at {'x'.join(map(str, self.image_size))}): "
                "paint over the sample shown"
            )
        m = m.astype(np.uint8)
        if not ((m > 191).any() or (m < 64).any()):
            raise StudioError("the map is empty: paint liked regions green and disliked ones red before training")
        return m

    def train(self, feedback, epochs: int | None = None) -> Round:
        """PXPO for ``epochs`` more epochs (default: the config's trainer.epochs, experiment=pxpo_feedback's
        12) on the current image's map; the image redrawn from the same noise afterwards, and the change
        per region. Progress: the runner's progress bars (the page shows them)."""
        from rlft.config import compose_run
        from rlft.runner import Runner

        if self.session is None or self.dir is None:
            raise StudioError("no sample picked: generate samples and pick one first")
        epochs = self.cfg.trainer.epochs if epochs is None else epochs
        if not 1 <= int(epochs) <= 1000:
            raise StudioError(f"{epochs} epochs: choose 1 to 1000")
        m = self.check_map(feedback)
        before = self.current
        k = len(self.session.rounds) + 1
        total = (self.session.rounds[-1].epochs if self.session.rounds else 0) + int(epochs)
        map_path = Path("maps") / f"round_{k}.png"
        Image.fromarray(m, mode="L").save(self.dir / map_path)
        row = {"prompt": self.session.prompt, "feedback_map": str(map_path)}
        (self.dir / "feedback.jsonl").write_text(json.dumps(row) + "\n")
        t0 = time.perf_counter()
        runner = Runner(compose_run(self._run_overrides(total)), self.dir)
        try:
            runner.run()
            with runner.ema_weights():
                runner.policy.unet.eval()
                after = self._draw(runner.policy, self.session.prompt, [self.session.seed])[0]
        finally:
            runner.lock.release()
        image_path = Path("images") / f"round_{k}.png"
        Image.fromarray(after).save(self.dir / image_path)
        change = region_change(before, after, m)
        result = Round(k, total, str(map_path), str(image_path), **change, seconds=time.perf_counter() - t0)
        self.session.rounds.append(result)
        self.save()
        return result

    def undo(self) -> np.ndarray:
        """Drop the last round (its checkpoint, map and image); returns the image to paint on again."""
        from rlft import checkpoint as ckpt

        if self.session is None or not self.session.rounds:
            raise StudioError("nothing to undo: no round has been trained")
        last = self.session.rounds.pop()
        for done in ckpt.complete_checkpoints(self.dir):
            if done.name == f"epoch_{last.epochs:05d}":
                shutil.rmtree(done)
        for rel in (last.map, last.image):
            (self.dir / rel).unlink(missing_ok=True)
        if self.session.rounds:  # the next round trains on the previous map's file
            row = {"prompt": self.session.prompt, "feedback_map": self.session.rounds[-1].map}
            (self.dir / "feedback.jsonl").write_text(json.dumps(row) + "\n")
        self.save()
        return self.current

    def commands(self) -> dict[str, str]:
        """The command lines that continue the session's run and export its weights."""
        assert self.session is not None and self.dir is not None
        epochs = self.session.rounds[-1].epochs if self.session.rounds else 0
        args = " ".join(shlex.quote(o) for o in self._run_overrides(epochs + 10))
        return {
            "resume": f"python -m rlft {args}",
            "export": f"python -m rlft.export {shlex.quote(str(self.dir))} {shlex.quote(str(self.dir / 'export'))}",
        }

    def save(self) -> Path:
        """Write studio.json (prompt, seed, settings, rounds, commands); returns the session directory.
        The maps, images and weights are written as each round ends."""
        if self.session is None or self.dir is None:
            raise StudioError("no session to save: generate samples and pick one first")
        data = {**asdict(self.session), "commands": self.commands()}
        tmp = self.dir / (SESSION_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.dir / SESSION_FILE)
        return self.dir
