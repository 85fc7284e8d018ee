from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.store import Store
from conftest import FAST


def report(bench, out: Path) -> dict:
    code, stdout, _ = bench("report", "--results", str(out), "--format", "json")
    assert code == 0
    return json.loads(stdout)


def test_run_stores_per_sample_records_and_reports_clean_accuracy(bench, tmp_path):
    code, stdout, _ = bench("run", *FAST, "--out", str(tmp_path))
    assert code == 0 and "Clean accuracy" in stdout
    (run,) = Store(tmp_path).runs()
    records = Store(tmp_path).records()
    assert len(records) == 60 and set(records.attack) == {"clean"}
    assert (records.correct == (records.prediction == records.label)).all()
    assert run.seed == 0 and "torch" in run.versions and "foolbox" in run.versions and run.host
    (row,) = report(bench, tmp_path)["clean"]
    assert row["accuracy"] == records.correct.mean()  # k / 60 from an exact integer sum: one rounding either way
    assert row["n"] == 60 and row["defense"] == "baseline" and row["dataset"] == "digits"
    assert set(row) >= {"dataset", "defense", "label", "params", "accuracy", "n"}


def test_same_spec_and_seed_give_identical_predictions(bench, tmp_path):
    for out in ("a", "b"):
        assert bench("run", *FAST, "--seed", "5", "--out", str(tmp_path / out))[0] == 0
    first, second = (Store(tmp_path / out).records() for out in ("a", "b"))
    assert first.prediction.tolist() == second.prediction.tolist()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run_id"} for r in rows["clean"]]
    assert strip(report(bench, tmp_path / "a")) == strip(report(bench, tmp_path / "b"))


def test_checkpoint_is_reused_for_the_same_training_spec(bench, tmp_path):
    bench("run", *FAST, "--out", str(tmp_path))
    code, _, stderr = bench("run", *FAST[:-1], "--out", str(tmp_path))
    assert code == 0 and "nothing to do" in stderr and len(Store(tmp_path).runs()) == 1
    code, _, stderr = bench("run", *FAST[:-1], "--force", "--out", str(tmp_path))
    first, second = Store(tmp_path).runs()
    assert code == 0 and "reusing checkpoint" in stderr
    assert not first.info["reused_checkpoint"] and second.info["reused_checkpoint"]
    records = Store(tmp_path).records()
    by_run = [group.prediction.tolist() for _, group in records.groupby("run_id", sort=False)]
    assert by_run[0] == by_run[1]


def test_config_file_and_command_line_precedence(bench, tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text('dataset = "digits"\nepochs = 1\nseed = 3\ntrain_size = 200\ntest_size = 20\n[param]\n')
    assert bench("run", "--config", str(config), "--seed", "4", "--quiet", "--out", str(tmp_path))[0] == 0
    (run,) = Store(tmp_path).runs()
    assert run.spec["seed"] == 4 and run.spec["epochs"] == 1 and run.spec["test_size"] == 20


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--dataset", "nosuch"], "unknown dataset 'nosuch'; available:"),
        (["--defense", "nosuch"], "unknown defense 'nosuch'; available:"),
        (["--param", "no-equals-sign"], "--param 'no-equals-sign' is malformed"),
        (["--param", "nokey=1"], "parameter 'nokey'"),
        (["--attack", "nosuch"], "unknown attack 'nosuch'"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_2(bench, tmp_path, args, fragment):
    code, stdout, stderr = bench("run", *args, "--out", str(tmp_path), "--quiet")
    assert code == 2
    assert stderr.startswith("bench: error:") and fragment in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "results.sqlite").exists()


def test_truncated_mnist_through_the_cli(bench, tmp_path):
    from test_datasets import write_mnist

    write_mnist(tmp_path / "data")
    path = tmp_path / "data" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    code, _, stderr = bench("run", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path))
    assert code == 2 and "t10k-images-idx3-ubyte.gz is corrupt" in stderr and stderr.count("\n") == 1


def test_list_shows_every_registry(bench):
    from bench.registry import ATTACKS, DATASETS, DEFENSES

    code, stdout, _ = bench("list")
    assert code == 0
    sections = dict(zip(("defenses", "attacks", "datasets"), re.split(r"^(?:defenses|attacks|datasets):$", stdout, flags=re.M)[1:]))
    for title, registry in (("defenses", DEFENSES), ("attacks", ATTACKS), ("datasets", DATASETS)):
        listed = re.findall(r"^  (\S+) ", sections[title], flags=re.M)
        assert listed == registry.names(), title  # every registered name, once, in its own section


def test_report_on_missing_store_is_an_error(bench, tmp_path):
    code, _, stderr = bench("report", "--results", str(tmp_path / "none"))
    assert code == 2 and "no results store" in stderr


def test_kill_during_a_run_keeps_earlier_runs_intact(bench, tmp_path):
    assert bench("run", *FAST, "--out", str(tmp_path))[0] == 0
    before = Store(tmp_path).records()
    # A long second run, killed with SIGKILL while it trains.
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--dataset", "digits", "--epochs", "500", "--seed", "9",
         "--quiet", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,  # not the checkout: there `bench/` lacks the installed bench.defenses (tox installs a wheel)
    )
    deadline = time.monotonic() + 120
    while len(Store(tmp_path).runs(complete_only=False)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # wait until the second run is registered (500 epochs of training follow)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    runs = Store(tmp_path).runs()
    assert len(runs) == 1
    assert [r.status for r in Store(tmp_path).runs(complete_only=False)] == ["complete", "running"]
    after = Store(tmp_path).records()
    assert after[after.run_id == runs[0].run_id].equals(before)
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert bench("report", "--results", str(tmp_path))[0] == 0


def test_a_failed_run_resumes_from_its_stored_steps(bench, tmp_path, monkeypatch):
    from bench.attacks.base import Attack
    from bench.registry import ATTACKS

    class Flaky(Attack):
        """Fails on its first call, then returns the clean inputs."""

        norm = "linf"
        default_epsilons = (0.1,)
        calls = 0

        def perturb_chunk(self, model, x, y, epsilons, predict):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("simulated crash in the middle of a run")
            return [x.clone() for _ in epsilons]

    ATTACKS.register("flaky-once")(Flaky)  # as a plug-in registers itself
    code, _, stderr = bench("run", *FAST, "--attack", "flaky-once", "--no-audit", "--out", str(tmp_path))
    assert code == 1 and "simulated crash" in stderr and "1 of 3 job(s) failed" in stderr
    assert Store(tmp_path).runs() == []
    (unfinished,) = Store(tmp_path).runs(complete_only=False)
    assert unfinished.status == "failed" and "simulated crash" in unfinished.info["errors"][0]
    assert set(Store(tmp_path).records().attack) == {"clean"}

    code, _, stderr = bench("run", *FAST[:-1], "--attack", "flaky-once", "--no-audit", "--out", str(tmp_path))
    assert code == 0 and "resuming unfinished run" in stderr
    (run,) = Store(tmp_path).runs()
    assert run.run_id == unfinished.run_id and run.info["resumed"]
    records = Store(tmp_path).records()
    assert sorted(records.attack.value_counts().items()) == [("clean", 60), ("flaky-once", 60)]
    bench("run", *FAST, "--out", str(tmp_path / "fresh"))
    assert Store(tmp_path / "fresh").records().prediction.tolist() == records[records.attack == "clean"].prediction.tolist()


def test_a_run_still_being_written_is_not_resumed_by_another_process(bench, tmp_path, monkeypatch):
    from bench.attacks.base import Attack
    from bench.registry import ATTACKS

    class Crash(Attack):
        """Always fails."""

        def perturb_chunk(self, model, x, y, epsilons, predict):
            raise RuntimeError("crash")

    ATTACKS.register("crash")(Crash)
    assert bench("run", *FAST, "--attack", "crash", "--no-audit", "--epsilons", "0.1", "--out", str(tmp_path))[0] == 1
    (unfinished,) = Store(tmp_path).runs(complete_only=False)
    assert unfinished.status == "failed"
    # Pretend a live process (this one) is still writing it: a second run must start afresh.
    with sqlite3.connect(Store(tmp_path).path) as connection:
        connection.execute("UPDATE runs SET owner_host = ?, owner_pid = ?, lease_until = ?",
                           (socket.gethostname(), os.getpid(), time.time() + 60))
    assert bench("run", *FAST, "--attack", "crash", "--no-audit", "--epsilons", "0.1", "--out", str(tmp_path))[0] == 1
    runs = Store(tmp_path).runs(complete_only=False)
    assert len(runs) == 2 and runs[0].run_id == unfinished.run_id
    counts = Store(tmp_path).records().groupby("run_id").size().to_dict()
    assert counts == {runs[0].run_id: 60, runs[1].run_id: 60}


def test_a_store_from_before_run_status_reads_as_complete(bench, tmp_path):
    assert bench("run", *FAST, "--out", str(tmp_path))[0] == 0
    with sqlite3.connect(Store(tmp_path).path) as connection:
        connection.execute("ALTER TABLE runs DROP COLUMN status")
    (run,) = Store(tmp_path).runs()
    assert run.status == "complete" and len(report(bench, tmp_path)["clean"]) == 1


def test_a_changed_default_does_not_reuse_the_old_checkpoint(bench, tmp_path, monkeypatch):
    from test_registry import write_readme_adapter

    write_readme_adapter(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_defense
    from bench.registry import DEFENSES

    DEFENSES.register("label-smoothing")(my_defense.LabelSmoothing)
    bench("run", *FAST, "--defense", "label-smoothing", "--out", str(tmp_path / "r"))
    first = Store(tmp_path / "r").runs()[0]
    assert first.spec["params"] == {"smoothing": 0.1}
    # Same command, new default: the training hash differs, so the model is retrained.
    monkeypatch.setattr(my_defense.LabelSmoothing.Params.__init__, "__defaults__", (0.3,))
    code, _, stderr = bench("run", *FAST[:-1], "--defense", "label-smoothing", "--out", str(tmp_path / "r"))
    second = Store(tmp_path / "r").runs()[-1]
    assert code == 0 and "reusing checkpoint" not in stderr
    assert second.spec["params"] == {"smoothing": 0.3} and second.training_hash != first.training_hash


def test_a_run_whose_steps_are_all_stored_is_completed_by_the_next_command(bench, tmp_path):
    """Ctrl-C or a crash after the last commit but before the finish: the next command has no
    job left to run for it, and must still mark it complete, or it drops out of every table."""
    args = ["run", *FAST[:-1], "--no-audit", "--attack", "pgd-linf", "--epsilons", "0.1", "--attack-param", "restarts=1",
            "--out", str(tmp_path)]
    assert bench(*args)[0] == 0
    (run,) = Store(tmp_path).runs()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that has ended: the owner is gone
    with sqlite3.connect(Store(tmp_path).path) as connection:
        connection.execute("UPDATE runs SET status = 'running', owner_host = ?, owner_pid = ?, lease_until = ?",
                           (socket.gethostname(), dead.pid, time.time() + 60))
    assert Store(tmp_path).runs() == []
    code, _, err = bench(*args)
    assert code == 0 and "every step of unfinished run" in err
    (completed,) = Store(tmp_path).runs()
    assert completed.run_id == run.run_id and completed.info["resumed"]
    assert len(Store(tmp_path).records()) == 2 * 60  # nothing run twice
    code, out, _ = bench("report", "--results", str(tmp_path), "--format", "csv", "--table", "clean")
    assert code == 0 and run.run_id in out


def test_ctrl_c_says_what_this_command_stored_and_what_was_kept(bench, tmp_path, monkeypatch):
    from bench import jobs

    evaluate_step = jobs.evaluate_step

    def interrupted_at_clean(defense, step, *args, **kwargs):
        if step.name == "clean":  # the last job: training and the attack come first
            raise KeyboardInterrupt
        return evaluate_step(defense, step, *args, **kwargs)

    monkeypatch.setattr(jobs, "evaluate_step", interrupted_at_clean)
    args = ["run", *FAST, "--no-audit", "--attack", "pgd-linf", "--attack-param", "steps=2", "--attack-param",
            "restarts=1", "--out", str(tmp_path)]
    code, _, stderr = bench(*args)
    assert code == 130 and stderr.count("\n") == 1
    # the checkpoint and the pgd-linf step
    assert stderr.startswith("bench: interrupted; completed steps are stored and the same command resumes: "
                             "this command stored 2 step(s) or checkpoint(s)"), stderr
    code, _, stderr = bench(*args)  # resumes, and is interrupted before it stores anything new
    assert code == 130
    assert stderr == ("bench: interrupted; nothing was stored by this command; whatever earlier commands stored is "
                      "kept, and the same command resumes from it\n")
    assert set(Store(tmp_path).records().attack) == {"pgd-linf"}
    monkeypatch.setattr(jobs, "evaluate_step", evaluate_step)
    assert bench(*args)[0] == 0
    (run,) = Store(tmp_path).runs()
    assert run.info["resumed"] and set(Store(tmp_path).records().attack) == {"pgd-linf", "clean"}


def test_sigterm_keeps_the_finished_steps_and_exits_143_with_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "run", "--dataset", "digits", "--epochs", "2", "--train-size", "300",
         "--test-size", "500", "--attack", "cw-l2", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path)
    lines = []
    for line in process.stderr:  # progress lines: wait until training is done and the attack runs
        lines.append(line)
        if "done: train" in line:
            break
    time.sleep(0.5)
    assert process.poll() is None, "the run ended before it could be terminated"
    process.send_signal(signal.SIGTERM)
    rest = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=60) == 143, lines + [rest]
    last = rest.strip().splitlines()[-1]
    assert last.startswith("bench: terminated (SIGTERM); completed steps are stored and the same command resumes"), rest
    assert "Traceback" not in rest
    (run,) = Store(tmp_path).runs(complete_only=False)
    assert run.status == "interrupted"  # handed back: the next command resumes it at once
    assert list((tmp_path / "checkpoints").glob("*.pt"))


def test_bench_eval_works_on_a_cifar10_folder_holding_only_the_test_split(bench, tmp_path):
    import torch
    from torch import nn

    from test_datasets import write_cifar

    write_cifar(tmp_path / "data" / "cifar-10-batches-py", {"test_batch": 12}, b"labels",
                ("batches.meta", b"label_names"), 10)
    (tmp_path / "tiny.py").write_text(
        "from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))\n")
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).state_dict(), tmp_path / "tiny.pt")
    code, stdout, stderr = bench("eval", "--model", f"{tmp_path / 'tiny.py'}:net", "--checkpoint", str(tmp_path / "tiny.pt"),
                                 "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--attack", "pgd-linf",
                                 "--epsilons", "0.01", "--attack-param", "steps=2", "--attack-param", "restarts=1",
                                 "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0, stderr
    records = Store(tmp_path / "out").records()
    # the audit's Square runs too; its transfer attack needs a training split, which is not there
    assert len(records) == 36 and set(records.attack) == {"clean", "pgd-linf", "square-linf"}
    (run,) = Store(tmp_path / "out").runs()
    assert run.dataset == "cifar10" and run.info["data_official"] == {"test_batch": False}

    code, stdout, stderr = bench("run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
                                 "--out", str(tmp_path / "run"))
    assert code == 2 and stderr.count("\n") == 1 and stdout == ""
    assert stderr.startswith("bench: error: cifar10: the training split is missing: expected data_batch_1")
    assert str(tmp_path / "data" / "cifar-10-batches-py") in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cores, load, extra, expected", [
    (8, 0.0, [], 4),  # idle: one thread per core, at most 4
    (3, 0.0, [], 3),
    (8, 6.5, [], 1),  # 1.5 idle cores: one thread
    (8, 0.0, ["--threads", "2"], 2),  # the option wins
])
def test_run_chooses_torch_threads_from_idle_cores(bench, tmp_path, monkeypatch, cores, load, extra, expected):
    import torch

    from bench import jobs
    from conftest import TEST_THREADS

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")  # restored after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    seen = []
    evaluate_step = jobs.evaluate_step

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return evaluate_step(*args, **kwargs)

    monkeypatch.setattr(jobs, "evaluate_step", recording)
    try:
        code, _, stderr = bench("run", *FAST, *extra, "--out", str(tmp_path))
        assert code == 0, stderr
        assert seen == [expected]
        assert os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == str(expected)  # for its workers
    finally:
        torch.set_num_threads(TEST_THREADS)


def test_run_respects_omp_num_threads_and_shares_cores_among_jobs(bench, tmp_path, monkeypatch):
    import torch

    from bench.threads import default_threads
    from conftest import TEST_THREADS

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads(jobs=2) == 3  # the user's choice
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert [default_threads(jobs) for jobs in (1, 2, 3, 8, 16)] == [4, 4, 2, 1, 1]
    monkeypatch.setenv("MKL_NUM_THREADS", "1")  # restored after the test
    try:
        code, _, stderr = bench("run", *FAST, "--jobs", "3", "--out", str(tmp_path))
        assert code == 0, stderr
        (run,) = Store(tmp_path).runs()
        assert run.info["worker_threads"] == 2  # 8 idle cores among 3 workers
    finally:
        torch.set_num_threads(TEST_THREADS)


def test_eval_says_how_many_images_and_which_attacks_before_any_work(bench, tmp_path, monkeypatch):
    from bench import evaluation

    def no_work(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate_step", no_work)
    (tmp_path / "tiny.py").write_text("from torch import nn\n\ndef net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    code, _, stderr = bench("eval", "--model", f"{tmp_path / 'tiny.py'}:net", "--attack", "pgd-linf", "--attack", "cw-l2",
                            "--epsilons", "linf=0.05,0.1")
    assert code == 130
    assert ("evaluating 500 digits test images (the whole test split; --test-size N for a seeded subset): clean, "
            "pgd-linf at 2 epsilon(s) (20 steps, 10 restarts), cw-l2 at 7 epsilon(s)") in stderr
    code, _, stderr = bench("eval", "--model", f"{tmp_path / 'tiny.py'}:net", "--test-size", "30")
    assert code == 130 and "evaluating 30 digits test images: clean\n" in stderr


def test_a_reader_that_leaves_early_is_not_an_error(tmp_path):
    """`bench list | head -1`: the closed pipe ends the command quietly, with status 0."""
    read, write = os.pipe()
    os.close(read)  # the reader has left before bench writes
    with subprocess.Popen([sys.executable, "-m", "bench.cli", "list"], stdout=write, stderr=subprocess.PIPE,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}) as process:
        os.close(write)
        assert process.wait(timeout=60) == 0
        assert process.stderr.read() == b""
