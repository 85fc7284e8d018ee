"""The results store under concurrency and failure: atomic claims, leases, no duplicate records,
complete specs skipped, costs summed over processes, one-line errors when a write is refused."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import store as store_module
from bench.errors import BenchError
from bench.store import LEASE_SECONDS, Run, Store
from bench.types import Record
from conftest import FAST

SAYS = [a for a in FAST if a != "--quiet"]  # the progress lines on stderr are asserted


def make_run(run_id: str = "run000000001", spec_hash: str = "spec") -> Run:
    return Run(run_id=run_id, created="2026-01-01T00:00:00+00:00", dataset="digits", defense="baseline",
               label="baseline", params={}, spec={}, spec_hash=spec_hash, training_hash="train", seed=0,
               versions={}, host="here", info={}, warnings=[])


def clean_records(count: int = 3) -> list[Record]:
    return [Record(i, "clean", None, 0.0, 1, 1, 1, None, None, None, None) for i in range(count)]


def unfinished_store(directory: Path) -> Store:
    """A store holding one unfinished run that no process owns (a crashed run handed back)."""
    store = Store(directory)
    store.begin_run(make_run())
    store.add_records("run000000001", clean_records(), "clean", 1.0)
    store.release("run000000001")
    return store


def set_owner(store: Store, host: str, pid: int, lease_until: float) -> None:
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE runs SET owner_host = ?, owner_pid = ?, lease_until = ?", (host, pid, lease_until))


def test_two_claims_racing_for_one_unfinished_run_give_it_to_exactly_one(tmp_path, monkeypatch):
    unfinished_store(tmp_path)
    results: dict[str, object] = {}
    second = threading.Thread(target=lambda: results.update(second=Store(tmp_path).resumable("spec")))
    waited = []

    def widen_the_gap(run_id: str) -> None:
        # The first claim has read the run as unowned; a second claim (its own connection) starts
        # now and must wait for the first to commit rather than read the same unowned run.
        if not waited:
            second.start()
            second.join(0.5)
            waited.append(second.is_alive())

    monkeypatch.setattr(store_module, "claim_hook", widen_the_gap)
    results["first"] = Store(tmp_path).resumable("spec")
    second.join(30)
    assert waited == [True], "the second claim did not wait for the first one's transaction"
    assert results["first"] is not None and results["first"][1] == {"clean": {0, 1, 2}}
    assert results["second"] is None


def test_a_foreign_host_owner_keeps_its_run_while_its_lease_is_fresh(tmp_path):
    store = unfinished_store(tmp_path)
    set_owner(store, "another-host", 4242, time.time() + LEASE_SECONDS / 2)
    assert store.resumable("spec") is None
    set_owner(store, "another-host", 4242, time.time() - 1)
    run, steps = store.resumable("spec")
    assert run.run_id == "run000000001" and steps == {"clean": {0, 1, 2}}
    with sqlite3.connect(store.path) as connection:
        owner = connection.execute("SELECT owner_host, owner_pid, lease_until FROM runs").fetchone()
    assert owner[:2] == (socket.gethostname(), os.getpid()) and owner[2] > time.time() + LEASE_SECONDS / 2


def test_a_same_host_owner_is_gone_when_its_pid_ended_or_its_lease_expired(tmp_path):
    store = unfinished_store(tmp_path)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    set_owner(store, socket.gethostname(), ended.pid, time.time() + LEASE_SECONDS)
    assert store.resumable("spec") is not None  # a crash on this host is resumed without waiting
    set_owner(store, socket.gethostname(), os.getpid(), time.time() + LEASE_SECONDS)
    assert store.resumable("spec") is None  # alive and renewing
    set_owner(store, socket.gethostname(), os.getpid(), time.time() - 1)
    assert store.resumable("spec") is not None  # a hung owner (or a reused pid)


def test_a_process_whose_run_was_taken_over_cannot_write_to_it(tmp_path):
    store = unfinished_store(tmp_path)
    store.resumable("spec")
    set_owner(store, "another-host", 4242, time.time() + LEASE_SECONDS)
    attacked = [r._replace(attack="pgd", epsilon=0.1) for r in clean_records()]
    with pytest.raises(BenchError, match="run run000000001 is now held by process 4242 on another-host"):
        store.add_records("run000000001", attacked, "pgd", 1.0)
    assert set(store.records().attack) == {"clean"}


def test_the_heartbeat_renews_the_lease_during_a_long_step(tmp_path):
    store = Store(tmp_path)
    store.begin_run(make_run())
    set_owner(store, socket.gethostname(), os.getpid(), time.time() + 1)
    lease = store.hold("run000000001", every=0.05)
    time.sleep(0.3)
    lease.stop()
    with sqlite3.connect(store.path) as connection:
        (lease_until,) = connection.execute("SELECT lease_until FROM runs").fetchone()
    assert lease_until > time.time() + LEASE_SECONDS - 5


def test_a_duplicate_record_is_refused_loudly_and_nothing_doubles(tmp_path):
    store = Store(tmp_path)
    store.begin_run(make_run())
    store.add_records("run000000001", clean_records(), "clean", 1.0)
    with pytest.raises(BenchError, match="run run000000001: step clean already has records"):
        store.add_records("run000000001", clean_records(5)[2:], "clean", 1.0)
    assert len(store.records()) == 3
    assert store.work("run000000001").seconds.tolist() == [1.0]  # the refused step's seconds are not kept either


def test_an_old_store_gets_the_unique_key_and_one_with_duplicates_says_so(tmp_path):
    store = Store(tmp_path)
    store.save_run(make_run(), clean_records())
    with sqlite3.connect(store.path) as connection:  # as written before this version
        connection.execute("DROP INDEX records_unique")
        connection.execute("DROP TABLE work")
        for column in ("owner_host", "owner_pid", "lease_until"):
            connection.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    assert [run.run_id for run in store.runs()] == ["run000000001"]
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("SELECT name FROM sqlite_master WHERE name = 'records_unique'").fetchone()
        connection.execute("DROP INDEX records_unique")
        connection.execute("INSERT INTO records SELECT * FROM records WHERE sample_index < 2")
    with pytest.raises(BenchError) as error:
        store.runs()
    message = str(error.value)
    assert "holds 2 duplicate records" in message and "run000000001" in message and "\n" not in message
    assert "DELETE FROM records" in message


def test_malformed_json_in_a_run_column_is_a_one_line_error(tmp_path):
    store = Store(tmp_path)
    store.save_run(make_run(), clean_records())
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE runs SET info = '{\"train_seconds\": '")
    with pytest.raises(BenchError, match=r"run run000000001 has malformed JSON in column info \(") as error:
        store.runs()
    assert "\n" not in str(error.value)
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE runs SET info = '[1, 2]'")
    with pytest.raises(BenchError, match="column info holds list, expected a JSON object"):
        store.runs()


def test_the_cli_reports_a_damaged_store_on_one_line(bench, tmp_path):
    store = Store(tmp_path)
    store.save_run(make_run(), clean_records())
    with sqlite3.connect(store.path) as connection:
        connection.execute("UPDATE runs SET params = 'not json'")
    code, _, stderr = bench("report", "--results", str(tmp_path))
    assert code == 2 and stderr.count("\n") == 1 and "malformed JSON in column params" in stderr


def test_rerunning_a_complete_spec_does_no_work_and_force_starts_a_new_run(bench, tmp_path, monkeypatch):
    assert bench("run", *FAST, "--out", str(tmp_path))[0] == 0
    (first,) = Store(tmp_path).runs(complete_only=False)

    def no_work(*args, **kwargs):
        raise AssertionError("a complete spec was trained or evaluated again")

    with monkeypatch.context() as patch:
        patch.setattr(Store, "load_checkpoint", no_work)
        patch.setattr(Store, "begin_run", no_work)
        patch.setattr(Store, "resumable", no_work)
        code, stdout, stderr = bench("run", *SAYS, "--out", str(tmp_path))
    assert code == 0 and f"already complete: run {first.run_id}; --force starts a new one" in stderr
    assert "| baseline" in stdout.split("## Clean accuracy")[1]  # the printed tables still show it
    assert [run.run_id for run in Store(tmp_path).runs(complete_only=False)] == [first.run_id]

    code, stdout, stderr = bench("run", *SAYS, "--force", "--out", str(tmp_path))
    runs = Store(tmp_path).runs(complete_only=False)
    assert code == 0 and "already complete" not in stderr and "reusing checkpoint" in stderr
    assert len(runs) == 2 and runs[1].status == "complete"


def test_a_resumed_run_is_charged_the_time_of_every_process(bench, tmp_path, monkeypatch):
    from bench.attacks.base import Attack
    from bench.registry import ATTACKS

    class Slow(Attack):
        """Takes 0.4 s, then returns the clean inputs."""

        norm = "linf"
        default_epsilons = (0.1,)

        def perturb_chunk(self, model, x, y, epsilons, predict):  # one chunk: the 60 test images
            time.sleep(0.4)
            return [x.clone() for _ in epsilons]

    class Flaky(Slow):
        """Fails on its first call, then returns the clean inputs at once."""

        calls = 0

        def perturb_chunk(self, model, x, y, epsilons, predict):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("simulated crash")
            return [x.clone() for _ in epsilons]

    ATTACKS.register("slow")(Slow)
    ATTACKS.register("flaky")(Flaky)
    command = ("run", *SAYS, "--attack", "slow", "--attack", "flaky", "--out", str(tmp_path))
    code, _, stderr = bench(*command)  # trains, stores clean and slow; flaky fails and so does the run
    assert code == 1 and "simulated crash" in stderr
    code, stdout, stderr = bench(*command)  # loads the checkpoint and runs flaky only
    assert code == 0 and "resuming unfinished run" in stderr
    (run,) = Store(tmp_path).runs()
    info = run.info
    # The slow step (0.4 s) ran in the first process only, the training too.
    assert info["eval_seconds"] >= 0.4
    assert info["model_train_seconds"] is not None and info["model_train_seconds"] > 0
    assert info["train_seconds"] >= info["model_train_seconds"] and not info["reused_checkpoint"]
    code, stdout, _ = bench("report", "--results", str(tmp_path), "--format", "json")
    (cost,) = json.loads(stdout)["cost"]
    assert cost["model_train_seconds"] == pytest.approx(info["model_train_seconds"])
    assert cost["eval_seconds"] == pytest.approx(info["eval_seconds"])


def test_a_full_database_fails_the_step_on_one_line_and_keeps_earlier_steps(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.begin_run(make_run())
    store.add_records("run000000001", clean_records(), "clean", 1.0)
    insert = store_module._insert_records

    def on_a_full_disk(connection, run_id, records):
        # SQLite's own "database or disk is full": no page beyond those the file has now.
        (pages,) = connection.execute("PRAGMA page_count").fetchone()
        connection.execute(f"PRAGMA max_page_count = {pages}")
        insert(connection, run_id, records)

    monkeypatch.setattr(store_module, "_insert_records", on_a_full_disk)
    many = [r._replace(attack="pgd", epsilon=0.1, sample_index=i) for i in range(5000) for r in clean_records(1)]
    with pytest.raises(BenchError) as error:
        store.add_records("run000000001", many, "pgd", 2.0)
    message = str(error.value)
    assert "writing step pgd of run run000000001 failed: database or disk is full" in message
    assert "not readable" not in message and "\n" not in message
    monkeypatch.undo()
    assert len(store.records()) == 3 and store.work("run000000001").seconds.tolist() == [1.0]


def test_a_checkpoint_the_disk_refuses_is_a_one_line_error_and_the_run_stays_resumable(bench, tmp_path):
    # A file-size limit far below the checkpoint (about 600 kB) makes its write fail as a full
    # disk would (EFBIG instead of ENOSPC); the small SQLite writes stay under it.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        code, _, stderr = bench("run", *FAST, "--out", str(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert code == 2
    (line,) = stderr.splitlines()
    assert line.startswith("bench: error: could not write checkpoint") and "File too large" in line
    assert not list((tmp_path / "checkpoints").glob("*"))  # no partial checkpoint is kept
    (run,) = Store(tmp_path).runs(complete_only=False)
    assert run.status == "interrupted"
    assert Store(tmp_path).resumable(run.spec_hash)[0].run_id == run.run_id


def test_an_empty_results_file_is_a_new_store(bench, tmp_path):
    """A results.sqlite without tables (a full disk while the store was created leaves one) is
    an empty store, not a folder that is unusable for ever."""
    (tmp_path / "results.sqlite").write_bytes(b"")
    assert bench("report", "--results", str(tmp_path), "--format", "md")[0] == 0
    code, _, err = bench("run", *FAST, "--out", str(tmp_path))
    assert code == 0, err
    assert len(Store(tmp_path).runs()) == 1


def test_a_read_only_results_folder_can_be_reported(bench, tmp_path):
    """Published results on a folder nobody may write: every report format reads it. The tests
    run as root, whom permission bits do not stop, so the folder is made immutable (chattr +i)."""
    assert bench("run", *FAST, "--out", str(tmp_path / "published"))[0] == 0
    folder = tmp_path / "published"
    locked = [folder, folder / "results.sqlite"]
    if subprocess.run(["chattr", "+i", *map(str, locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_text("")  # the folder really is read-only
        for fmt in ("md", "json"):
            code, out, err = bench("report", "--results", str(folder), "--format", fmt)
            assert code == 0 and "baseline" in out, err
        code, out, err = bench("report", "--results", str(folder), "--out", str(tmp_path / "report"))
        assert code == 0 and (tmp_path / "report" / "report.html").is_file(), err
    finally:
        subprocess.run(["chattr", "-i", *map(str, locked)], check=True)


def test_a_failed_write_says_steps_are_kept_only_when_this_process_committed_some(tmp_path, monkeypatch):
    store = Store(tmp_path)
    refused = sqlite3.OperationalError("attempt to write a readonly database")
    monkeypatch.setattr(store_module, "_committed", 0)
    assert str(store._error(refused, "adding records")) == (
        f"results store {store.path}: adding records failed: attempt to write a readonly database")
    monkeypatch.setattr(store_module, "_committed", 3)
    assert str(store._error(refused, "adding records")).endswith(
        "readonly database; the 3 step(s) or checkpoint(s) this process committed before are kept")
