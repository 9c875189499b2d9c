"""Checkpoints that hold only tensors (safetensors) and plain JSON: reading one cannot run code.

    <run>/checkpoints/epoch_NNNNN/
        trainable.safetensors   the trainable weights (the LoRA adapter or the whole UNet)
        optimizer.safetensors   every tensor of the optimizer's state, keyed "<parameter index>/<name>"
        ema.safetensors         with trainer.ema_decay: the moving average of the trainable weights
                                (named as trainable.safetensors; evaluation and export use it)
        run_state.json          written last, so that its presence marks a complete checkpoint: the
                                epoch, the resolved config, the optimizer's parameter groups and
                                non-tensor state, the gradient scaler's state (fp16) and the run's own
                                state (prompt stream position, algorithm state such as DDPO's
                                per-prompt statistics)

No pickle is written or read (accelerate's ``save_state`` would pickle registered objects and load
them with ``weights_only=False``). Every draw of a run comes from a generator seeded by what it is
for (rlft/seeding.py), so no global RNG state is needed to resume exactly. A file that is missing,
truncated or not what it should be raises ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlft.errors import RlftError

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EMA_FILE = (
    "ema.safetensors"  # trainer.ema_decay: the moving average of the trainable weights, named as in TRAINABLE_FILE
)
COMPLETE_MARKER = "run_state.json"
FORMAT = 2  # 1: accelerate's save_state with pickled run state (no longer read)


class CheckpointError(RlftError):
    """A checkpoint file is missing, damaged or of another format."""


def optimizer_to_files(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict()`` as (tensors for safetensors, the rest as plain JSON values)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    """The inverse of ``optimizer_to_files``: an optimizer ``state_dict()``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *plain["scalars"].items()]:
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in plain["param_groups"]]
    return {"state": state, "param_groups": groups}


def _json_safe(value):
    """Floats JSON can hold exactly (repr round-trips); inf/nan as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"float"}:
            return float(value["float"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:  # safetensors reports a failed write (a full disk) as its own error
        raise OSError(f"{path}: {e}") from None


def write(
    directory: Path,
    trainable: dict[str, torch.Tensor],
    optimizer: dict,
    meta: dict,
    ema: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint into ``directory`` (which must exist); the marker last. A failed write
    raises OSError."""
    _save(trainable, directory / TRAINABLE_FILE)
    if ema is not None:
        _save(ema, directory / EMA_FILE)
    tensors, plain = optimizer_to_files(optimizer)
    _save(tensors, directory / OPTIMIZER_FILE)
    marker = {"format": FORMAT, **meta, "optimizer": plain}
    (directory / COMPLETE_MARKER).write_text(json.dumps(_json_safe(marker), indent=1))


def read_marker(directory: Path) -> dict:
    """The checkpoint's ``run_state.json``, checked to be of this format."""
    path = directory / COMPLETE_MARKER
    try:
        marker = _from_json(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an rlft checkpoint of format {FORMAT} (an older rlft pickled its run state, "
            "which is no longer read); start a new run_name=..."
        )
    for key in ("epoch", "config", "state", "optimizer"):
        if key not in marker:
            raise CheckpointError(f"{path} has no '{key}'")
    return marker


def read(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(marker, trainable tensors, optimizer state_dict) of a complete checkpoint."""
    marker = read_marker(directory)
    files = {}
    for name in (TRAINABLE_FILE, OPTIMIZER_FILE):
        path = directory / name
        try:
            files[name] = load_file(str(path))
        except (OSError, SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    try:
        optimizer = optimizer_from_files(files[OPTIMIZER_FILE], marker["optimizer"])
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory / COMPLETE_MARKER}: optimizer state unreadable ({e})") from None
    return marker, files[TRAINABLE_FILE], optimizer


def read_ema(directory: Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint's moving-average weights (``EMA_FILE``), None when the run kept none."""
    path = directory / EMA_FILE
    if not path.exists():
        return None
    try:
        return load_file(str(path))
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first."""
    return sorted(p.parent for p in (Path(run_dir) / "checkpoints").glob(f"epoch_*/{COMPLETE_MARKER}"))


class RunLock:
    """One process per run directory: an exclusive ``flock`` on ``<run>/rlft.lock`` held while the run
    lives. The kernel drops it when the process ends, however it ends, so a killed run leaves no lock
    that blocks a restart; the file keeps the holder's pid and host for the message."""

    NAME = "rlft.lock"

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / self.NAME
        self.file = None

    def acquire(self) -> None:
        import fcntl
        import os
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 - held open for the run's lifetime
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RlftError(
                f"{self.path.parent} is in use by {holder}; wait for that run to end, or choose another run_name=..."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"rlft pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
