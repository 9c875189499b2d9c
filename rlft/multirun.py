"""A multirun keeps going past a job that fails, and ends non-zero with the list of failed jobs.

In a multirun, ``python -m rlft`` does not exit on a job's error: it prints the one-line reason,
writes it to ``<job dir>/FAILED`` (a crash also leaves its traceback in ``<job dir>/error.log``)
and returns, so Hydra starts the next job. ``FailedJobs`` (a Hydra callback, conf/config.yaml)
lists the failed jobs when the multirun ends and exits with code 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

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
