"""Grids as jobs: --jobs N and a Dask cluster write exactly the serial run's records; complete
grids are not run again; failed jobs are isolated; shards resume one by one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench.cli import main
from bench.store import Store

# Two defenses x two seeds, clean and PGD: 4 runs, 4 training and 8 evaluation jobs. Batches of 16
# and PixelDP's noise on the input learn in 14 steps (train accuracy 0.4-0.8, chance 0.1); noise
# after conv1 needs about 100.
GRID = [
    "--dataset", "digits", "--defense", "baseline", "--defense", "pixeldp", "--param", "pixeldp.draws=10",
    "--param", "pixeldp.noise_at=input", "--seed", "0", "--seed", "1", "--epochs", "2", "--batch-size", "16",
    "--train-size", "100", "--test-size", "20",
    "--attack", "pgd-linf", "--no-audit", "--epsilons", "0.1", "--attack-param", "steps=3", "--eot-draws", "2", "--quiet",
]


def records_by_run(out) -> pd.DataFrame:
    """Every record, keyed by (defense, seed) instead of the random run id, in a fixed order."""
    store = Store(out)
    names = {run.run_id: f"{run.defense}/{run.seed}" for run in store.runs()}
    records = store.records()
    records["run"] = records.pop("run_id").map(names)
    return records.sort_values(["run", "attack", "epsilon", "sample_index"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    assert main(["run", *GRID, "--out", str(out)]) == 0
    records = records_by_run(out)
    assert len(records) == 4 * 2 * 20 and records.run.nunique() == 4
    return records


def test_jobs_2_writes_the_serial_records_and_a_rerun_does_nothing(serial, bench, tmp_path):
    code, _, _ = bench("run", *GRID, "--jobs", "2", "--out", str(tmp_path))
    assert code == 0
    pd.testing.assert_frame_equal(records_by_run(tmp_path), serial)
    runs = Store(tmp_path).runs()
    assert len(runs) == 4 and all(run.info["worker_threads"] == 1 for run in runs)

    code, out, err = bench("run", *GRID[:-1], "--jobs", "2", "--out", str(tmp_path))
    assert code == 0 and "nothing to do: all 4 run(s) of this grid are complete" in err
    assert "| baseline [seed=0]" in out and len(Store(tmp_path).runs(complete_only=False)) == 4


def test_loky_workers_start_before_any_job_and_write_the_serial_records(serial, bench, tmp_path, monkeypatch):
    """The library's default local start method (loky's; the bench command uses a fork server):
    the workers run their start-up before the first job, in processes of their own."""
    import os

    from bench import executors as module

    executors = []

    class Loky(module.LocalProcesses):
        def __init__(self, workers, threads=1, fork_server=True):
            super().__init__(workers, threads, fork_server=False)
            executors.append(self)

    monkeypatch.setattr(module, "LocalProcesses", Loky)
    code, _, _ = bench("run", *GRID, "--jobs", "2", "--out", str(tmp_path))
    assert code == 0
    pd.testing.assert_frame_equal(records_by_run(tmp_path), serial)
    started = executors[0].started
    assert 1 <= len(started) <= 2 and os.getpid() not in started


def _session_processes(session: int) -> list[int]:
    """Live processes of the session ``session`` leads (its leader's workers and fork server too)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")
def test_a_killed_jobs_2_driver_leaves_no_process_and_a_rerun_completes_with_no_duplicate(bench, tmp_path):
    # Four runs whose training takes long enough (half a second each) to kill the driver between
    # the first checkpoint and the last record.
    grid = ["--dataset", "digits", "--defense", "baseline", "--seed", "0", "--seed", "1", "--seed", "2", "--seed", "3",
            "--epochs", "15", "--train-size", "200", "--test-size", "20", "--no-audit", "--attack", "pgd-linf", "--epsilons", "0.1",
            "--attack-param", "steps=3", "--quiet"]
    killed = tmp_path / "killed"
    driver = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", *grid, "--jobs", "2", "--out", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path, start_new_session=True,  # its workers and fork server are in its session
    )
    deadline = time.monotonic() + 120
    while not list(killed.glob("checkpoints/*.pt")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert driver.poll() is None, "the grid ended before it could be killed"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 15  # the workers look for their driver once a second
    while _session_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _session_processes(driver.pid), "a worker or the fork server outlived the killed driver"
    assert Store(killed).runs(complete_only=True) == []

    assert bench("run", *grid, "--out", str(killed))[0] == 0  # the driver resumes alike on any executor
    assert main(["run", *grid, "--out", str(tmp_path / "serial")]) == 0
    resumed = records_by_run(killed)
    assert len(resumed) == 4 * 2 * 20 and not resumed.duplicated(["run", "attack", "epsilon", "sample_index"]).any()
    pd.testing.assert_frame_equal(resumed, records_by_run(tmp_path / "serial"))


def test_a_dask_local_cluster_writes_the_serial_records(serial, bench, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as cluster:
        code, _, _ = bench("run", *GRID, "--scheduler", cluster.scheduler_address, "--out", str(tmp_path))
    assert code == 0
    pd.testing.assert_frame_equal(records_by_run(tmp_path), serial)


def test_shards_resume_one_by_one_and_match_an_uninterrupted_run(bench, tmp_path, monkeypatch):
    from bench import jobs
    from bench.attacks.base import Attack
    from bench.registry import ATTACKS

    class Noisy(Attack):
        """Seeded random noise of size eps (so each shard's seed matters); its third call fails once."""

        norm = "linf"
        default_epsilons = (0.1,)
        calls = 0

        def perturb_chunk(self, model, x, y, epsilons, predict):  # one chunk per shard of <= 8
            import torch

            Noisy.calls += 1
            if Noisy.calls == 3:
                raise RuntimeError("shard crash")
            return [(x + eps * torch.rand_like(x)).clamp(0, 1) for eps in epsilons]

    ATTACKS.register("noisy")(Noisy)
    monkeypatch.setattr(jobs, "SHARD_SIZE", 8)  # 30 test samples: shards of 8, 8, 8 and 6
    args = ["--dataset", "digits", "--epochs", "2", "--batch-size", "16", "--train-size", "100", "--test-size", "30", "--no-audit", "--attack", "noisy", "--quiet"]
    code, _, err = bench("run", *args, "--out", str(tmp_path / "a"))
    assert code == 1 and "noisy shard 3/4: RuntimeError: shard crash" in err
    stored = Store(tmp_path / "a").records()
    assert (stored.attack == "noisy").sum() == 22 and (stored.attack == "clean").sum() == 30

    code, _, err = bench("run", *args[:-1], "--out", str(tmp_path / "a"))
    assert code == 0 and "1 job(s) for 1 run(s)" in err  # only the missing shard runs again
    assert bench("run", *args, "--out", str(tmp_path / "b"))[0] == 0
    resumed, fresh = records_by_run(tmp_path / "a"), records_by_run(tmp_path / "b")
    assert len(resumed) == 60 and not resumed.duplicated(["attack", "epsilon", "sample_index"]).any()
    pd.testing.assert_frame_equal(resumed, fresh)


def test_a_failed_training_job_fails_its_runs_only(bench, tmp_path, monkeypatch):
    from bench.defenses.baseline import Baseline
    from bench.registry import DEFENSES

    class Broken(Baseline):
        """Raises while training, as a broken third-party adapter would."""

        name = "broken"

        def fit(self, x, y, config):
            raise ValueError("adapter bug")

    DEFENSES.register("broken")(Broken)
    code, out, err = bench("run", "--defense", "broken", "--defense", "baseline", "--dataset", "digits", "--epochs", "2",
                           "--batch-size", "16", "--train-size", "100", "--test-size", "20", "--quiet", "--out", str(tmp_path))
    assert code == 1 and "train broken: ValueError: adapter bug" in err and "1 of 4 job(s) failed" in err
    statuses = {run.defense: run.status for run in Store(tmp_path).runs(complete_only=False)}
    assert statuses == {"broken": "failed", "baseline": "complete"}
    assert "| baseline" in out


def test_two_identical_commands_on_one_folder_do_the_work_once(tmp_path):
    """The second command waits for the runs the first one is writing, then finds them complete
    (or resumes them, had the first one died): one run per spec, each record once, same tables."""
    # One run whose training (200 epochs) outlasts the second command's start-up several times over.
    grid = ["--dataset", "digits", "--defense", "baseline", "--epochs", "200", "--train-size", "200", "--test-size", "40",
            "--no-audit", "--attack", "pgd-linf", "--epsilons", "0.05,0.1", "--attack-param", "restarts=1",
            "--out", str(tmp_path / "out")]
    command = [sys.executable, "-m", "bench.cli", "run", *grid]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and first.poll() is None:
        if (tmp_path / "out" / "results.sqlite").is_file() and Store(tmp_path / "out").runs(complete_only=False):
            break
        time.sleep(0.02)
    assert first.poll() is None, "the first command ended before the second could start"
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    assert "waiting for it" in second.stderr
    store = Store(tmp_path / "out")
    assert len(store.runs(complete_only=False)) == 1 and len(store.runs()) == 1
    records = store.records()
    assert len(records) == 40 * 3 and not records.duplicated(["run_id", "attack", "epsilon", "sample_index"]).any()
    assert second.stdout == out  # the same tables


def test_a_wave_starts_no_more_workers_than_it_has_jobs():
    """--jobs is an upper bound: two jobs under 8 workers start 2 processes, not 8."""
    from types import SimpleNamespace

    from joblib.externals.loky import reusable_executor

    from bench.executors import LocalProcesses

    executor = LocalProcesses(8, threads=1)
    try:
        pids = set(executor.run([SimpleNamespace(), SimpleNamespace()], lambda job: os.getpid()))
        assert len(pids) <= 2 and os.getpid() not in pids
        pool = reusable_executor._executor
        assert pool._max_workers == 2 and len(pool._processes) <= 2
        (alone,) = executor.run([SimpleNamespace()], lambda job: os.getpid())
        assert alone != os.getpid()  # one job still runs in a worker, never in the driver
    finally:
        executor.close()
