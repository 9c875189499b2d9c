"""Run many `python -m rlft ...` command lines at the cost of one start-up.

    python -m tests.cli_batch cases.json results.json

cases.json is a list of {"args": [...], "env": {...}}. This process imports rlft and its libraries
once and computes nothing (no thread pool is started before a fork); each case then runs in a forked
child exactly as `python -m rlft <args>` runs (rlft/__main__.py executed as __main__, the same exit
status rules), with its stdout and stderr in files. results.json gets, per case, {"code", "stdout",
"stderr"}; a case that outlives its limit is killed and gets code "timeout".
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path


def _child(args: list[str], env: dict, out: str, err: str) -> None:
    """Become `python -m rlft <args>`: never returns."""
    code = 1
    try:
        os.environ.update(env)
        for fd, name in ((1, out), (2, err)):
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["rlft", *args]
        runpy.run_module("rlft", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:  # as the interpreter treats it
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught exception: the interpreter prints its traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_case(case: dict, limit: float, scratch: Path) -> dict:
    out, err = scratch / "stdout", scratch / "stderr"
    pid = os.fork()
    if pid == 0:
        _child(case["args"], case.get("env", {}), str(out), str(err))
    deadline = time.time() + limit
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.02)
    code = "timeout" if status is None else os.waitstatus_to_exitcode(status)
    return {"code": code, "stdout": out.read_text(errors="replace"), "stderr": err.read_text(errors="replace")}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    limit = float(os.environ.get("RLFT_CASE_LIMIT_S", "600"))
    # the libraries a run imports, loaded once; importing starts no threads
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import open_clip  # noqa: F401
    import transformers  # noqa: F401

    import rlft.runner  # noqa: F401

    with tempfile.TemporaryDirectory() as scratch:
        results = [run_case(case, limit, Path(scratch)) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
