"""Run `python -m <module> ...` command lines at the cost of one start-up (the tests' warm start).

    python -m tests.cli_server       # started by tests/conftest.py, one per test process

This process imports rlft and its libraries once and computes nothing (no thread pool is started
before a fork). It then reads one case a line on stdin, {"module", "args", "limit"}, runs it in a
forked child as `python -m <module> <args>` runs (the module executed as __main__, the same exit
status rules, and at the end what the interpreter does: non-daemon threads joined, the atexit
handlers that the run registered run, logging flushed), with the child's stdout and stderr in
files, and answers one line on its stdout: {"code", "stdout", "stderr"}; a case that outlives its
limit is killed and gets code "timeout". Whatever the imports wrote to stderr starts every case's
stderr, as it would in a fresh interpreter. It exits when its stdin closes.

Unlike fresh interpreters, the children share the server's hash seed and the state its imports
left (NumPy's global generator included), and the exit handlers that a library registered at
import do not run (they would clean up the server's state for every later child). A difference
that only a new hash seed would show is not seen between two children; the tests that start
fresh processes (launchers, runs with variables of their own, the kill tests) still see it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import runpy
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path


def _child(module: str, args: list[str], out: str, err: str, answers: int) -> None:
    """Become `python -m <module> <args>`: never returns."""
    code = 1
    try:
        os.close(answers)  # the server's channel is not the run's
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, name in ((1, out), (2, err)):
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        # the exit handlers the imports registered clean up the server's state, which every child shares
        # (wandb makes a temporary directory at import and registers its removal): a child runs only the
        # handlers and weakref finalizers its run registers, and flushes logging (whose handler is the
        # imports') as the interpreter would
        atexit._clear()
        for info in weakref.finalize._registry.values():
            info.atexit = False
        weakref.finalize._registered_with_atexit = False
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:  # as the interpreter treats it
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught exception: the interpreter prints its traceback
        sys.excepthook(*sys.exc_info())
    finally:
        try:  # what the interpreter does at exit: wait for non-daemon threads, then the atexit handlers
            threading._shutdown()
            atexit._run_exitfuncs()
            logging.shutdown()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def run_case(case: dict, scratch: Path, preamble: str, answers: int, number: int) -> dict:
    """One case in a forked child, its output in files of its own (read, then removed)."""
    out, err = scratch / f"{number}.stdout", scratch / f"{number}.stderr"
    pid = os.fork()
    if pid == 0:
        _child(case["module"], case["args"], str(out), str(err), answers)
    deadline = time.monotonic() + float(case["limit"])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
            break
        time.sleep(0.02)
    code = "timeout" if status is None else os.waitstatus_to_exitcode(status)
    read = lambda path: path.read_text(errors="replace") if path.is_file() else ""  # noqa: E731
    result = {"code": code, "stdout": read(out), "stderr": preamble + read(err)}
    out.unlink(missing_ok=True)
    err.unlink(missing_ok=True)
    return result


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the answers' channel; fd 1 is stderr from here on
    os.dup2(2, 1)
    # a plain directory, not a TemporaryDirectory (whose clean-up is registered to run at exit)
    scratch = Path(tempfile.mkdtemp(prefix="rlft_cli_server_"))
    try:
        # the libraries a run imports, loaded once (importing starts no threads); what they write to
        # stderr is kept for every case
        saved = os.dup(2)
        target = os.open(scratch / "imports.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, 2)
        try:
            import accelerate  # noqa: F401
            import diffusers  # noqa: F401
            import open_clip  # noqa: F401
            import transformers  # noqa: F401

            import rlft.runner  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            os.close(target)
        preamble = (scratch / "imports.err").read_text(errors="replace")
        answers.write(json.dumps({"ready": True}) + "\n")
        answers.flush()
        for number, line in enumerate(sys.stdin):
            answers.write(json.dumps(run_case(json.loads(line), scratch, preamble, answers.fileno(), number)) + "\n")
            answers.flush()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
