"""The one loop: sample -> reward -> prepare -> update -> log -> evaluate -> checkpoint.

The runner owns accelerate (device, mixed precision, DDP), the reward thread,
logging, evaluation and checkpoints. It never branches on the algorithm: what
an algorithm needs from the rollout it declares (``needs_reference``,
``needs_reward_maps``, ``reduce_log_prob``) and its update is its own.

Reproducibility: every random draw comes from a generator seeded by what it
is for (``rlft.seeding``): each sample's noise by (seed, epoch, sample index),
so batch sizes and the number of processes do not change what a run samples,
and a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rlft import checkpoint as ckpt
from rlft import sharding
from rlft.algorithms.base import Algorithm, Rollout
from rlft.checkpoint import COMPLETE_MARKER, CheckpointError
from rlft.config import NaNPolicy, build
from rlft.data import PromptDataset, PromptStream, shard
from rlft.errors import ConfigError, RewardError, RlftError
from rlft.evaluation import (
    BASE_FILE,
    BEFORE_AFTER_FILE,
    LATEST_FILE,
    EvalResult,
    base_record,
    before_after_grid,
    gain_lines,
    load_first,
    load_records,
    measure_drift_and_diversity,
    save_first,
    save_records,
    showcase_indices,
    side_by_side,
)
from rlft.learner import Learner, Rows
from rlft.loggers import append_console
from rlft.policy import Policy
from rlft.rewards.base import Reward, RewardOutput, to_uint8
from rlft.sampling import Sampler, Trajectory
from rlft.seeding import EVAL, INIT, SAMPLE, TRAIN, TRAIN_SAMPLE, sample_noise, seed_global, seeded_generator

RESUME_IGNORED_KEYS = (
    "resume",
    "paths.",  # where outputs and caches live, not what the run is
    "trainer.epochs",
    "trainer.eval_",  # evaluation never feeds training: its sets, sizes, seed and schedule may change
    "eval_datasets",
    "eval_rewards",  # held-out rewards are scored, never trained on
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.progress_bar",
    "trainer.log_images",
    "trainer.on_nan_reward",  # acts only on an epoch whose reward failed: the NaN stop's second remedy
    "trainer.rows_per_call",  # memory and speed: the same gradients, summed in another order
    "logger",
)


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic, derived once and validated at start-up."""

    world_size: int
    prompts_per_epoch: int  # global
    images_per_prompt: int
    prompts_per_process: int
    samples_per_process: int  # = prompts_per_process * images_per_prompt
    sample_batch_size: int  # per process
    train_batch_size: int  # per process
    gradient_accumulation_steps: int

    @classmethod
    def derive(cls, cfg: DictConfig, world_size: int, algorithm: Algorithm) -> BatchPlan:
        t, s = cfg.trainer, cfg.sampler
        if t.prompts_per_epoch % world_size:
            raise ConfigError(
                "trainer.prompts_per_epoch",
                f"{t.prompts_per_epoch} prompts do not split over {world_size} processes",
                f"use a multiple of {world_size}",
            )
        ppp = t.prompts_per_epoch // world_size
        spp = ppp * t.images_per_prompt
        if t.images_per_prompt < algorithm.min_images_per_prompt:
            raise ConfigError(
                "trainer.images_per_prompt",
                f"{type(algorithm).__name__} compares images of the same prompt and needs at least "
                f"{algorithm.min_images_per_prompt}, got {t.images_per_prompt}",
            )
        if spp % t.train_batch_size:
            raise ConfigError(
                "trainer.train_batch_size",
                f"{t.train_batch_size} does not divide the {spp} samples per process "
                f"({ppp} prompts x {t.images_per_prompt} images)",
            )
        algorithm.check(spp, t.train_batch_size, t.gradient_accumulation_steps, t.images_per_prompt)
        return cls(
            world_size,
            t.prompts_per_epoch,
            t.images_per_prompt,
            ppp,
            spp,
            s.batch_size,
            t.train_batch_size,
            t.gradient_accumulation_steps,
        )

    def describe(self) -> str:
        total = self.prompts_per_epoch * self.images_per_prompt
        micro = self.samples_per_process // self.train_batch_size
        return (
            f"{self.prompts_per_epoch} prompts x {self.images_per_prompt} images = {total} samples per epoch "
            f"({self.samples_per_process} per process x {self.world_size} processes); sampling "
            f"{-(-self.samples_per_process // self.sample_batch_size)} batches of up to {self.sample_batch_size} "
            "per process; "
            f"training {micro} micro-batches of {self.train_batch_size}, one optimizer step every "
            f"{self.gradient_accumulation_steps}"
        )


class _Comm:
    """Collectives for Algorithm.prepare (``rlft.algorithms.base.Comm``)."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world_size = accelerator.num_processes

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        return self.accelerator.gather(tensor.to(self.accelerator.device).contiguous()).cpu()

    def gather_object(self, items) -> list:
        return list(items) if self.world_size == 1 else gather_object(list(items))


class _RunState:
    """What a checkpoint holds beside weights and optimizer: epoch, data position, algorithm state."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def state_dict(self) -> dict:
        r = self.runner
        return {"epoch": r.epoch, "stream": r.stream.state_dict(), "algorithm": r.algorithm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        r = self.runner
        r.epoch = int(state["epoch"])
        r.stream.load_state_dict(state["stream"])
        r.algorithm.load_state_dict(state["algorithm"])


class Runner:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        t = cfg.trainer
        # without CUDA, processes started by `accelerate launch --multi_gpu` or torchrun train on CPU (gloo)
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        sharding.check(cfg, self.accelerator)  # FSDP (rlft/sharding.py): full finetuning only
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = t.allow_tf32
            torch.backends.cudnn.allow_tf32 = t.allow_tf32
        # cheap components first: config mistakes surface before any weights load
        self.dataset: PromptDataset = build(cfg.dataset, "dataset")
        self.eval_datasets: dict[str, PromptDataset] = {  # none when evaluation is off (eval_every=0)
            name: build(node, f"eval_datasets.{name}", home="dataset")
            for name, node in cfg.eval_datasets.items()
            if t.eval_every > 0
        }
        self.algorithm: Algorithm = build(cfg.algorithm, "algorithm")
        self.sampler: Sampler = build(cfg.sampler, "sampler")
        self.plan = BatchPlan.derive(cfg, self.accelerator.num_processes, self.algorithm)
        self.reward: Reward = build(cfg.reward, "reward")
        self.algorithm.check_reward(self.reward.name, self.reward.gives_maps)
        named = {"dataset": self.dataset, **{f"eval_datasets.{k}": v for k, v in self.eval_datasets.items()}}
        for key, data in named.items():
            probe = data.evaluation_prompts(16)
            self.reward.check_prompts([p.text for p in probe], key)
            self.reward.check_metadata([p.metadata for p in probe], key)
        # held-out rewards: scored at every evaluation, never trained on (none when evaluation is off)
        self.eval_rewards: dict[str, Reward] = {
            name: build(node, f"eval_rewards.{name}", home="reward")
            for name, node in (cfg.get("eval_rewards") or {}).items()
            if self.eval_datasets
        }
        for name, held in self.eval_rewards.items():
            for key, data in self.eval_datasets.items():
                probe = data.evaluation_prompts(16)
                try:
                    held.check_prompts([p.text for p in probe], f"eval_datasets.{key}")
                    held.check_metadata([p.metadata for p in probe], f"eval_datasets.{key}")
                except ConfigError as exc:
                    raise ConfigError(
                        f"eval_rewards.{name}",
                        f"cannot judge eval_datasets.{key}: {exc.problem}",
                        f"drop it: ~eval_rewards.{name}",
                    ) from None
        self.stream = PromptStream(self.dataset, seed=cfg.seed)
        self.logger = build(cfg.logger, "logger") if self.is_main else None
        # the policy (a LoRA adapter's initialisation draws from torch's global generator)
        seed_global(cfg.seed, INIT)
        self.policy: Policy = build(cfg.model, "model")
        self.reward.to(self.device)
        for held in self.eval_rewards.values():
            held.to(self.device)
        # CLIP image features for drift and diversity: from the first reward that has an image encoder
        self.feature_reward = next((r for r in [self.reward, *self.eval_rewards.values()] if r.gives_features), None)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(t.mixed_precision, torch.float32)
        if self.device.type == "cpu":
            weight_dtype = torch.float32
        self.policy.to(self.device, weight_dtype)
        if self.algorithm.needs_reference or self.algorithm.uses_reference:
            self.policy.keep_reference()  # pi_ref: the weights as loaded, before any checkpoint
        self.sampler.setup(self.policy.scheduler_config)
        self.params = self.policy.trainable_parameters()
        self.ema = None  # trainer.ema_decay: the moving average of self.params (evaluation and export use it)
        if t.ema_decay is not None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=t.ema_decay)
        optimizer = build(cfg.optimizer, "optimizer")(self.params)
        self.policy.unet, self.optimizer = self.accelerator.prepare(self.policy.unet, optimizer)
        self.params = self.policy.trainable_parameters()  # FSDP swaps in sharded parameters
        sharding.describe(self.accelerator, self.policy)
        self.run_state = _RunState(self)
        self.lock = ckpt.RunLock(self.run_dir)
        # rewards overlap the next sampling batch on GPU; on CPU they would compete for the same cores
        # (two OpenMP thread teams on one set of cores halve the sampler's speed), so they run inline
        overlap = t.async_reward and self.device.type != "cpu"
        self.executor = ThreadPoolExecutor(max_workers=1) if overlap else _InlineExecutor()
        self.epoch = 0  # completed epochs
        self._bar = None  # the training progress bar of the epoch being trained
        self._held_out_s = 0.0  # the current evaluation's time in held-out rewards, drift and diversity
        self.first_eval: dict[str, EvalResult] | None = None  # the run's first evaluation (rlft/evaluation.py)
        self.base_images: dict[str, dict] = {}  # eval/base.pt: each set's first-evaluation images, made once
        self.eval_results: dict[str, EvalResult] = {}  # the latest one

    # ------------------------------------------------------------------ checkpoints (rlft/checkpoint.py)
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def complete_checkpoints(self) -> list[Path]:
        """This run's complete checkpoints, oldest first."""
        return ckpt.complete_checkpoints(self.run_dir)

    def latest_checkpoint(self) -> Path | None:
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/epoch_NNNNN`` (main process) through a ``.tmp`` directory renamed when
        complete, then keep the newest ``trainer.keep_checkpoints``."""
        final = self.checkpoint_root / f"epoch_{self.epoch:05d}"
        tmp = final.with_name(final.name + ".tmp")
        self.accelerator.wait_for_everyone()
        trainable, optimizer = sharding.gather(self.accelerator, self.policy, self.optimizer)  # every process
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            ema = None
            if self.ema is not None:  # copies: on a CPU the state dict's tensors are the weights themselves
                with self.ema_weights():
                    ema = {k: v.detach().cpu().clone() for k, v in self.policy.trainable_state_dict().items()}
            scaler = self.accelerator.scaler
            meta = {
                "epoch": self.epoch,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                "config_unresolved": OmegaConf.to_container(self.cfg, resolve=False),
                "state": self.run_state.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "ema": None if self.ema is None else {"optimization_step": self.ema.optimization_step},
            }
            try:
                ckpt.write(tmp, trainable, optimizer, meta, ema)
            except OSError as e:  # a full disk, a quota: the previous checkpoints stay as they were
                shutil.rmtree(tmp, ignore_errors=True)
                previous = self.latest_checkpoint()
                kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
                raise RlftError(f"cannot write checkpoint {final}: {e.strerror or e}; {kept}") from None
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.complete_checkpoints()[: -max(1, self.cfg.trainer.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Weights, optimizer, scaler and run state from ``checkpoint`` (CheckpointError if damaged)."""
        marker, trainable, optimizer = ckpt.read(checkpoint)
        self._check_same_config(checkpoint, marker)
        try:
            sharding.restore(self.accelerator, self.policy, self.optimizer, trainable, optimizer)
            if self.accelerator.scaler is not None and marker.get("scaler"):
                self.accelerator.scaler.load_state_dict(marker["scaler"])
            self.run_state.load_state_dict(marker["state"])
            if self.ema is not None:
                self._load_ema(checkpoint, marker)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{checkpoint} does not fit this run ({type(e).__name__}: {e})") from None

    def _load_ema(self, checkpoint: Path, marker: dict) -> None:
        """The moving average from ``ema.safetensors``: loaded into the weights, read back as its shadow copy."""
        named = ckpt.read_ema(checkpoint)
        if named is None or not marker.get("ema"):
            raise CheckpointError(f"{checkpoint} holds no moving average (the run had trainer.ema_decay=null)")
        current = [p.detach().clone() for p in self.params]
        self.policy.load_trainable_state_dict(named)
        self.ema.shadow_params = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, value in zip(self.params, current):
                p.copy_(value)
        self.ema.optimization_step = int(marker["ema"]["optimization_step"])

    @contextmanager
    def ema_weights(self):
        """The moving-average weights in place of the trained ones (trainer.ema_decay), restored on exit."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def resume_from(self) -> Path | None:
        """Load the checkpoint to continue from, per ``resume`` (auto | never | <dir>); returns it.

        auto: the newest complete checkpoint; one that cannot be read is skipped with one line and
        the one before it is used."""
        mode = str(self.cfg.resume)
        done = self.complete_checkpoints()
        if mode == "never":
            if done:
                raise RlftError(
                    f"{self.run_dir} already holds checkpoints ({done[-1].name}); set resume=auto to continue "
                    "that run, or a new run_name=... to start another"
                )
            return None
        if mode == "auto":
            for candidate in reversed(done):
                try:
                    self.load_checkpoint(candidate)
                    return candidate
                except CheckpointError as e:
                    self._print(f"rlft: warning: skipping damaged checkpoint {candidate.name}: {e}")
            if done:
                raise RlftError(
                    f"no checkpoint in {self.checkpoint_root} can be read (see the warnings above); "
                    "start again with resume=never and a new run_name=..."
                )
            return None
        path = Path(mode).expanduser()
        if not (path / COMPLETE_MARKER).exists():
            raise ConfigError(
                "resume",
                f"'{mode}' is not a complete checkpoint directory",
                f"use auto, never, or a directory holding {COMPLETE_MARKER}",
            )
        self.load_checkpoint(path)
        return path

    def _check_same_config(self, checkpoint: Path, marker: dict) -> None:
        """Refuse a resume whose config differs in what the run *is*. Not compared: the keys in
        RESUME_IGNORED_KEYS, and values that differ only where they resolve the same expression to
        another place (``${rlft.package:toy/weights}`` in another checkout, ``${oc.env:...}`` caches)."""
        now = OmegaConf.to_container(self.cfg, resolve=True)
        now_unresolved = OmegaConf.to_container(self.cfg, resolve=False)
        saved_unresolved = marker.get("config_unresolved", {})
        diffs = [
            d
            for d in _config_diff(marker["config"], now)
            if not d.startswith(RESUME_IGNORED_KEYS)
            and not _same_expression(_at(saved_unresolved, d), _at(now_unresolved, d))
        ]
        if diffs:
            raise RlftError(
                f"cannot resume {checkpoint}: its config differs in {', '.join(diffs[:5])}; use the same "
                "settings, or a new run_name=... (or resume=never) to start another run"
            )

    # ------------------------------------------------------------------ one epoch
    def _prompts_for_epoch(self):
        """This process's prompts (each repeated images_per_prompt times), their epoch-wide group ids
        (the prompt's position in the epoch) and each sample's position in the epoch  [B] long."""
        p = self.plan
        global_indices = self.stream.next_indices(p.prompts_per_epoch)
        mine = shard(list(range(p.prompts_per_epoch)), self.accelerator.process_index, p.world_size)
        prompts = [self.dataset[global_indices[i]] for i in mine]
        prompts = [pr for pr in prompts for _ in range(p.images_per_prompt)]
        group = torch.tensor(mine).repeat_interleave(p.images_per_prompt)
        sample_index = group * p.images_per_prompt + torch.arange(p.images_per_prompt).repeat(len(mine))
        return prompts, group, sample_index

    @torch.no_grad()
    def _sample(self, prompts, noise_keys: list[tuple[int, ...]], desc: str) -> tuple[Trajectory, RewardOutput, dict]:
        """Rollouts in batches, sample b's noise from ``noise_keys[b]``; each batch's reward runs in a thread
        while the next batch samples (inline on CPU). Also returns the time spent in the reward
        (``reward_s``) and waiting for it after the last batch (``reward_wait_s``)."""
        texts, metas = [p.text for p in prompts], [dict(p.metadata) for p in prompts]
        cond = self.policy.encode(texts, self.sampler.negative_prompt)
        bs, shape = self.plan.sample_batch_size, self.policy.latent_shape
        trajectories, futures, reward_s = [], [], []

        def timed_reward(*args) -> RewardOutput:
            t0 = time.perf_counter()
            out = self.reward(*args)
            reward_s.append(time.perf_counter() - t0)
            return out

        bar = range(0, len(prompts), bs)
        if self.cfg.trainer.progress_bar and self.is_main:
            bar = tqdm(bar, desc=desc, leave=False)
        for start in bar:
            chunk = slice(start, start + bs)
            traj = self.sampler.sample(
                self.policy,
                cond[chunk],
                sample_noise(noise_keys[chunk], self.sampler.num_steps, shape),
                self.algorithm.reduce_log_prob,
                autocast=self.accelerator.autocast,
            )
            futures.append(self.executor.submit(timed_reward, traj.images, texts[chunk], metas[chunk]))
            trajectories.append(traj)
        t0 = time.perf_counter()
        rewards = RewardOutput.cat([f.result() for f in futures])
        times = {"reward_s": sum(reward_s), "reward_wait_s": time.perf_counter() - t0}
        return Trajectory.cat(trajectories), rewards, times

    def _learner(self) -> Learner:
        """The epoch's TrainContext: the policy and sampler, accelerate's backward (no gradient reduction
        while accumulating) and optimizer step, generators seeded by (seed, epoch, process)."""
        acc, t = self.accelerator, self.cfg.trainer

        def backward(loss: torch.Tensor, sync: bool) -> None:
            with nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.policy.unet):
                acc.backward(loss)
            if self._bar is not None:
                self._bar.update()

        def optimizer_step() -> float:
            norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.params)
            return float(norm)

        return Learner(
            self.policy,
            self.sampler,
            self.algorithm.reduce_log_prob,
            train_batch_size=self.plan.train_batch_size,
            gradient_accumulation_steps=self.plan.gradient_accumulation_steps,
            rows_per_call=t.rows_per_call,
            generator=seeded_generator(self.cfg.seed, TRAIN, self.epoch, acc.process_index),
            sample_generator=lambda *key: seeded_generator(self.cfg.seed, TRAIN_SAMPLE, self.epoch, *key),
            backward=backward,
            optimizer_step=optimizer_step,
            autocast=acc.autocast,
        )

    def _reference_log_probs(self, learner: Learner, rollout: Rollout) -> torch.Tensor:
        """reduce(log pi_ref(x_{j+1} | x_j, c)) at every stochastic step of every sample, 0 at the
        deterministic steps that nothing trains on  [B, S, ...], in calls of trainer.rows_per_call rows."""
        B, steps = rollout.batch_size, rollout.trainable_steps
        rows = Rows.of(torch.arange(B), steps.expand(B, -1))
        values = Rows.unflatten(learner.steps(rollout, rows, reference=True).log_prob, B)  # [B, S', ...]
        out = values.new_zeros(rollout.log_probs.shape[:2] + values.shape[2:])
        out[:, steps] = values
        return out

    def _handle_nan(self, rollout: Rollout, rewards: RewardOutput) -> bool:
        """True when the epoch must be skipped; stops the run (after saving) under on_nan_reward=stop."""
        bad_local = ~torch.isfinite(rewards.scores)
        if rewards.maps is not None:
            bad_local |= ~torch.isfinite(rewards.maps.flatten(1)).all(dim=1)
        n_bad = int(self.accelerator.gather(bad_local.sum().to(self.device).reshape(1)).sum())
        if n_bad == 0:
            return False
        where = self.run_dir / "nan_rewards" / f"epoch_{self.epoch + 1:05d}"
        if bad_local.any():
            where.mkdir(parents=True, exist_ok=True)
            tag = f"rank{self.accelerator.process_index}"
            idx = torch.nonzero(bad_local).flatten().tolist()
            from rlft.loggers import captioned_grid

            captioned_grid(rollout.trajectory.images[idx], [rollout.prompts[i] for i in idx]).save(where / f"{tag}.png")
            (where / f"{tag}.json").write_text(json.dumps([rollout.prompts[i] for i in idx], indent=1))
        if self.cfg.trainer.on_nan_reward == NaNPolicy.skip:
            return True
        # the state before this epoch (its prompts not yet drawn), under the completed epochs' name; a
        # complete checkpoint of it is already that state and is never overwritten
        self.stream.load_state_dict(self._stream_before_epoch)
        checkpoint = self.checkpoint_root / f"epoch_{self.epoch:05d}"
        if not (checkpoint / COMPLETE_MARKER).exists():
            checkpoint = self.save_checkpoint()
        raise RewardError(
            f"reward {type(self.reward).__name__} returned NaN/inf for {n_bad} image(s) in epoch {self.epoch + 1}; "
            f"images and prompts saved to {where}; {checkpoint} holds the state before that epoch. Fix the reward "
            "and run the same command again to redo the epoch, or add trainer.on_nan_reward=skip to drop such epochs"
        )

    def train_epoch(self) -> dict[str, float]:
        t_start = time.perf_counter()
        self._stream_before_epoch = self.stream.state_dict()  # what a NaN stop saves (the epoch is redone)
        prompts, group, sample_index = self._prompts_for_epoch()
        # SAMPLING (+ rewards in the background)
        self.policy.unet.eval()
        noise_epoch = 0 if self.cfg.trainer.fixed_sample_noise else self.epoch
        keys = [(self.cfg.seed, SAMPLE, noise_epoch, int(i)) for i in sample_index]
        traj, rewards, times = self._sample(prompts, keys, f"epoch {self.epoch + 1}: sampling")
        rollout = Rollout(traj, [p.text for p in prompts], group, rewards.scores, rewards.maps, sample_index)
        t_reference = time.perf_counter()
        learner = self._learner()
        if self.algorithm.needs_reference:
            rollout.ref_log_probs = self._reference_log_probs(learner, rollout)
        t_sampled = time.perf_counter()
        comm = _Comm(self.accelerator)
        global_rewards = comm.gather(rewards.scores)
        metrics = {
            "epoch": self.epoch + 1,
            "reward/mean": float(global_rewards.mean()),
            "reward/std": float(global_rewards.std(unbiased=False)),
        }
        for name, values in rewards.components.items():
            if len(rewards.components) > 1:
                metrics[f"reward/{name}/mean"] = float(comm.gather(values).mean())
        for name, values in rewards.parts.items():  # sub-scores: mean over the images they apply to
            values = comm.gather(values)
            if not values.isnan().all():
                metrics[f"reward/{name}/mean"] = float(values.nanmean())
        if self.is_main:
            self.logger.log_histogram("reward/hist", global_rewards, step=self.epoch + 1)
        if self._handle_nan(rollout, rewards):
            metrics["reward/nan_epochs_skipped"] = 1.0
            self.epoch += 1
            return metrics
        # PREPARE: advantages / pairs
        metrics.update(self.algorithm.prepare(rollout, comm))
        # TRAINING
        self.policy.unet.train()
        if self.cfg.trainer.progress_bar and self.is_main:
            self._bar = tqdm(desc=f"epoch {self.epoch + 1}: training", unit=" backward", leave=False)
        try:
            metrics.update(self.algorithm.update(rollout, learner))
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        t_trained = time.perf_counter()
        n_images = self.plan.samples_per_process * self.plan.world_size
        inline_reward = times["reward_s"] if isinstance(self.executor, _InlineExecutor) else 0.0
        metrics.update(
            {
                "perf/images_per_s": n_images / max(t_reference - t_start, 1e-9),
                # sampling alone: the reward's time is taken out where it ran inline (CPU) or was waited for
                "perf/sample_s": t_reference - t_start - times["reward_wait_s"] - inline_reward,
                "perf/reward_s": times["reward_s"],  # inside the reward (overlapping sampling on GPU)
                "perf/reward_wait_s": times["reward_wait_s"],
                "perf/reference_s": t_sampled - t_reference,
                "perf/train_s": t_trained - t_sampled,
                "perf/epoch_s": t_trained - t_start,
            }
        )
        self._log_samples("samples", traj.images, rollout.prompts, rollout.rewards, step=self.epoch + 1)
        k = self.cfg.trainer.log_images
        if rollout.reward_maps is not None and self.algorithm.needs_reward_maps and k > 0 and self.is_main:
            from rlft.loggers import overlay_maps, trained_maps

            advantages = None if rollout.advantages is None else rollout.advantages[:k]
            maps = trained_maps(rollout.reward_maps[:k], advantages, tuple(traj.images.shape[-2:]))
            overlaid = overlay_maps(traj.images[:k].cpu(), maps)  # only what is written
            self._log_samples("reward_maps", overlaid, rollout.prompts[:k], rollout.rewards[:k], step=self.epoch + 1)
        self.epoch += 1
        return metrics

    def _log_samples(self, key: str, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor, step: int):
        """The first ``trainer.log_images`` images, captioned with prompt and reward (main process)."""
        k = min(self.cfg.trainer.log_images, len(prompts))
        if self.is_main and k > 0:
            captions = [f"r={float(rewards[i]):.3g} | {prompts[i]}" for i in range(k)]  # the reward is never cut off
            self.logger.log_images(key, images[:k], captions, step=step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Reward and its sub-scores on fixed prompts of every evaluation set with fixed noise (comparable
        across epochs and runs; rlft/evaluation.py lists the metrics), and ``eval/reward/mean``, the sets' mean."""
        out: dict[str, float] = {"epoch": self.epoch}
        t0 = time.perf_counter()
        self.eval_results = {}
        self._held_out_s = 0.0  # held-out rewards, image features, drift and diversity (perf/eval_held_out_s)
        for name, dataset in self.eval_datasets.items():
            with self.ema_weights():
                result = self._evaluate_on(name, dataset)
            t1 = time.perf_counter()
            measure_drift_and_diversity(result, self.base_images.get(name), self._feature_source())
            self._held_out_s += time.perf_counter() - t1
            self.eval_results[name] = result
            first = (self.first_eval or {}).get(name, result)
            if self.is_main:
                columns, rows = result.table()
                self.logger.log_table(f"eval/{name}/table", columns, rows, step=self.epoch)
                if result.showcase is not None and len(result.showcase_index):
                    images, captions = side_by_side(first, result)
                    self.logger.log_images(f"eval/{name}", images.float() / 255, captions, step=self.epoch)
            out.update(result.metrics(name, first if first is not result else None))
        means = [out[f"eval/{name}/reward/mean"] for name in self.eval_datasets]
        out["eval/reward/mean"] = sum(means) / len(means)
        # made once, at the run's first evaluation (epoch 0, the base model): a set added later has no drift
        new_base = {}
        if self.epoch == 0:
            source = self._feature_source()
            new_base = {n: base_record(r, source) for n, r in self.eval_results.items() if n not in self.base_images}
        if self.is_main:
            if new_base:  # made once per set: a resumed run measures drift from the same images
                save_records(self.run_dir, BASE_FILE, {**self.base_images, **new_base})
            latest = {
                n: {"epoch": r.epoch, "prompts": r.prompts, "images": r.images} for n, r in self.eval_results.items()
            }
            save_records(self.run_dir, LATEST_FILE, latest)
        self.base_images.update(new_base)
        for result in self.eval_results.values():
            result.images = result.features = None  # kept on disk, not in memory
        out["perf/eval_s"] = time.perf_counter() - t0
        out["perf/eval_held_out_s"] = self._held_out_s
        if self.first_eval is None:
            self.first_eval = self.eval_results
            if self.is_main:
                save_first(self.run_dir, self.eval_results)
        return out

    def _feature_source(self) -> str | None:
        """Which reward's image encoder gives the CLIP features (drift compares only features of one encoder)."""
        if self.feature_reward is None:
            return None
        return f"{type(self.feature_reward).__module__}.{type(self.feature_reward).__qualname__}"

    def _evaluate_on(self, name: str, dataset: PromptDataset) -> EvalResult:
        """All processes' scores on ``trainer.eval_num_prompts`` prompts x ``eval_images_per_prompt`` seeds
        (image i's noise from (seed, EVAL, eval_seed, i)), with the showcase images on the main process."""
        t = self.cfg.trainer
        unique = dataset.evaluation_prompts(t.eval_num_prompts)
        prompts = [p for p in unique for _ in range(t.eval_images_per_prompt)]
        showcase = showcase_indices(len(unique), t.eval_images_per_prompt, t.log_images)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = list(range(len(prompts)))[rank::world]
        self.policy.unet.eval()
        local: dict = {"index": mine, "scores": [], "parts": {}, "held_out": {}, "held_out_parts": {}}
        if mine:
            keys = [(self.cfg.seed, EVAL, t.eval_seed, i) for i in mine]
            mine_prompts = [prompts[i] for i in mine]
            traj, rewards, _ = self._sample(mine_prompts, keys, f"evaluating on {name}")
            local["scores"] = rewards.scores.tolist()
            local["parts"] = {k: v.tolist() for k, v in rewards.parts.items()}
            texts, metas = [p.text for p in mine_prompts], [dict(p.metadata) for p in mine_prompts]
            t0 = time.perf_counter()
            for held_name, held in self.eval_rewards.items():
                scored = held(traj.images, texts, metas)
                local["held_out"][held_name] = scored.scores.tolist()
                local["held_out_parts"][held_name] = {k: v.tolist() for k, v in scored.parts.items()}
            local["images"] = to_uint8(traj.images).cpu()
            if self.feature_reward is not None:  # from the saved (uint8) images, as drift compares them
                local["features"] = self.feature_reward.image_features(local["images"].float() / 255).float().cpu()
            self._held_out_s += time.perf_counter() - t0
        for _ in range(sharding.idle_batches(self.accelerator, len(mine), len(prompts), self.plan.sample_batch_size)):
            self._sample(prompts[:1], [(self.cfg.seed, EVAL, t.eval_seed, 0)], f"evaluating on {name}")  # dropped
        gathered = [g for g in _Comm(self.accelerator).gather_object([local]) if g["scores"]]  # a process may hold none
        order = [i for g in gathered for i in g["index"]]
        rank_of = sorted(range(len(order)), key=order.__getitem__)  # gathered position of image i

        def ordered(per_process: list[list]) -> torch.Tensor:
            flat = [v for values in per_process for v in values]
            return torch.tensor([flat[j] for j in rank_of])

        images = torch.cat([g["images"] for g in gathered])[rank_of]
        features = torch.cat([g["features"] for g in gathered])[rank_of] if "features" in gathered[0] else None
        return EvalResult(
            epoch=self.epoch,
            prompts=[p.text for p in prompts],
            scores=ordered([g["scores"] for g in gathered]),
            parts={k: ordered([g["parts"][k] for g in gathered]) for k in gathered[0]["parts"]},
            showcase=images[showcase] if showcase else None,
            showcase_index=showcase,
            held_out={h: ordered([g["held_out"][h] for g in gathered]) for h in self.eval_rewards},
            held_out_parts={
                h: {k: ordered([g["held_out_parts"][h][k] for g in gathered]) for k in gathered[0]["held_out_parts"][h]}
                for h in self.eval_rewards
            },
            images=images,
            features=features,
            eval_seed=t.eval_seed,
        )

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.trainer
        if self.is_main:
            self.lock.acquire()  # one process per run directory (released when the process ends)
        checkpoint = self.resume_from()
        if checkpoint is not None:
            self._print(f"resumed from {checkpoint} (epoch {self.epoch})")
        resumed_epoch = self.epoch if checkpoint is not None else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.logger.start(self.run_dir, OmegaConf.to_container(cfg, resolve=True), resumed_epoch)
        self._print(f"run directory: {self.run_dir}")
        self._print(f"batch: {self.plan.describe()}")
        last: dict[str, float] = {}
        evaluate = bool(self.eval_datasets) and t.eval_every > 0
        # the first evaluation, kept in the run directory: a resumed run still compares against it
        self.first_eval = load_first(self.run_dir) if checkpoint is not None else None
        self.base_images = load_records(self.run_dir, BASE_FILE) if checkpoint is not None else {}
        if evaluate and self.epoch == 0:
            self._log(self.evaluate())
        while self.epoch < t.epochs:
            metrics = self.train_epoch()
            self._log(metrics)
            last = metrics
            if evaluate and (self.epoch % t.eval_every == 0 or self.epoch == t.epochs):
                last = {**last, **self._log(self.evaluate())}
            if (t.checkpoint_every and self.epoch % t.checkpoint_every == 0) or self.epoch == t.epochs:
                self.save_checkpoint()
        self._summarise()
        if self.epoch >= t.epochs and not last:
            self._print(f"run already complete ({self.epoch} epochs); raise trainer.epochs to continue it")
        self._print(self._where_results_are())
        if self.is_main:
            self.logger.finish()
            self.lock.release()
        self.executor.shutdown()
        self.accelerator.end_training()
        return last

    def _summarise(self) -> None:
        """Each evaluation set's paired gain from the first to the last evaluation, and the
        before/after grid of its showcase images (main process)."""
        first, last = self.first_eval or {}, self.eval_results
        pairs = {n: (first[n], last[n]) for n in self.eval_datasets if n in first and n in last}
        pairs = {n: (a, b) for n, (a, b) in pairs.items() if b.epoch > a.epoch}
        if not pairs or not self.is_main:
            return
        for name, (a, b) in pairs.items():
            for line in gain_lines(name, self.eval_datasets[name].name, a, b):
                self._print(line)
        grid = before_after_grid(pairs)
        if grid is not None:
            grid.save(self.run_dir / BEFORE_AFTER_FILE)
            self.logger.log_figure("eval/before_after", self.run_dir / BEFORE_AFTER_FILE, step=self.epoch)
            self._print(f"before/after images (same prompts and noise): {self.run_dir / BEFORE_AFTER_FILE}")
        from rlft.report import run_frontier

        frontier = run_frontier(self.run_dir)
        if frontier is not None:
            self.logger.log_figure("eval/frontier", frontier, step=self.epoch)
            self._print(f"hacking frontier (training reward against held-out rewards and drift): {frontier}")

    def _log(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.is_main:
            self.logger.log(metrics, step=int(metrics["epoch"]))
            shown = {
                k: v
                for k, v in metrics.items()
                if k in ("train/loss", "reward/mean")
                or (k.endswith("reward/mean") and k.startswith("eval/") and k.count("/") <= 3)
            }
            self._print(f"epoch {metrics['epoch']}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        return metrics

    def _print(self, message: str) -> None:
        """A line on the console and in ``<run>/console.log`` (main process)."""
        if self.is_main:
            tqdm.write(message)
            append_console(self.run_dir, message)

    def _where_results_are(self) -> str:
        """The run's last line: where its metrics, images and checkpoints are."""
        d = self.run_dir
        parts = [f"metrics {d / 'metrics.jsonl'}"]
        for name, what in (("samples", "training images"), ("eval", "evaluation images"), ("tables", "tables")):
            if (d / name).is_dir() and any((d / name).iterdir()):
                parts.append(f"{what} {d / name}")
        if (d / BEFORE_AFTER_FILE).exists():
            parts.append(f"before/after {d / BEFORE_AFTER_FILE}")
        latest = self.latest_checkpoint()
        if latest is not None:
            parts.append(f"checkpoint {latest} (python -m rlft.export {d} <dir> makes a diffusers model of it)")
        return "results: " + "; ".join(parts)


class _InlineExecutor:
    """ThreadPoolExecutor's submit/shutdown, run in the calling thread."""

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised by future.result(), as with a thread
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def _config_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain configs (dicts of plain values)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b))
    return [] if same else [prefix.rstrip(".")]


_MISSING = object()


def _at(config, dotted: str):
    """The value at a dotted key of a plain config, or _MISSING."""
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return _MISSING
        config = config[part]
    return config


def _same_expression(a, b) -> bool:
    """Both values are the same unresolved interpolation (``${...}``)."""
    return a is not _MISSING and a == b and isinstance(a, str) and "${" in a
