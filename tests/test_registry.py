from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from bench.errors import BenchError
from bench.registry import build_params
from bench.store import Store

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_files() -> dict[str, str]:
    """The README's code blocks that start with a ``# FILENAME`` line, by file name."""
    files = {}
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w.-]+\.(py|toml)", first):
            files[first[2:]] = block
    return files


def write_readme_adapter(root: Path) -> None:
    """The README's ``my_defense.py`` in ``root`` (importable as ``my_defense`` with ``root`` on the path)."""
    (root / "my_defense.py").write_text(readme_files()["my_defense.py"])


def install_plugin(root: Path) -> Path:
    """``pip install .`` of the README's adapter example (its two files, as written there) into
    ``root/site``; offline: the build backend is the installed setuptools."""
    source = root / "my-defense"
    source.mkdir()
    files = readme_files()
    assert {"my_defense.py", "pyproject.toml"} <= set(files)
    for name in ("my_defense.py", "pyproject.toml"):
        (source / name).write_text(files[name])
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(root / "site"), str(source)],
        capture_output=True, text=True,
    )
    assert pip.returncode == 0, pip.stderr
    return root / "site"


def test_entry_point_adapter_runs_from_the_cli(tmp_path):
    site = install_plugin(tmp_path)
    (info,) = site.glob("my_defense-0.1.0.dist-info")
    assert "label-smoothing = my_defense:LabelSmoothing" in (info / "entry_points.txt").read_text()
    # A fresh process (entry points are discovered at start-up), and only one: `bench list` then
    # `bench run` through the console script's function, which saves a second start of torch,
    # foolbox and ART (2-3 s idle, 10+ s on a loaded machine).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "results"
    run = ["run", "--defense", "label-smoothing", "--param", "smoothing=0.2", "--epochs", "1", "--batch-size", "16", "--train-size", "200",
           "--test-size", "20", "--quiet", "--out", str(out)]
    # The other doors: bench.wrap by name, and the class itself; one name whichever way it came.
    api = ("import bench; from torch import nn; from my_defense import LabelSmoothing\n"
           "model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
           "for defense in (bench.wrap('label-smoothing', model, smoothing=0.2), LabelSmoothing(model, LabelSmoothing.Params(0.2))):\n"
           "    runs = bench.evaluate(defense, 'digits', test_size=10).runs\n"
           "    print('=== api', runs.defense[0], runs.label[0])\n")
    script = f"import sys; from bench.cli import main; main(['list']); print('=== run'); code = main({run!r})\n{api}sys.exit(code)"
    # cwd: not the checkout, whose bench/ would shadow the installed package (tox installs it, not editable)
    process = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    listing = process.stdout.split("=== run")[0]
    assert "label-smoothing" in listing and "Cross-entropy with label smoothing" in listing
    (stored,) = Store(out).runs()
    assert stored.defense == "label-smoothing" and stored.params["smoothing"] == 0.2
    assert stored.label == "label-smoothing(smoothing=0.2)"
    doors = [line for line in process.stdout.splitlines() if line.startswith("=== api")]
    assert doors == ["=== api label-smoothing label-smoothing(smoothing=0.2)"] * 2


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
