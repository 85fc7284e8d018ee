"""Torch intra-op threads for the test suite: one vs two, side by side in one process (not a test).

    python benchmarks/bench_test_threads.py [--repeats 3]

The work is what the suite's heavier tests do: train the digits CNN for 2 epochs on 800 images
and run PGD-10 on 64 test images. Runs alternate between 1 and 2 threads; each setting's time is
the best of ``--repeats``. tests/conftest.py uses 1 thread (BENCH_TEST_THREADS overrides) because
on a shared 2-core machine two threads per process spin against each other: measured at load
average 20 on 2 cores, 3.0 s with one thread and 32.7 s with two (10.9x; this script, --repeats 2).
Run it on the machine in question: on an idle one the two settings are close.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)  # foolbox imports scipy.ndimage.filters

from bench.attacks.pgd import LinfPGD, PGDParams  # noqa: E402
from bench.datasets.digits import load_digits  # noqa: E402
from bench.defenses.baseline import Baseline  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.training import TrainConfig  # noqa: E402


def work(data) -> None:
    torch.manual_seed(0)
    defense = Baseline(build_model("digits-cnn", data.shape, 10, data.mean, data.std))
    defense.fit(data.x_train[:800], data.y_train[:800], TrainConfig(epochs=2, seed=0))
    LinfPGD(PGDParams(steps=10, restarts=1)).run(defense.attack_model().eval(), data.x_test[:64], data.y_test[:64], [0.1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = load_digits()
    work(data)  # warm-up: first-call allocations and kernel selection
    best = {1: float("inf"), 2: float("inf")}
    for _ in range(args.repeats):
        for threads in best:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            work(data)
            best[threads] = min(best[threads], time.perf_counter() - start)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for threads, seconds in best.items():
        print(f"{threads} thread(s): {seconds:.2f} s")
    print(f"two threads / one thread: {best[2] / best[1]:.2f}x")


if __name__ == "__main__":
    main()
