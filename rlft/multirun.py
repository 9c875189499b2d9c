"""Hydra callbacks (conf/config.yaml): the run directory checked before Hydra writes to it, and a
multirun that keeps going past a job that fails and ends non-zero with the list of failed jobs.

``RunDirectory``: Hydra creates the run (or sweep) directory and writes its config and log file
there before ``main`` runs, so a directory under a file, or on a read-only file system, is
reported here in one line, before Hydra touches it.

In a multirun, ``python -m rlft`` does not exit on a job's error: it prints the one-line reason,
writes it to ``<job dir>/FAILED`` (a crash also leaves its traceback in ``<job dir>/error.log``)
and returns, so Hydra starts the next job. ``FailedJobs`` lists the failed jobs when the multirun
ends and exits with code 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

FAILED_FILE = "FAILED"


def record_failure(job_dir: Path, reason: str, traceback_text: str | None = None) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / FAILED_FILE).write_text(reason + "\n")
    if traceback_text:
        (job_dir / "error.log").write_text(traceback_text)


def clear_failure(job_dir: Path) -> None:
    (job_dir / FAILED_FILE).unlink(missing_ok=True)


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """(job directory name, reason) of every failed job under ``sweep_dir``."""
    return [(p.parent.name, p.read_text().strip()) for p in sorted(Path(sweep_dir).glob(f"*/{FAILED_FILE}"))]


class FailedJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = failed_jobs(sweep_dir)
        if not failed:
            return
        print(f"rlft: {len(failed)} job(s) of the multirun in {sweep_dir} failed:", file=sys.stderr)
        for name, reason in failed:
            print(f"  {name}: {reason}", file=sys.stderr)
        sys.exit(1)


def directory_problem(path: Path) -> str | None:
    """Why ``path`` cannot become (or be) a writable directory, or None."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class RunDirectory(Callback):
    def _check(self, config: DictConfig, key: str) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # the directory's ${hydra:...} parts resolve against it
        problem = directory_problem(Path(str(OmegaConf.select(config, key))))
        if problem:
            print(
                f"rlft: error: paths.output_root: {problem} (set paths.output_root to a writable directory, "
                "or another run_name=...)",
                file=sys.stderr,
            )
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
