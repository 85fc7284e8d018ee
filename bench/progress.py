"""Progress that stays readable everywhere, and a heartbeat so that no long step is silent.

- Terminal or notebook (stderr): a tqdm bar per open loop (a widget in notebooks); a nested loop
  shows its bar once it has run ``BAR_DELAY`` seconds, so quick inner loops never draw one. The
  bars are redrawn every second, so their clocks move during a long unit of work.
- Elsewhere (a file, a pipe, a CI log): plain log lines. A loop logs one ``INFO`` line (count,
  figures, estimated time left) at most every ``EVERY`` seconds, and a last line when it took a
  while; every update is logged at ``DEBUG`` (``-v``).
- The heartbeat: while a loop or a ``step`` is open and no progress line has been logged for
  ``HEARTBEAT`` seconds, a background thread logs one line naming every open level (the innermost
  with its count, what it is doing now and its estimated time left). A step whose inner work is
  one long call (an AutoAttack stage, a Square run) therefore still says so every ``HEARTBEAT``.
- ``--quiet`` (warnings only) shows nothing. ``QUIET`` (set in worker processes, whose stderr is not
  the user's terminal) draws no bars and logs no loop lines; the heartbeat still logs its line, so
  a long job in a worker is not silent either.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TypeVar

from bench.log import LOGGER, QUIET as QUIET_LEVEL, verbosity

T = TypeVar("T")
# Set by code that must never draw bars or log loop lines (worker processes); heartbeats remain.
QUIET = False
EVERY = 10.0  # seconds between two plain lines of one loop
HEARTBEAT = 20.0  # seconds without a progress line after which the heartbeat logs what is running
BAR_DELAY = 1.0  # seconds a nested loop runs before its bar appears

_open: list["Progress"] = []  # the open loops and steps, outermost first
_lock = threading.Lock()
_said = time.monotonic()  # when the last progress line was logged
_beat: threading.Thread | None = None


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


def _say(line: str) -> None:
    global _said
    _said = time.monotonic()
    LOGGER.info(line)


class Progress:
    """One loop (or, with ``total=None`` and ``bar=False``, one named step): call ``update(n,
    **figures)`` after each unit of work and ``doing(text)`` before a long one; a bar or throttled
    log lines, and the heartbeat while it is open. ``every`` overrides ``EVERY`` for this loop;
    ``debug=False`` keeps its updates out of the ``-v`` log (loops with thousands of units)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every: float | None = None,
                 leave: bool = False, bar: bool = True, debug: bool = True):
        self.total, self.desc, self.unit, self.debug = total, desc, unit, debug
        self.every = EVERY if every is None else every
        self.done = 0
        self.figures: dict[str, Any] = {}
        self.now = ""
        self.spoke = False
        self.started = self.last = time.monotonic()
        self.nested = bool(_open)
        self.bar = None
        if bar and bars_enabled():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr,
                            delay=BAR_DELAY if self.nested else 0)
        global _said
        with _lock:
            if not _open:  # silence is counted from the start of the outermost level
                _said = self.started
            _open.append(self)
        _start_heartbeat()

    def doing(self, text: str) -> None:
        """Say what the loop is doing now (shown by the heartbeat and the bar until the next update)."""
        self.now = text
        if self.bar is not None:
            self.bar.set_postfix_str(f"now {text}", refresh=False)

    def status(self) -> str:
        """``desc: done/total unit (figures, now ...), about N s left``; a step without a count says how long it has run."""
        now = time.monotonic()
        if self.total is None and self.done == 0:
            return f"{self.desc}: running for {now - self.started:.0f} s" + (f", now {self.now}" if self.now else "")
        line = f"{self.desc}: {self.done}{'/' + str(self.total) if self.total else ''} {self.unit}"
        shown = [f"{k} {f'{v:.4g}' if isinstance(v, float) else v}" for k, v in self.figures.items()]
        if self.now:
            shown.append(f"now {self.now}")
        if shown:
            line += " (" + ", ".join(shown) + ")"
        if self.total and 0 < self.done < self.total:
            line += f", about {(now - self.started) / self.done * (self.total - self.done):.0f} s left"
        elif self.done == 0:
            line += f", {now - self.started:.0f} s so far"
        return line

    def update(self, n: int = 1, **figures: Any) -> None:
        self.done += n
        self.figures = figures
        self.now = ""
        if self.bar is not None:
            if figures:
                self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()},
                                     refresh=False)
            else:
                self.bar.set_postfix_str("", refresh=False)
            self.bar.update(n)
            return
        if QUIET:
            return
        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        # The last update of anything that took a while is worth a line; of a quick loop it is not.
        if now - self.last >= self.every or (finished and (self.spoke or (not self.nested and now - self.started >= 1.0))):
            self.last, self.spoke = now, True
            _say(self.status())
        elif self.debug:
            LOGGER.debug(self.status())

    def close(self) -> None:
        with _lock:
            if self in _open:
                _open.remove(self)
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


@contextlib.contextmanager
def step(name: str) -> Iterator[Progress]:
    """A named step (no bar, no count): the heartbeat names it while it runs."""
    with Progress(None, name, unit="", bar=False) as level:
        yield level


def heartbeat_line() -> str | None:
    """What the heartbeat says now: every open level, outermost first, or None when none is open."""
    with _lock:
        levels = list(_open)
    if not levels:
        return None
    now = time.monotonic()
    outer = [f"{p.desc} {p.done}/{p.total} {p.unit}" if p.total else f"{p.desc} ({now - p.started:.0f} s)"
             for p in levels[:-1]]
    return "still running: " + " > ".join(outer + [levels[-1].status()])


def _heartbeat() -> None:
    """Redraw open bars every second; without bars, log ``heartbeat_line`` after ``HEARTBEAT`` s of silence."""
    while True:
        time.sleep(min(1.0, HEARTBEAT / 4))
        with _lock:
            levels = list(_open)
        now = time.monotonic()
        bars = [p.bar for p in levels if p.bar is not None]
        for p in levels:
            if p.bar is not None and (not p.nested or now - p.started >= BAR_DELAY):
                with contextlib.suppress(Exception):
                    p.bar.refresh()
        if levels and not bars and now - _said >= HEARTBEAT:
            line = heartbeat_line()
            if line is not None:
                _say(line)


def _start_heartbeat() -> None:
    global _beat
    with _lock:
        if _beat is None or not _beat.is_alive():
            _beat = threading.Thread(target=_heartbeat, daemon=True, name="bench-heartbeat")
            _beat.start()
