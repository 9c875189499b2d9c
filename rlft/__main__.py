"""`python -m rlft [overrides]`: the Hydra entry point.

Config mistakes (unknown option, unknown key, wrong type, values that cannot
work, missing files) end in one line on stderr and a non-zero exit code,
never a stack trace. Hydra itself reports composition errors the same way.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlft.config import register_configs, validate
from rlft.errors import RlftError

register_configs()


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Validate the config, then run; returns the last evaluation reward (for sweepers)."""
    try:
        validate(cfg)
        distributed_env_from_slurm()
        _quiet_libraries()
        from rlft.runner import Runner

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        metrics = Runner(cfg, run_dir).run()
    except RlftError as exc:
        print(f"rlft: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    return metrics.get("eval/reward/mean", metrics.get("reward/mean"))


if __name__ == "__main__":
    main()
