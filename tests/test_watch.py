"""A run you can watch: log lines on stderr, tables on stdout, --quiet / -v, --version, help text,
batch-size options."""
from __future__ import annotations

import dataclasses
import io
import logging
import re

import pytest

from bench import log, progress
from bench.cli import PERF_SECTIONS, build_parser
from bench.spec import RunSpec, stable_hash
from bench.store import Store
from conftest import FAST

NOT_QUIET = [arg for arg in FAST if arg != "--quiet"]


def test_version(bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--version"])
    assert exit_.value.code == 0
    from importlib.metadata import version

    assert capsys.readouterr().out.strip() == f"bench (robustness-bench) {version('robustness-bench')}"


def test_every_run_option_says_its_default():
    parser = build_parser()
    run = next(a for a in parser._subparsers._actions if a.dest == "command").choices["run"]
    options = [a for a in run._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 25
    missing = [a.option_strings[-1] for a in options if "default" not in (a.help or "")]
    assert missing == []


def test_perf_sections_match_the_cli():
    from bench.perf import SECTIONS

    assert PERF_SECTIONS == SECTIONS


def test_progress_on_stderr_tables_on_stdout_and_quiet(bench, tmp_path):
    code, out, err = bench("run", *NOT_QUIET, "--out", str(tmp_path / "a"))
    assert code == 0
    assert "| baseline" in out and "clean accuracy" not in out and "epoch" not in out
    assert "clean accuracy" in err and "| baseline" not in err

    code, out_quiet, err_quiet = bench("run", *NOT_QUIET, "--quiet", "--out", str(tmp_path / "b"))
    assert code == 0 and err_quiet == "" and "| baseline" in out_quiet

    assert "baseline training: 1/2" not in err  # the default shows at most the last epoch's line


def test_verbose_shows_every_epoch(bench, tmp_path):
    code, _, err_verbose = bench("run", *NOT_QUIET, "-v", "--out", str(tmp_path))
    assert code == 0 and "baseline training: 1/2 epoch (loss" in err_verbose


def test_plain_progress_lines_when_stderr_is_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    log.configure(log.VERBOSE)
    try:
        assert not progress.bars_enabled()
        with progress.Progress(3, "demo", unit="step") as bar:
            for _ in range(3):
                bar.update(loss=0.5)
    finally:
        log.configure(log.NORMAL)
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        "demo: 1/3 step (loss 0.5), about " + lines[0].split("about ")[1],
        "demo: 2/3 step (loss 0.5), about " + lines[1].split("about ")[1],
        "demo: 3/3 step (loss 0.5)",
    ]


def test_batch_size_options_are_stored_and_keep_deterministic_records(bench, tmp_path):
    common = [*FAST, "--no-audit", "--attack", "pgd-linf", "--epsilons", "0,0.1", "--attack-param", "random_start=false",
              "--attack-param", "restarts=1"]
    assert bench("run", *common, "--out", str(tmp_path / "a"))[0] == 0
    assert bench("run", *common, "--eval-batch-size", "7", "--attack-batch-size", "9", "--out", str(tmp_path / "b"))[0] == 0
    (run_a,), (run_b,) = Store(tmp_path / "a").runs(), Store(tmp_path / "b").runs()
    assert run_a.spec["eval_batch_size"] is None and run_b.spec["eval_batch_size"] == 7
    assert run_b.spec["attack_batch_size"] == 9 and run_a.spec_hash != run_b.spec_hash
    # A deterministic defense under an attack without random start: batch sizes change nothing.
    strip = lambda frame: frame.drop(columns="run_id").sort_values(["attack", "epsilon", "sample_index"]).reset_index(drop=True)
    a, b = strip(Store(tmp_path / "a").records()), strip(Store(tmp_path / "b").records())
    assert a[["prediction", "correct"]].equals(b[["prediction", "correct"]])
    assert ((a.distance.fillna(0) - b.distance.fillna(0)).abs() <= 1e-6).all()


def test_unset_batch_sizes_keep_the_hash_of_older_specs():
    spec = RunSpec(defense="baseline", seed=3)
    older = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("eval_batch_size", "attack_batch_size")}
    assert spec.hash() == stable_hash(older)
    assert dataclasses.replace(spec, eval_batch_size=256).hash() != spec.hash()


@pytest.fixture(autouse=True)
def _normal_logging():
    yield
    logging.getLogger("bench").setLevel(logging.INFO)


class TimedStream(io.StringIO):
    """A non-terminal stderr that notes when each line arrives."""

    def __init__(self):
        super().__init__()
        self.arrivals: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        import time

        self.arrivals += [(time.monotonic(), line) for line in text.splitlines() if line]
        return super().write(text)


def _slow_step(monkeypatch, verbosity=log.NORMAL, seconds=2.0):
    """A step whose one unit of work lasts ``seconds`` with a heartbeat of 0.2 s; the lines it logs."""
    import time

    stream = TimedStream()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.2)
    log.configure(verbosity)
    started = time.monotonic()
    with progress.step("train demo"), progress.Progress(3, "demo training", unit="epoch") as bar:
        bar.doing("epoch 1")
        time.sleep(seconds)
        bar.update()
    return started, stream.arrivals


def test_a_long_unit_of_work_logs_a_heartbeat_at_every_interval(monkeypatch):
    started, arrivals = _slow_step(monkeypatch)
    beats = [(at, line) for at, line in arrivals if "still running" in line]
    assert len(beats) >= 4, arrivals
    pattern = r"\d\d:\d\d:\d\d still running: train demo \(\d s\) > demo training: 0/3 epoch \(now epoch 1\), \d s so far"
    assert all(re.fullmatch(pattern, line) for _, line in beats), beats
    # The heartbeat thread may be in its 1 s tick of the default interval when the test sets 0.2 s.
    times = [started] + [at for at, _ in beats]
    assert times[1] - times[0] < 1.5 and max(b - a for a, b in zip(times[1:], times[2:])) < 0.8, times


def test_quiet_silences_the_heartbeat(monkeypatch):
    _, arrivals = _slow_step(monkeypatch, log.QUIET, seconds=1.0)
    assert arrivals == []


def test_a_worker_logs_the_heartbeat_but_no_loop_lines(monkeypatch):
    monkeypatch.setattr(progress, "QUIET", True)
    monkeypatch.setattr(progress, "EVERY", 0.0)  # a loop line at every update, were they not silenced
    _, arrivals = _slow_step(monkeypatch, seconds=1.0)
    assert arrivals and all("still running: train demo" in line for _, line in arrivals), arrivals


def test_autoattack_names_its_running_stage_inside_one_chunk(monkeypatch):
    """One chunk of a real AutoAttack run (Square only, on a model slowed to 5 ms a query)."""
    import time

    import torch
    from torch import nn

    from bench.attacks.autoattack import AutoAttackParams, LinfAutoAttack

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

        def forward(self, x):
            time.sleep(0.005)
            return self.net(x)

    stream = TimedStream()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(progress, "HEARTBEAT", 0.2)
    log.configure(log.NORMAL)
    model = Slow().eval()
    x = torch.rand(6, 1, 4, 4)
    y = model.net(x).argmax(1)  # every point starts robust
    attack = LinfAutoAttack(AutoAttackParams(attacks="square", square_queries=150))
    adversarials = attack.run(model, x, y, [0.01, 0.02])
    assert len(adversarials) == 2
    lines = [line for _, line in stream.arrivals]
    # The heartbeat thread may first get the CPU during either budget's Square (each ~0.75 s of
    # queries); what matters is that it names the stage, its budget and its points.
    stage = re.compile(r"> autoattack-linf stages: 0/1 stage \(now square eps=0\.0[12] on 6 points\)")
    assert any(stage.search(line) for line in lines), lines
