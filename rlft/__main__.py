"""`python -m rlft [overrides]`: the Hydra entry point.

Config mistakes (unknown option, unknown key, wrong type, values that cannot
work, missing files) end in one line on stderr and a non-zero exit code,
never a stack trace. Hydra itself reports composition errors the same way.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlft.config import register_configs, validate
from rlft.errors import Interrupted, RlftError, raise_interrupted
from rlft.multirun import clear_failure, record_failure

register_configs()


def distributed_env_from_slurm() -> None:
    """Under Hydra's submitit launcher with several tasks per job (one per GPU), export the
    torch.distributed variables that accelerate reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) from SLURM's, unless a launcher (accelerate launch, torchrun) has set them."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export()


# file-system conditions a user fixes (permissions, read-only mounts, full disks, a path under a file)
USER_FS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def _last_checkpoint_line(run_dir: Path) -> str:
    from rlft.checkpoint import complete_checkpoints

    done = complete_checkpoints(run_dir)
    if not done:
        return f"no checkpoint was written yet in {run_dir}"
    return f"the last checkpoint is {done[-1]}; run the same command to resume from it"


def _keep_in_console_log(run_dir: Path, line: str) -> None:
    """The run's last line in its console.log too, where the directory can take it (a full disk,
    a read-only one: the line is on stderr anyway)."""
    from rlft.loggers import append_console

    try:
        if run_dir.is_dir():
            append_console(run_dir, line)
    except OSError:
        pass


def _one_line(exc: Exception, run_dir: Path) -> tuple[str | None, int]:
    """The one-line message and exit code for an error a user can fix; (None, 1) for a crash."""
    if isinstance(exc, RlftError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError) and exc.errno in USER_FS_ERRORS:
        where = exc.filename or run_dir
        return f"{where}: {exc.strerror} (paths.output_root must be a writable directory with free space)", 2
    return None, 1


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Validate the config, then run; returns the last evaluation reward (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupted)
    if multirun:
        clear_failure(run_dir)
    try:
        validate(cfg)
        from rlft.preflight import preflight

        note = preflight(cfg)  # every file the run needs, before any weights load
        if note:
            print(f"rlft: {note}")
        distributed_env_from_slurm()
        from rlft.models import quiet_libraries
        from rlft.runner import Runner

        quiet_libraries()

        metrics = Runner(cfg, run_dir).run()
    except Interrupted as exc:
        print(f"rlft: stopped by {exc}; {_last_checkpoint_line(run_dir)}", file=sys.stderr)
        _keep_in_console_log(run_dir, f"rlft: stopped by {exc}")
        sys.exit(128 + exc.signum)
    except Exception as exc:  # noqa: BLE001 - each kind gets its one line below; others re-raise
        line, code = _one_line(exc, run_dir)
        if line is None and not multirun:
            raise
        if line is None:  # a crash inside a multirun: keep its traceback, run the next job
            line = f"crashed with {type(exc).__name__}: {exc} (traceback in {run_dir / 'error.log'})"
        print(f"rlft: error: {line}", file=sys.stderr)
        _keep_in_console_log(run_dir, f"rlft: error: {line}")
        if multirun:
            record_failure(run_dir, line, traceback.format_exc())
            return float("nan")  # a sweeper's failed trial (Optuna marks NaN as failed)
        sys.exit(code)
    return metrics.get("eval/reward/mean", metrics.get("reward/mean"))


def cli() -> None:
    """`python -m rlft` and the `rlft` command: the command line as rlft/presets.py reads it, then Hydra."""
    from rlft.presets import follow_the_reward

    sys.argv[1:], note = follow_the_reward(sys.argv[1:])
    if note:
        print(f"rlft: {note}")
    main()


if __name__ == "__main__":
    cli()
