"""The tests' warm start (tests/cli_server.py): a forked run ends as a fresh interpreter's would,
and what one run's exit cleans up cannot break the next."""

from __future__ import annotations

import sys

from tests.conftest import run_process


def test_a_run_ends_like_a_fresh_process_and_leaves_the_next_one_working(cache_dir, tmp_path):
    """Two runs of tests/exit_probe.py: each finds the temporary directory that wandb made (and
    registered for removal at exit) when the server imported it, each run's own exit handler runs,
    its log file is flushed, and its stdout comes back."""
    for name in ("first", "second"):
        out = tmp_path / name
        out.mkdir()
        result = run_process([sys.executable, "-m", "tests.exit_probe", str(out)], cache_dir, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == "done\n"
        assert (out / "exit_handler_ran").read_text() == "yes"
        assert (out / "log.txt").read_text() == "logged\n"
