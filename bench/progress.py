"""Progress that stays readable everywhere: a tqdm bar (a widget in notebooks) when stderr is a
terminal or a notebook, plain log lines otherwise (files, CI logs), nothing with ``--quiet``.

Plain lines are rate-limited: one ``INFO`` line at most every ``every`` seconds (and the last
one), every update at ``DEBUG`` (``-v``). A step whose units are long (one attack chunk, one
epoch) would still be silent between two updates: while any progress is open, a heartbeat says
every ``HEARTBEAT`` seconds without a line that the work goes on, how far the outermost and the
innermost loop are, and for how long (on a terminal it redraws the bar, whose clock then moves).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Any, Iterable, Iterator, TypeVar

from bench.log import LOGGER, QUIET as QUIET_LEVEL, verbosity

T = TypeVar("T")
# Set by code that must never draw bars (worker processes, whose stderr is not the user's).
QUIET = False
# Progress inside progress (the attack inside Madry's training epochs) stays at DEBUG, with no bar.
_open = 0
# Seconds without a progress line after which the heartbeat writes one.
HEARTBEAT = 30.0
_stack: list["Progress"] = []  # the open progress, outermost first
_last_line = time.monotonic()  # when a progress line was last written
_beating: threading.Thread | None = None


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
        _stack.append(self)
        _start_heartbeat()

    def status(self) -> str:
        done = f"{self.done}/{self.total}" if self.total else str(self.done)
        return f"{self.desc} {done} {self.unit}"

    def update(self, n: int = 1, **figures: Any) -> None:
        global _last_line
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
            self.last = _last_line = now
            LOGGER.info(line)
        else:
            LOGGER.debug(line)

    def close(self) -> None:
        global _open
        if not getattr(self, "closed", False):
            self.closed = True
            _open -= 1
            if self in _stack:
                _stack.remove(self)
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


def heartbeat() -> None:
    """One beat: where no progress line came for ``HEARTBEAT`` seconds, a line (a redrawn bar on a
    terminal) saying that the open work goes on, how far it is and since when."""
    global _last_line
    open_now = list(_stack)
    if not open_now or QUIET or verbosity() == QUIET_LEVEL:
        return
    now = time.monotonic()
    outer, inner = open_now[0], open_now[-1]
    if outer.bar is not None:
        outer.bar.refresh()
        return
    if now - _last_line < HEARTBEAT:
        return
    _last_line = now
    inside = f"; now in {inner.status()}" if inner is not outer else ""
    LOGGER.info(f"{outer.desc}: still working after {now - outer.started:.0f} s, {outer.status()}{inside}")


def _start_heartbeat() -> None:
    global _beating
    if _beating is None or not _beating.is_alive():
        def beat() -> None:
            while True:
                time.sleep(max(0.05, min(HEARTBEAT / 5, 1.0)))
                heartbeat()

        _beating = threading.Thread(target=beat, name="bench-progress-heartbeat", daemon=True)
        _beating.start()
