"""Typed configuration.

Two layers of typing, both checked at start-up before any model loads:

* The run-level schema (:class:`RunConfig` with :class:`TrainerConfig`) is a
  Hydra structured config: Hydra itself rejects an unknown key or a value of
  the wrong type while composing.
* Plug-in groups (``model``, ``reward``, ``algorithm``, ``sampler``, ``dataset``,
  each entry of ``eval_datasets``, ``logger``, ``optimizer``) are ``_target_`` nodes. Their
  schema is the target's signature: :func:`validate_component` builds a
  dataclass from it and merges the node into it, so a key the target does not
  accept or a value of the wrong type fails naming the key ("airtight"
  configs: no key the code ignores).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from rlft.errors import ConfigError, RlftError

COMPONENT_GROUPS = ("model", "reward", "algorithm", "sampler", "dataset", "logger", "optimizer")
# evaluation sets: a named dict filled from the dataset group, dataset@eval_datasets.<name>=<option>
EVAL_DATASETS = "eval_datasets"
# held-out rewards: a named dict filled from the reward group, reward@eval_rewards.<name>=<option>
EVAL_REWARDS = "eval_rewards"


class NaNPolicy(str, enum.Enum):
    stop = "stop"  # save a checkpoint and the offending images, then stop (exit 3)
    skip = "skip"  # drop the epoch's update, log it, go on


@dataclass
class TrainerConfig:
    """The loop's sizes and schedule. Batch sizes say whether they are global or per process."""

    epochs: int = 100
    prompts_per_epoch: int = 32  # global: distinct prompts drawn per epoch, split over processes
    images_per_prompt: int = 1  # images of each prompt, all on the process that owns the prompt
    fixed_sample_noise: bool = False  # every epoch samples from epoch 1's noise (the image a feedback map judges)
    train_batch_size: int = 4  # per process: samples per gradient micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    # (sample, denoising step) rows per denoiser call while training and in the reference pass
    # (rlft/learner.py); null: train_batch_size, one step of a micro-batch per call as in the reference
    # codes. More rows are faster for a small model (conf/tuning/toy_*.yaml) and cost their activations
    # (x2 with guidance); the gradient is the same up to summation order
    rows_per_call: Optional[int] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    max_grad_norm: float = 1.0
    # an exponential moving average of the trainable weights (diffusers' EMAModel: after optimizer step k,
    # ema <- d_k ema + (1 - d_k) theta with d_k = min(ema_decay, k / (9 + k))), used for evaluation and
    # export and saved in checkpoints; null: off
    ema_decay: Optional[float] = None  # noqa: UP045
    mixed_precision: str = "no"  # no | fp16 | bf16 (log-probs are always computed in fp32)
    allow_tf32: bool = True
    eval_every: int = 10  # epochs; 0 disables evaluation
    eval_num_prompts: int = 8
    eval_images_per_prompt: int = 2
    eval_seed: int = 1234
    checkpoint_every: int = 10  # epochs; 0 keeps only the final checkpoint
    keep_checkpoints: int = 2
    log_images: int = 8  # sample images written per epoch (0 disables)
    on_nan_reward: NaNPolicy = NaNPolicy.stop
    async_reward: bool = True  # score batch k while batch k+1 samples (GPU; inline on CPU)
    progress_bar: bool = True


@dataclass
class PathsConfig:
    output_root: str = "outputs"
    cache_dir: str = "${oc.env:RLFT_CACHE,${oc.env:HOME,.}/.cache/rlft}"


@dataclass
class RunConfig:
    """The root config: a defaults list over the groups plus a few run-level scalars."""

    seed: int = 0
    run_name: str = "run"
    resume: str = "auto"  # auto: continue this run_name's latest checkpoint if any | never | <checkpoint dir>
    paths: PathsConfig = field(default_factory=PathsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sampler: Any = None
    model: Any = None
    reward: Any = None
    algorithm: Any = None
    dataset: Any = None
    eval_datasets: Any = field(default_factory=dict)  # name -> dataset node (dataset@eval_datasets.<name>)
    eval_rewards: Any = field(default_factory=dict)  # name -> held-out reward node (reward@eval_rewards.<name>)
    logger: Any = None
    optimizer: Any = None


def register_configs() -> None:
    """Register the run-level schema with Hydra's ConfigStore (config.yaml extends it), and the
    ``${rlft.package:<sub/path>}`` resolver: a path inside the installed rlft package (model=toy's weights)."""
    cs = ConfigStore.instance()
    cs.store(name="rlft_schema", node=RunConfig)
    OmegaConf.register_new_resolver("rlft.package", _package_path, replace=True)


def compose_run(overrides: list[str]) -> DictConfig:
    """The run config that `python -m rlft <overrides>` would run, composed in this process (for code
    that drives the runner itself: rlft/bench.py, rlft/studio). ``${hydra:...}`` values resolve as
    under the command line; a config mistake is one :class:`ConfigError`, as there."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("overrides", first, "the same overrides as `python -m rlft` takes") from None
    HydraConfig.instance().set_config(cfg)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate(cfg)
    return cfg


def _package_path(sub: str) -> str:
    return str(Path(__file__).resolve().parent / sub)


# --------------------------------------------------------------------------- components


_SIMPLE = (int, float, bool, str)


def _omegaconf_type(annotation: Any) -> Any:
    """Map a signature annotation onto a type OmegaConf can check (Any where it cannot)."""
    if annotation is inspect.Parameter.empty:
        return Any
    if annotation in _SIMPLE or (isinstance(annotation, type) and issubclass(annotation, enum.Enum)):
        return annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        simple = [a for a in non_none if a in _SIMPLE]
        if len(non_none) == 1 or len(simple) == 1:  # e.g. lr: Union[float, Tensor] -> float
            inner = _omegaconf_type(simple[0] if len(simple) == 1 else non_none[0])
            if inner is Any or len(non_none) == len(args):
                return inner
            return Optional[inner]  # noqa: UP045 (OmegaConf reads typing.Optional, not X | None)
        return Any
    if origin in (list, tuple, typing.Sequence) or annotation in (list, tuple):
        inner = _omegaconf_type(args[0]) if args else Any
        return list[inner] if inner in _SIMPLE else list[Any]
    if origin is dict or annotation is dict:
        inner = _omegaconf_type(args[1]) if len(args) == 2 else Any
        return dict[str, inner] if inner in _SIMPLE else dict[str, Any]
    if origin is typing.Literal:
        return str
    return Any


def _literal_choices(annotation: Any) -> tuple | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            choices = _literal_choices(arg)
            if choices:
                return choices
    return None


def signature_schema(target: Any) -> tuple[type, dict[str, tuple]]:
    """A dataclass whose fields are ``target``'s parameters (types and defaults).

    Returns the dataclass and, per parameter annotated with ``Literal``, its choices.
    """
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolved forward references: fall back to the raw annotations
        hints = {}
    fields, choices = [("_target_", str, dataclasses.field(default=""))], {}
    fields.append(("_partial_", bool, dataclasses.field(default=False)))
    fields.append(("_recursive_", bool, dataclasses.field(default=True)))
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name == "self":
            continue
        annotation = hints.get(name, param.annotation)
        typ = _omegaconf_type(annotation)
        if (literal := _literal_choices(annotation)) is not None:
            choices[name] = literal
        if param.default is inspect.Parameter.empty:
            fields.append((name, typ, dataclasses.field(default="???")))
            continue
        value = param.default
        if isinstance(value, (list, dict, tuple)):
            default = dataclasses.field(default_factory=lambda v=value: list(v) if isinstance(v, tuple) else v)
        elif value is None or isinstance(value, _SIMPLE) or isinstance(value, enum.Enum):
            default = dataclasses.field(default=value)
        else:  # an object default (a tensor, a class): not configurable from yaml
            typ, default = Any, dataclasses.field(default=None)
        fields.append((name, typ, default))
    name = getattr(target, "__qualname__", str(target)).replace(".", "_") + "Schema"
    return dataclasses.make_dataclass(name, fields), choices


def _short(exc: OmegaConfBaseException) -> str:
    msg = str(exc).split("\n")[0]
    return msg.replace("__main__.", "")


def build(node: DictConfig, group: str, home: str | None = None):
    """``hydra.utils.instantiate`` whose errors name the config key instead of wrapping the cause.

    A component names its keys as if it lived at ``home`` ("dataset.path"); built at another key
    (``group`` = "eval_datasets.unseen", "reward.rewards.hpsv2"), its errors are moved there."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError) and home and cause.key.split(".")[0] == home:
            raise cause.moved(home, group) from None
        if isinstance(cause, RlftError):
            raise cause from None
        detail = str(cause) if cause is not None else str(exc)
        raise ConfigError(group, f"cannot build {node.get('_target_')}: {detail.strip().splitlines()[0]}") from None


def validate_component(group: str, node: DictConfig, training: bool = True) -> None:
    """Check one ``_target_`` node against its target's signature; raise ConfigError naming the key.
    ``training``: the node is for a training run (a sampler for evaluation only is refused)."""
    if node is None:
        return
    if not isinstance(node, DictConfig):
        option = f"dataset@{group}" if group.startswith(EVAL_DATASETS) else group
        option = f"reward@{group}" if group.startswith(EVAL_REWARDS) else option
        raise ConfigError(
            group,
            f"is the plain value {node!r}, not a component",
            f"choose an option of its config group with {option}={node}",
        )
    if OmegaConf.is_missing(node, "_target_"):  # reward=custom, algorithm=custom
        raise ConfigError(f"{group}._target_", "is required but not set", f"set {group}._target_=<module.Class>")
    target_path = node.get("_target_")
    if not target_path:
        raise ConfigError(group, "has no _target_", f"choose an option of the '{group}' group")
    try:
        target = get_object(target_path)
    except Exception as exc:  # ImportError, AttributeError
        raise ConfigError(f"{group}._target_", f"cannot import '{target_path}': {exc}") from None
    # a sampler for evaluation only, refused for training before its keys (the sampler is the error)
    if training and group == "sampler" and getattr(target, "untrainable", None):
        raise ConfigError("sampler", f"{target.__name__} is for evaluation and export only", target.untrainable)
    schema, choices = signature_schema(target)
    try:
        plain = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(group, f"cannot resolve: {_short(exc)}") from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
        known = [f.name for f in dataclasses.fields(schema) if not f.name.startswith("_")]
        detail = _short(exc)
        refused = getattr(target, "refused_options", {})
        if isinstance(exc, ConfigKeyError) and key in refused:
            raise ConfigError(f"{group}.{key}", f"is not an option of {target_path}", refused[key]) from None
        if isinstance(exc, ConfigKeyError):
            own = f"; a class of your own takes only its own keys: {group}=custom {group}._target_=..."
            raise ConfigError(
                f"{group}.{key}",
                f"unknown key for {target_path}",
                f"known keys: {', '.join(known)}" + (own if group in ("reward", "algorithm") else ""),
            ) from None
        raise ConfigError(f"{group}.{key}", detail) from None
    missing = OmegaConf.missing_keys(merged)
    if missing and not node.get("_partial_", False):
        key = sorted(missing)[0]
        raise ConfigError(f"{group}.{key}", "is required but not set", f"set {group}.{key}=...")
    for key, allowed in choices.items():
        value = merged.get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"{group}.{key}", f"'{value}' is not one of {list(allowed)}")


def _number(node, key: str):
    value = node.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _validate_optimizer(node) -> None:
    """Ranges of the optimizer values every torch optimizer shares (lr, weight decay, eps, betas)."""
    if node is None:
        return
    lr, decay, eps = _number(node, "lr"), _number(node, "weight_decay"), _number(node, "eps")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError("optimizer.lr", f"must be a finite number > 0, got {lr}")
    if decay is not None and not (math.isfinite(decay) and decay >= 0):
        raise ConfigError("optimizer.weight_decay", f"must be a finite number >= 0, got {decay}")
    if eps is not None and not eps > 0:
        raise ConfigError("optimizer.eps", f"must be > 0, got {eps}")
    betas = node.get("betas")
    if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ConfigError("optimizer.betas", f"must be two numbers in [0, 1), got {list(betas)}")


def _validate_model(node) -> None:
    """LoRA's rank and alpha (when the model trains a LoRA adapter)."""
    if node is None or node.get("finetune") != "lora":
        return
    rank, alpha = _number(node, "lora_rank"), _number(node, "lora_alpha")
    if rank is not None and rank < 1:
        raise ConfigError(
            "model.lora_rank", f"must be >= 1, got {rank}", "or train the whole UNet: model.finetune=full"
        )
    if alpha is not None and not alpha > 0:
        raise ConfigError("model.lora_alpha", f"must be > 0, got {alpha}")


def _validate_family(model, sampler) -> None:
    """A flow model (its policy class says ``flow_matching``) takes a flow sampler, a diffusion model a
    diffusion sampler: refused here, before the model loads (the sampler checks the scheduler again)."""
    if model is None or sampler is None:
        return
    try:
        builder, sampler_cls = get_object(str(model.get("_target_"))), get_object(str(sampler.get("_target_")))
    except Exception:  # noqa: BLE001 - an unknown target is validate_component's to report
        return
    policy_cls = getattr(builder, "__self__", builder)  # Policy.from_pretrained -> Policy
    flow = getattr(policy_cls, "flow_matching", None)
    if flow is None or flow == getattr(sampler_cls, "flow_matching", False):
        return
    if flow:
        raise ConfigError("sampler", f"{sampler_cls.__name__} samples diffusion models; the model is a flow model",
                          "use sampler=flow_sde (sampler=flow_ode to evaluate)")  # fmt: skip
    raise ConfigError("sampler", f"{sampler_cls.__name__} samples flow models; the model is a diffusion model",
                      "use sampler=ddim or sampler=ddpm")  # fmt: skip


def validate(cfg: DictConfig) -> None:
    """Start-up checks over the whole config (types, keys, values that cannot work)."""
    dataset = cfg.get("dataset")
    if isinstance(dataset, DictConfig) and "${dataset}" in str(OmegaConf.to_container(dataset).get("of")):
        raise ConfigError(  # toy_rephrased / toy_swapped: rewordings of the training prompts, not a training set
            "dataset",
            f"{dataset._target_} rewords the training prompts (of: ${{dataset}}): for evaluation, not training",
            "train on dataset=toy_relations, whose PRDP and DDPO recipes evaluate rephrased and swapped; with another "
            "training set add them as +dataset@eval_datasets.rephrased=toy_rephrased",
        )
    for group in COMPONENT_GROUPS:
        validate_component(group, cfg.get(group))
    eval_datasets = cfg.get(EVAL_DATASETS)
    if not isinstance(eval_datasets, DictConfig):
        raise ConfigError(
            EVAL_DATASETS,
            f"is the plain value {eval_datasets!r}, not a set of named evaluation datasets",
            f"name each one: dataset@{EVAL_DATASETS}.unseen={eval_datasets}",
        )
    for name, node in eval_datasets.items():
        validate_component(f"{EVAL_DATASETS}.{name}", node)
    eval_rewards = cfg.get(EVAL_REWARDS)
    if eval_rewards is not None and not isinstance(eval_rewards, DictConfig):
        raise ConfigError(
            EVAL_REWARDS,
            f"is the plain value {eval_rewards!r}, not a set of named held-out rewards",
            f"name each one: +reward@{EVAL_REWARDS}.pickscore=pickscore",
        )
    for name, node in (eval_rewards or {}).items():
        from rlft.evaluation import RESERVED_NAMES

        if name in RESERVED_NAMES or name.startswith(("drift_", "diversity_")):
            raise ConfigError(
                f"{EVAL_REWARDS}.{name}",
                f"'{name}' names the training reward's, drift's or diversity's metrics or table columns",
                f"give the held-out reward another name: +reward@{EVAL_REWARDS}.<name>=<option>",
            )
        validate_component(f"{EVAL_REWARDS}.{name}", node)
    build(cfg.sampler, "sampler")  # its values (steps, eta, guidance): a sampler is built without the model
    t = cfg.trainer
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError("trainer.mixed_precision", f"'{t.mixed_precision}' is not one of no, fp16, bf16")
    keys = ("epochs", "prompts_per_epoch", "images_per_prompt", "train_batch_size", "gradient_accumulation_steps")
    if t.rows_per_call is not None and t.rows_per_call < 1:
        raise ConfigError("trainer.rows_per_call", f"must be >= 1 or null, got {t.rows_per_call}")
    for key in keys:
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}", f"must be >= 1, got {t[key]}")
    for key in ("eval_every", "checkpoint_every", "log_images", "eval_seed"):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}", f"must be >= 0, got {t[key]}")
    for key in ("eval_num_prompts", "eval_images_per_prompt", "keep_checkpoints"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}", f"must be >= 1, got {t[key]}")
    if not (math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0):
        raise ConfigError(
            "trainer.max_grad_norm",
            f"must be a finite number > 0, got {t.max_grad_norm}",
            "gradients are clipped to this norm (1.0 in DDPO and PRDP); a negative value would reverse them",
        )
    if t.get("ema_decay") is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(
            "trainer.ema_decay",
            f"must be in (0, 1) or null, got {t.ema_decay}",
            "0.99 averages over ~100 optimizer steps",
        )
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError("seed", f"must be an integer in [0, 2^63), got {cfg.seed}")
    _validate_optimizer(cfg.get("optimizer"))
    _validate_model(cfg.get("model"))
    _validate_family(cfg.get("model"), cfg.get("sampler"))
    if not cfg.resume or not str(cfg.resume).strip():
        raise ConfigError("resume", "is empty", "use auto, never or a checkpoint directory")
    from rlft.presets import check_world

    check_world(cfg)
