from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from bench.errors import BenchError
from bench.registry import build_params
from bench.store import Store

PLUGIN = '''
from dataclasses import dataclass

import torch.nn.functional as F

from bench.defenses.base import Defense


class LabelSmoothing(Defense):
    """Cross-entropy with label smoothing (a third-party adapter)."""

    @dataclass
    class Params:
        smoothing: float = 0.1

    def training_loss(self, x, y):
        return F.cross_entropy(self.model(x), y, label_smoothing=self.params.smoothing)
'''


def install_plugin(root):
    """What ``pip install`` leaves behind: the module and a dist-info with the entry point."""
    (root / "smooth_labels.py").write_text(PLUGIN)
    info = root / "smooth_labels-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: smooth-labels\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[bench.defenses]\nlabel-smoothing = smooth_labels:LabelSmoothing\n")


def test_entry_point_adapter_runs_from_the_cli(tmp_path):
    install_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "bench.cli", "list"], env=env, capture_output=True, text=True)
    assert "label-smoothing" in listing.stdout and "third-party adapter" in listing.stdout
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", "--defense", "label-smoothing", "--param", "smoothing=0.2",
         "--epochs", "1", "--train-size", "200", "--test-size", "20", "--quiet", "--out", str(out)],
        env=env, capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    (stored,) = Store(out).runs()
    assert stored.defense == "label-smoothing" and stored.params["smoothing"] == 0.2
    assert stored.label == "label-smoothing(smoothing=0.2)"


@dataclass
class Example:
    steps: int = 10
    rate: float = 0.5
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    limit: float | None = None


def test_parameters_are_coerced_from_strings():
    params = build_params(Example, {"steps": "3", "rate": "1e-2", "flag": "true", "mode": "b", "limit": "none"}, "x")
    assert params == Example(steps=3, rate=0.01, flag=True, mode="b", limit=None)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"steps": "three"}, "steps='three' is not an integer"),
        ({"steps": "2.5"}, "steps='2.5' is not an integer"),
        ({"steps": True}, "steps=True is not an integer"),
        ({"rate": "nan"}, "rate='nan' is not a finite number"),
        ({"rate": float("inf")}, "rate=inf is not a finite number"),
        ({"rate": "-inf"}, "rate='-inf' is not a finite number"),
        ({"limit": "1e999"}, "limit='1e999' is not a finite number"),
        ({"flag": "maybe"}, "not a boolean"),
        ({"mode": "c"}, "choose one of a, b"),
        ({"other": "1"}, "has no parameter 'other'; accepted: flag, limit, mode, rate, steps"),
    ],
)
def test_bad_parameters_name_what_is_accepted(values, fragment):
    with pytest.raises(BenchError, match=fragment.replace("(", r"\(")):
        build_params(Example, values, "defense x")
