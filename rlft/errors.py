"""Errors that teach.

Every mistake a user can make in a config or an input file ends in one
:class:`RlftError` whose message says what is wrong and what to set. The
command-line entry point prints it as a single line and exits non-zero,
without a stack trace.
"""

from __future__ import annotations

import signal


class RlftError(Exception):
    """A problem with the user's config or inputs (exit code 2)."""

    exit_code = 2


class ConfigError(RlftError):
    """A config value that cannot work: names the key and what to set."""

    def __init__(self, key: str, problem: str, fix: str | None = None):
        self.key, self.problem, self.fix = key, problem, fix
        message = f"{key}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)

    def moved(self, old_prefix: str, new_prefix: str) -> ConfigError:
        """The same error for a component that lives under another key (``dataset`` -> ``eval_datasets.x``)."""
        fix = self.fix.replace(f"{old_prefix}.", f"{new_prefix}.") if self.fix else None
        return ConfigError(new_prefix + self.key[len(old_prefix) :], self.problem, fix)


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (Ctrl-C, a scheduler's preemption).

    A BaseException, as KeyboardInterrupt is: the signal handler raises it wherever the main
    thread happens to be, and a library's `except Exception` there (OmegaConf wraps what it
    catches in its own error, re-made from the message) must let it through untouched."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_received: list[int] = []  # the signals that arrived, in order


def raise_interrupted(signum, frame=None):
    """The signal handler of `python -m rlft`: remember the signal, then raise where the program is."""
    _received.append(signum)
    raise Interrupted(signum)


def check_interrupted() -> None:
    """A safe point (each denoiser call while sampling and training): a signal whose exception was
    swallowed where it landed (a finalizer prints "Exception ignored in ..." and goes on) ends the run
    here instead."""
    if _received:
        raise Interrupted(_received[0])


class RewardError(RlftError):
    """A reward returned non-finite scores; the run stopped after saving its state."""

    exit_code = 3


# hub repositories that public code reports as moved, with where to: a message about one that cannot
# be fetched names the other
MOVED_REPOS = {
    "yuvalkirstain/PickScore_v1": "pickapic-anonymous/PickScore_v1",
    "yuvalkirstain/pickapic_v1": "pickapic-anonymous/pickapic_v1",
    "yuvalkirstain/pickapic_v1_no_images": "pickapic-anonymous/pickapic_v1",
}


def moved_hint(repo: str, key: str) -> str:
    """'' or the clause that names a moved repository's new id and the key to set."""
    new = MOVED_REPOS.get(repo)
    return f"; '{repo}' is reported moved to '{new}': set {key}={new}" if new else ""
