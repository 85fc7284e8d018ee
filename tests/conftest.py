from __future__ import annotations

import os

import pytest
import torch

from bench.cli import main

# One intra-op thread per test process (and for the processes tests start): on a 2-core machine
# shared with other jobs, two threads per process spin against each other. Measured by
# `python benchmarks/bench_test_threads.py` (digits-cnn 2 epochs on 800 images + PGD-10 on 64):
# 3.0 s with one thread, 32.7 s with two at load average 20 on 2 cores. BENCH_TEST_THREADS=N overrides.
TEST_THREADS = int(os.environ.get("BENCH_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)

# Tiny settings that train the digits CNN in about a second on 2 cores.
FAST = ["--dataset", "digits", "--epochs", "2", "--train-size", "300", "--test-size", "60", "--quiet"]


@pytest.fixture
def bench(capsys):
    """Run ``bench`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def digits():
    """sklearn's digits as the harness loads them (1,297 train / 500 test 8x8 images), loaded once."""
    from bench.registry import DATASETS

    return DATASETS.get("digits")()


@pytest.fixture(scope="session")
def digits_baseline(digits):
    """A digits-cnn Baseline trained once per session on the first 800 training images for 6
    epochs (seed 0): about 95% clean test accuracy. Shared by every test that asks for it: do not
    train or modify it (``copy.deepcopy`` it first)."""
    from bench.defenses.baseline import Baseline
    from bench.models import build_model
    from bench.training import TrainConfig

    torch.manual_seed(0)
    defense = Baseline(build_model("digits-cnn", digits.shape, 10, digits.mean, digits.std))
    defense.fit(digits.x_train[:800], digits.y_train[:800], TrainConfig(epochs=6, seed=0))
    defense.model.eval()
    return defense


@pytest.fixture(scope="session")
def fabricated_report(tmp_path_factory):
    """``bench report --out`` on test_reports' fabricated store, rendered once per session (its
    eight plot files are most of a report's cost): returns (results folder, report folder, stdout).
    Read it; do not change it."""
    import contextlib
    import io

    from test_reports import fabricate

    root = tmp_path_factory.mktemp("fabricated")
    store = fabricate(root / "results")
    out = root / "report"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        code = main(["report", "--results", str(store.directory), "--out", str(out)])
    assert code == 0, stdout.getvalue()
    return store.directory, out, stdout.getvalue()
