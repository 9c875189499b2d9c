"""Fully sharded data parallel (FSDP2): full finetuning of a denoiser that does not fit one GPU.

Launched with accelerate's FSDP config (``accelerate launch --config_file experiments/accelerate/fsdp.yaml
-m rlft ...``), ``accelerator.prepare`` shards the denoiser's blocks over the processes
(``torch.distributed.fsdp.fully_shard``); each forward gathers a block's weights and frees them again,
each backward reduce-scatters the gradients, and AdamW's moments live only as shards. Everything else
in the run is unchanged. What this module adds is the checkpoint: the weights and the optimizer state
are gathered from every process into the same files a one-process run writes (rlft/checkpoint.py,
the optimizer keyed by parameter index), so a sharded run's checkpoint exports, evaluates and resumes
like any other, and a resume puts each process's shard back from them.

Sharding is for full finetuning without a moving average: a LoRA adapter is small enough to train
with plain data parallelism, and the moving average (trainer.ema_decay) would need its own gather.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlft.errors import ConfigError

# wrappers that activation checkpointing and torch.compile put into parameter names, which the
# distributed state dicts leave out
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def is_sharded(accelerator) -> bool:
    """Whether the run was launched with accelerate's FSDP config."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check(cfg, accelerator) -> None:
    """Refuse, before any weights load, what a sharded run cannot do."""
    if not is_sharded(accelerator):
        return
    if not getattr(accelerator, "is_fsdp2", False):
        raise ConfigError(
            "fsdp_config.fsdp_version",
            "rlft shards with FSDP2 (torch's fully_shard) and gathers its checkpoints as such",
            "set fsdp_version: 2 in the accelerate config, as experiments/accelerate/fsdp.yaml does",
        )
    fix = "or launch without the FSDP config (plain data parallel: accelerate launch --multi_gpu ...)"
    if cfg.model.get("finetune") != "full":
        raise ConfigError(
            "model.finetune",
            f"FSDP shards full finetuning; '{cfg.model.get('finetune')}' keeps the whole denoiser on each GPU anyway",
            f"set model.finetune=full, {fix}",
        )
    if cfg.trainer.ema_decay is not None:
        raise ConfigError(
            "trainer.ema_decay", "a moving average of sharded weights is not kept", f"set trainer.ema_decay=null, {fix}"
        )


def describe(accelerator, policy) -> None:
    """After accelerator.prepare: print how much of the denoiser this process holds."""
    if not is_sharded(accelerator):
        return
    from torch.distributed.tensor import DTensor

    params = list(policy.unet.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    total = sum(p.numel() for p in params)
    n = accelerator.num_processes
    accelerator.print(
        f"sharding: FSDP over {n} processes; this one holds {local:,} of the denoiser's {total:,} weights "
        f"({local / total:.1%}), and their gradients and optimizer state"
    )


def idle_batches(accelerator, mine: int, total: int, batch_size: int) -> int:
    """Sampling batches this process must add (and drop) so that every process makes the same denoiser
    calls: a sharded forward gathers weights from all processes. ``mine`` of ``total`` items are this
    process's (a rank::world split, so the first process holds the most)."""
    if not is_sharded(accelerator):
        return 0
    most = -(-total // accelerator.num_processes)
    return -(-most // batch_size) - -(-mine // batch_size)


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _parameter_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in its state dict's index order."""
    names = {id(p): _clean(n) for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather(accelerator, policy, optimizer) -> tuple[dict[str, Tensor], dict] | tuple[None, None]:
    """(trainable weights, optimizer state_dict) on the CPU of the main process, as a one-process run
    has them; (None, None) on the others. Every process must call it (a sharded run gathers)."""
    if not is_sharded(accelerator):
        if not accelerator.is_main_process:
            return None, None
        trainable = {k: v.detach().cpu().contiguous() for k, v in policy.trainable_state_dict().items()}
        return trainable, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    module, inner = policy.unet, getattr(optimizer, "optimizer", optimizer)
    # the model's state dict first: its hook reshards a root module that evaluation left unsharded
    trainable = get_model_state_dict(module, options=_options(cpu_offload=True))
    if not inner.state:  # no step yet (the same on every process): torch's gather would take one at lr 0
        return (trainable, inner.state_dict()) if accelerator.is_main_process else (None, None)
    by_name = get_optimizer_state_dict(module, inner, options=_options(cpu_offload=True))
    if not accelerator.is_main_process:
        return None, None
    index = {name: i for i, name in enumerate(_parameter_names(module, inner))}
    state = {index[name]: values for name, values in by_name["state"].items()}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]]
    return {k: v.contiguous() for k, v in trainable.items()}, {"state": state, "param_groups": groups}


def restore(accelerator, policy, optimizer, trainable: dict[str, Tensor], optimizer_state: dict) -> None:
    """Load a checkpoint's weights and optimizer state (as ``gather`` returns them), each process
    keeping its shard. Every process must call it with the checkpoint's contents."""
    if not is_sharded(accelerator):
        policy.load_trainable_state_dict(trainable)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    module, inner = policy.unet, getattr(optimizer, "optimizer", optimizer)
    set_model_state_dict(module, trainable, options=_options())
    if not optimizer_state["state"]:  # saved before the first step: only the parameter groups
        inner.load_state_dict(optimizer_state)
        return
    names = _parameter_names(module, inner)
    try:
        state = {names[int(i)]: values for i, values in optimizer_state["state"].items()}
        groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer_state["param_groups"]]
    except IndexError:  # the runner reports a ValueError as a checkpoint that does not fit the run
        raise ValueError(f"the optimizer state names more than this model's {len(names)} parameters") from None
    set_optimizer_state_dict(module, inner, {"state": state, "param_groups": groups}, options=_options())
