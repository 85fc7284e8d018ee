"""Progress that stays readable everywhere: a tqdm bar (a widget in notebooks) when stderr is a
terminal or a notebook, plain log lines otherwise (files, CI logs), nothing with ``--quiet``.

Plain lines are rate-limited: one ``INFO`` line at most every ``every`` seconds (and the last
one), every update at ``DEBUG`` (``-v``).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from bench.log import LOGGER, QUIET as QUIET_LEVEL, verbosity

T = TypeVar("T")
# Set by code that must never draw bars (worker processes, whose stderr is not the user's).
QUIET = False
# Progress inside progress (the attack inside Madry's training epochs) stays at DEBUG, with no bar.
_open = 0


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    try:
        return type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:
        return False


def bars_enabled() -> bool:
    if QUIET or verbosity() == QUIET_LEVEL:
        return False
    return sys.stderr.isatty() or in_notebook()


class Progress:
    """``update(n, **figures)`` after each unit of work; a bar or throttled log lines."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every: float = 10.0, leave: bool = False):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        global _open
        self.nested = _open > 0
        _open += 1
        if bars_enabled() and not self.nested:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **figures: Any) -> None:
        self.done += n
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()}
        if self.bar is not None:
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
            return
        if QUIET:
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        line = f"{self.desc}: {self.done}{'/' + str(self.total) if self.total else ''} {self.unit}"
        if shown:
            line += " (" + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")"
        if self.total and 0 < self.done < self.total:
            left = (now - self.started) / self.done * (self.total - self.done)
            line += f", about {left:.0f} s left"
        # The last update of anything that took a while is worth a line; of a quick loop it is not.
        if not self.nested and (now - self.last >= self.every or (finished and now - self.started >= 1.0)):
            self.last = now
            LOGGER.info(line)
        else:
            LOGGER.debug(line)

    def close(self) -> None:
        global _open
        if not getattr(self, "closed", False):
            self.closed = True
            _open -= 1
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items``, reporting progress as they are consumed."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()
