from __future__ import annotations

import pytest

from bench.cli import main

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
