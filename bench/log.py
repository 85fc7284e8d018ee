"""Log lines on stderr, one per event and flushed at once, so a run can be followed in a terminal,
a file, a CI log or a notebook; stdout is left to tables and other results.

Everything the harness says goes through the ``bench`` logger of the standard ``logging`` module:
``configure(verbosity)`` is what the CLI's ``--quiet`` (-1) and ``-v`` (1) set, and a notebook
user may call it too (or attach their own handler to ``logging.getLogger("bench")``).
"""
from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("bench")
QUIET, NORMAL, VERBOSE = -1, 0, 1
_LEVELS = {QUIET: logging.WARNING, NORMAL: logging.INFO, VERBOSE: logging.DEBUG}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest and notebooks replace it), through
    ``tqdm.write`` so that a line never lands in the middle of a progress bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def configure(verbosity: int = NORMAL) -> None:
    """Show the harness's messages on stderr: warnings only (-1), progress (0) or details (1+)."""
    LOGGER.setLevel(_LEVELS[max(QUIET, min(VERBOSE, verbosity))])
    if not any(isinstance(h, StderrHandler) for h in LOGGER.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        LOGGER.addHandler(handler)
    LOGGER.propagate = False


def verbosity() -> int:
    level = LOGGER.getEffectiveLevel()
    return QUIET if level > logging.INFO else VERBOSE if level < logging.INFO else NORMAL
