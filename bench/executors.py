"""Where a grid's jobs run: in this process, on local worker processes, or on a Dask cluster.

Kept apart from :mod:`bench.jobs` and free of torch, so that ``bench run`` starts its workers
(or their fork server) before it imports torch itself: their start-up overlaps its own.

An executor has ``run(jobs)``, which yields each job's result as it finishes, and ``close()``
for when the grid is done (or was interrupted). ``Serial`` runs the jobs here; ``LocalProcesses`` (``--jobs N``) on joblib's loky backend;
``DaskCluster`` (``--scheduler``) on joblib's dask backend over a ``distributed.Client``. joblib
drives both parallel executors, so local and cluster runs go through one code path and return
results as they finish (``return_as="generator_unordered"``); Dask places the work and retries a
job whose worker died on another worker.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any, Callable, Iterable, Iterator

from bench.errors import BenchError
from bench.log import LOGGER


# What every job imports (torch._dynamo comes with the first optimizer, over a second; foolbox
# with the first attack): a worker imports them as it starts, not in its first job.
WORKER_MODULES = ("bench.runner", "torch._dynamo", "foolbox")
_started = False


def start_worker(driver_pid: int) -> int:
    """A local worker's start-up: the imports every job needs, and a watch on the driver."""
    global _started
    if not _started:
        _started = True
        import importlib

        for module in WORKER_MODULES:
            importlib.import_module(module)
        _exit_with(driver_pid)
    return os.getpid()


def _exit_with(driver_pid: int) -> None:
    """A local worker outlives a driver killed with ``kill -9`` (loky's idle workers wait on
    their queue, and a fork server lives as long as its workers): leave when the driver is gone.
    (Its parent is the driver, or the fork server.)"""
    parent = os.getppid()

    def driver_alive() -> bool:
        try:
            os.kill(driver_pid, 0)  # signal 0: only asks whether the process exists (as ours)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def watch() -> None:
        while os.getppid() == parent and driver_alive():
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="bench-driver-watch").start()


class Serial:
    """Jobs one after another in this process (the default)."""

    name = "serial"
    threads: int | None = None

    def run(self, jobs: list, work: Callable[[Any], Any]) -> Iterator[Any]:
        for job in jobs:
            yield work(job)

    def close(self) -> None:
        pass


class LocalProcesses:
    """``--jobs N``: joblib's loky backend, N worker processes on this machine.

    A worker's start-up (a fresh Python importing torch and the harness, ``WORKER_MODULES``)
    takes seconds; ``start`` begins it at once, so that it overlaps the driver's own work
    (loading the datasets, planning the grid) instead of coming after it.

    ``fork_server=True`` starts the workers with Python's ``forkserver`` method (the default on
    Linux from Python 3.14): one server process imports ``WORKER_MODULES`` once and forks every
    worker from it, so N workers cost one start-up, not N (the README's ``bench perf`` grid row
    has the ratios). Like ``spawn``, it imports the main module again in each worker, so a script
    must keep its top-level work under ``if __name__ == "__main__":``; the ``bench`` command does,
    and turns it on. Off by default: loky's own start method has no such rule.
    """

    def __init__(self, workers: int, threads: int = 1, fork_server: bool = False):
        self.workers, self.threads, self.fork_server = workers, threads, fork_server
        self.name = f"{workers} local worker processes"
        self._starting: Iterator | None = None
        self.started: list[int] = []  # process ids of the workers that ran a start-up (loky's method)

    def _parallel(self, workers: int):
        import joblib

        return joblib.parallel_config(backend="loky", inner_max_num_threads=self.threads), joblib.Parallel(
            n_jobs=workers, return_as="generator_unordered", pre_dispatch="all")

    def _call(self, calls: Iterable, workers: int) -> Iterator:
        """joblib's delayed ``calls`` on a pool of ``workers`` (started here with the chosen method)."""
        from joblib.externals.loky.backend import context

        config, parallel = self._parallel(workers)
        previous = context.get_start_method()
        if self.fork_server:
            # loky reads its start method when it creates the pool: set it for this pool only
            context.set_start_method("forkserver", force=True)
        try:
            with config:
                return parallel(calls)
        finally:
            context.set_start_method(previous, force=True)

    def start(self) -> None:
        """Start the workers in the background: each imports what every job needs."""
        if self.fork_server:
            import multiprocessing
            from multiprocessing import forkserver

            multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_MODULES))
            # The server is a new `python -c`, whose sys.path begins with the working directory
            # (Python 3.11's forkserver ignores the driver's sys.path): a checkout's bench/ there
            # would shadow the installed package. PYTHONSAFEPATH leaves that directory out.
            previous = os.environ.get("PYTHONSAFEPATH")
            os.environ["PYTHONSAFEPATH"] = "1"
            try:
                # The server imports in the background; the workers fork from it when the jobs
                # come. (Forking them here would wait for those imports.)
                forkserver.ensure_running()
            finally:
                if previous is None:
                    del os.environ["PYTHONSAFEPATH"]
                else:
                    os.environ["PYTHONSAFEPATH"] = previous
        else:
            import joblib

            self._starting = self._call((joblib.delayed(start_worker)(os.getpid()) for _ in range(self.workers)),
                                        self.workers)

    def run(self, jobs: list, work: Callable[[Any], Any]) -> Iterator[Any]:
        import joblib

        if self._starting is not None:
            starting, self._starting = self._starting, None
            self.started = sorted(set(starting))  # joblib runs one call on the pool at a time
            LOGGER.debug(f"workers started: process ids {self.started}")
        for job in jobs:
            job.driver_pid = os.getpid()
        # No more workers than jobs: a wave of 3 jobs under --jobs 16 forks 3 processes, not 16. At
        # least 2: joblib runs n_jobs=1 in this process, where a job would set the driver's threads.
        yield from self._call((joblib.delayed(work)(job) for job in jobs), min(self.workers, max(2, len(jobs))))

    def close(self) -> None:
        """Stop the workers: all results are in (or the grid was interrupted), and idle workers
        that tear torch down one by one would hold the command's exit for a second."""
        if self._starting is not None:
            starting, self._starting = self._starting, None
            with warnings.catch_warnings():
                # joblib's UserWarning says how many start-ups were unused or cancelled: nothing to report
                warnings.simplefilter("ignore", UserWarning)
                starting.close()
        from joblib.externals.loky import reusable_executor

        pool = reusable_executor._executor  # the pool joblib's loky backend keeps between calls
        if pool is not None:
            pool.shutdown(wait=False, kill_workers=True)


class DaskCluster:
    """``--scheduler ADDRESS``: joblib's dask backend on a Dask distributed cluster."""

    def __init__(self, address: str, threads: int = 1):
        try:
            from distributed import Client
        except ImportError:
            raise BenchError("--scheduler needs Dask: pip install -e '.[dask]' in a clone of the harness (on every machine)") from None
        try:
            self.client = Client(address, timeout="10s")
        except ValueError as error:
            raise BenchError(f"--scheduler {address!r} is not a scheduler address ({error}); expected e.g. "
                             "tcp://HOST:8786") from None
        except (OSError, TimeoutError) as error:
            raise BenchError(f"cannot reach the Dask scheduler at {address} ({error}); start one with "
                             "'dask scheduler' and workers with 'dask worker ADDRESS'") from None
        self.threads = threads
        self.name = f"Dask cluster at {address}"

    def run(self, jobs: list, work: Callable[[Any], Any]) -> Iterator[Any]:
        import joblib

        with joblib.parallel_config(backend="dask", wait_for_workers_timeout=60):
            parallel = joblib.Parallel(n_jobs=-1, return_as="generator_unordered", pre_dispatch="all")
            yield from parallel(joblib.delayed(work)(job) for job in jobs)

    def close(self) -> None:
        self.client.close()
