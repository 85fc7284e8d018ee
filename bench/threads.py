"""How many torch threads each process of the harness uses: one rule for ``bench run``,
``bench eval``, ``bench perf`` and the library's ``bench.evaluate``/``bench.train``.

torch's own default is one thread per core in every process. Processes sharing cores then spin
against each other: on a 2-core machine at load 8-16, one thread per process was 10-30x faster
than two. The rule (``default_threads``):

- ``OMP_NUM_THREADS``, when set to a positive integer, is the user's choice and wins;
- otherwise the cores not already busy (``os.cpu_count()`` minus the 1-minute load average,
  rounded down, at least 1) are shared among the ``jobs`` processes of the command, at most
  ``MAX_THREADS`` each (small models gain little from more), at least 1.

``--threads N`` (or ``threads=N`` in the library) overrides the rule. Free of torch until a count
is applied, so that computing it costs nothing.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

MAX_THREADS = 4
# What a process started from this one (a worker, its fork server) reads when it loads torch.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _user_choice() -> int | None:
    text = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def default_threads(jobs: int = 1) -> int:
    """Torch threads per process for a command running ``jobs`` processes at once (see the module)."""
    chosen = _user_choice()
    if chosen is not None:
        return chosen
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system
        busy = 0.0
    idle = max(1, int(cores - busy))
    return max(1, min(MAX_THREADS, idle // max(1, jobs)))


def export_threads(threads: int) -> None:
    """Processes started from this one (workers, their fork server) load torch with ``threads``
    threads: ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``. Imports nothing."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


def set_threads(threads: int) -> None:
    """Use ``threads`` torch threads in this process, and in the processes it starts."""
    import torch

    export_threads(threads)
    torch.set_num_threads(threads)


@contextmanager
def using_threads(threads: int | None) -> Iterator[int]:
    """``threads`` torch threads (``None``: ``default_threads()``) while the block runs; this
    process's previous count afterwards (a library call leaves its caller's setting as it was)."""
    import torch

    chosen = threads if threads is not None else default_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(previous)
