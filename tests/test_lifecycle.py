"""One run lifecycle (``bench.lifecycle.RunRecorder``) behind both doors: the grid (``bench run``)
and the public API (``bench.evaluate``) store the same run with the same records and summary."""
from __future__ import annotations

import sqlite3

import pandas as pd
import pytest
from torch import nn

import bench
from bench.cli import main
from bench.errors import BenchError
from bench.lifecycle import RunInfo
from bench.runner import build_defense
from bench.spec import RunSpec
from bench.store import RunStatus, Store

ATTACK = ["--attack", "pgd-linf", "--no-audit", "--epsilons", "0.1", "--attack-param", "steps=3"]
# What differs by design between the doors: how the model got there and who ran it.
HOW_IT_RAN = {"argv", "num_train", "train_seconds", "eval_seconds", "model_train_seconds", "reused_checkpoint"}


def stored(out) -> tuple[pd.DataFrame, object]:
    store = Store(out)
    (run,) = store.runs()
    records = store.records([run.run_id]).drop(columns="run_id")
    return records.sort_values(["attack", "epsilon", "sample_index"]).reset_index(drop=True), run


def test_the_grid_and_bench_evaluate_store_the_same_run(tmp_path):
    grid, api = tmp_path / "grid", tmp_path / "api"
    assert main(["run", "--dataset", "digits", "--defense", "baseline", "--epochs", "2", "--batch-size", "16", "--train-size", "100",
                 "--test-size", "20", *ATTACK, "--quiet", "--out", str(grid)]) == 0
    grid_records, grid_run = stored(grid)

    # The grid's trained model, evaluated through the public API into a store of its own.
    spec = RunSpec(**grid_run.spec)
    dataset = bench.load_dataset("digits")
    defense, _ = build_defense(spec, dataset, "cpu")
    defense.load_state_dict(Store(grid).load_checkpoint(grid_run.training_hash))
    results = bench.evaluate(defense, "digits", ["pgd-linf"], epsilons=[0.1], attack_params={"steps": 3},
                             test_size=20, seed=spec.seed, audit=False, store=api)
    api_records, api_run = stored(api)

    pd.testing.assert_frame_equal(api_records, grid_records)
    assert len(grid_records) == 2 * 20
    assert api_run.status == grid_run.status == RunStatus.COMPLETE
    assert api_run.warnings == grid_run.warnings
    assert set(api_run.info) == set(grid_run.info) == set(RunInfo.__dataclass_fields__) - {"errors"}
    assert {k: v for k, v in api_run.info.items() if k not in HOW_IT_RAN} == \
        {k: v for k, v in grid_run.info.items() if k not in HOW_IT_RAN}
    assert grid_run.info["num_train"] == 100 and api_run.info["num_train"] is None
    assert grid_run.info["reused_checkpoint"] is False and api_run.info["reused_checkpoint"] is True
    # What bench.evaluate hands back is what it stored.
    assert results.runs["info"][0] == api_run.info and len(results.records) == len(api_records)


def test_a_run_in_memory_has_the_summary_of_a_stored_one(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    in_memory = bench.evaluate(model, "digits", ["pgd-linf"], epsilons=[0.1], attack_params={"steps": 2},
                               test_size=10, audit=False)
    in_store = bench.evaluate(model, "digits", ["pgd-linf"], epsilons=[0.1], attack_params={"steps": 2},
                              test_size=10, audit=False, store=tmp_path)
    memory_info, store_info = in_memory.runs["info"][0], in_store.runs["info"][0]
    assert set(memory_info) == set(store_info)
    assert {k: v for k, v in memory_info.items() if k != "eval_seconds"} == \
        {k: v for k, v in store_info.items() if k != "eval_seconds"}
    order = ["attack", "epsilon", "sample_index"]
    pd.testing.assert_frame_equal(in_memory.records.drop(columns="run_id").sort_values(order).reset_index(drop=True),
                                  in_store.records.drop(columns="run_id").sort_values(order).reset_index(drop=True))


def test_a_stored_status_outside_the_lifecycle_is_a_clear_error(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    bench.evaluate(model, "digits", test_size=10, audit=False, store=tmp_path)
    with sqlite3.connect(tmp_path / "results.sqlite") as connection:
        connection.execute("UPDATE runs SET status = 'done'")
    with pytest.raises(BenchError, match="has status 'done'; expected one of running, complete, interrupted, failed"):
        Store(tmp_path).runs()
