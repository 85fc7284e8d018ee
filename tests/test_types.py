"""The typed core: certificates and their one convention (no certificate: certified at no T,
T = 0 included), counts beside proportions, stores written before the ``certified`` column,
tidy CSV, and JSON rows in configuration order."""
from __future__ import annotations

import io
import json
import sqlite3

import pandas as pd
import pytest
import torch

from bench import metrics
from bench.reports.render import render, to_csv
from bench.reports.tables import build_tables
from bench.store import Run, Store
from bench.types import ABSTAIN, Certificate, Record

VERSIONS = {"torch": "2.13.0"}


def test_certificate_mask_covers_abstention_failed_tests_and_radius_zero():
    certificate = Certificate(torch.tensor([1, ABSTAIN, 2, 3]), torch.tensor([0.5, 0.7, 0.0, 0.2]), "l2")
    assert certificate.certified.tolist() == [True, False, False, True]
    assert certificate.radius.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.2])
    # an explicit mask can only take certificates away, never certify an abstention or radius 0
    explicit = Certificate(torch.tensor([1, ABSTAIN, 2, 3]), torch.tensor([0.5, 0.7, 0.0, 0.2]), "l2",
                           certified=torch.tensor([True, True, True, False]), confidence=0.95)
    assert explicit.certified.tolist() == [True, False, False, False]
    assert explicit.radius.tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])


def records(radii, certified_labels, correct, attack="clean", epsilon=0.0, certified=None):
    """Records of one run; true label 3; ``certified`` None leaves the flag to the stored-data rule."""
    rows = []
    for i, (radius, certified_label, right) in enumerate(zip(radii, certified_labels, correct)):
        flag = None if certified is None else int(certified[i])
        rows.append(Record(i, attack, None if attack == "clean" else "l2", epsilon, 3 if right else 4, 3, int(right),
                           None if attack == "clean" else epsilon, certified_label, radius, "l2", flag))
    return rows


@pytest.mark.parametrize("certified", [None, [0, 0, 0, 0]], ids=["derived", "stored"])
def test_no_radius_above_zero_certifies_nothing_at_t0_for_every_defense(certified):
    # PixelDP / RobustOpt style: the test failed, radius 0, label = prediction (3 = right)
    failed = metrics.records_frame(records([0.0] * 4, [3] * 4, [True] * 4, certified=certified))
    # smoothing style: abstention
    abstained = metrics.records_frame(records([0.0] * 4, [ABSTAIN] * 4, [True] * 4, certified=certified))
    for frame in (failed, abstained):
        at_zero = metrics.certified(frame, (0.0,))
        assert at_zero.certified_accuracy.item() == 0.0
        assert at_zero.robust_recall.item() == 0.0 and at_zero.robust_n.item() == 0


def test_certified_counts_by_hand_at_t0_and_above():
    # radius:   0.3  0.0  0.1  0.2(abstain)  0.05 (certified label wrong)
    frame = metrics.records_frame(records([0.3, 0.0, 0.1, 0.2, 0.05], [3, 3, 3, ABSTAIN, 4], [True] * 5))
    table = metrics.certified(frame, (0.0, 0.1, 0.25)).set_index("threshold")
    # certified: samples 0, 2, 4 (1 has radius 0, 3 abstained); with the true label: 0, 2
    assert table.loc[0.0, ["robust_n", "certified_correct", "n"]].tolist() == [3, 2, 5]
    assert table.loc[0.1, ["robust_n", "certified_correct"]].tolist() == [2, 2]
    assert table.loc[0.25, ["robust_n", "certified_correct"]].tolist() == [1, 1]
    assert table.loc[0.0, "robust_precision"] == pytest.approx(2 / 3)
    assert table.loc[0.0, "certified_accuracy"] == pytest.approx(2 / 5)


def test_epsilon_zero_is_the_clean_input_for_every_attack():
    clean = records([0.3, 0.3, 0.0], [3, 3, 3], [True, True, False])
    # an attack asked for epsilon 0 and stored something else there: the clean rows win
    at_zero = records([0.0, 0.0, 0.0], [3, 3, 3], [False, False, False], attack="pgd-l2", epsilon=0.0)
    at_half = records([0.1, 0.0, 0.0], [3, 3, 3], [True, False, False], attack="pgd-l2", epsilon=0.5)
    frame = metrics.records_frame(clean + at_zero + at_half)
    accuracy = metrics.accuracy_under_attack(frame).set_index("epsilon")
    assert accuracy.loc[0.0, ["correct", "n"]].tolist() == [2, 3]
    assert accuracy.loc[0.5, ["correct", "n"]].tolist() == [1, 3]
    certified = metrics.certified(frame, (0.0,))
    attacked = certified[certified.attack == "pgd-l2"].set_index("epsilon")
    assert attacked.loc[0.0, "robust_n"] == 2 and attacked.loc[0.5, "robust_n"] == 1


def old_store(directory):
    """A store as written before records had the ``certified`` column."""
    directory.mkdir()
    connection = sqlite3.connect(directory / "results.sqlite")
    connection.executescript("""
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, created TEXT NOT NULL, dataset TEXT NOT NULL,
            defense TEXT NOT NULL, label TEXT NOT NULL, params TEXT NOT NULL, spec TEXT NOT NULL,
            spec_hash TEXT NOT NULL, training_hash TEXT NOT NULL, seed INTEGER NOT NULL, versions TEXT NOT NULL,
            host TEXT NOT NULL, info TEXT NOT NULL, warnings TEXT NOT NULL, status TEXT NOT NULL);
        CREATE TABLE records (run_id TEXT NOT NULL, sample_index INTEGER NOT NULL, attack TEXT NOT NULL, norm TEXT,
            epsilon REAL NOT NULL, prediction INTEGER NOT NULL, label INTEGER NOT NULL, correct INTEGER NOT NULL,
            distance REAL, certified_label INTEGER, certified_radius REAL, certified_norm TEXT);
    """)
    connection.execute("INSERT INTO runs VALUES ('old1', '2025-01-01', 'digits', 'smoothing', 'smoothing', '{}', "
                       "'{}', 'h', 't', 0, '{}', 'host', '{}', '[]', 'complete')")
    connection.executemany("INSERT INTO records VALUES ('old1', ?, 'clean', NULL, 0, 3, 3, 1, NULL, ?, ?, 'l2')",
                           [(0, 3, 0.4), (1, ABSTAIN, 0.0), (2, 3, 0.0), (3, None, None)])
    connection.commit()
    connection.close()
    return Store(directory)


def test_stores_written_before_the_certified_column_are_migrated(tmp_path):
    store = old_store(tmp_path / "old")
    stored = store.records(["old1"]).sort_values("sample_index")
    assert stored.certified.tolist()[:3] == [1, 0, 0] and pd.isna(stored.certified.iloc[3])
    certified = build_tables(store, thresholds=(0.0,))["certified"]
    assert certified.robust_n.item() == 1 and certified.n.item() == 3


def make_run(run_id, label, created, defense="baseline"):
    spec = {"defense": defense, "dataset": "digits", "params": {}, "seed": 0}
    return Run(run_id=run_id, created=created, dataset="digits", defense=defense, label=label, params={},
               spec=spec, spec_hash=run_id, training_hash=run_id, seed=0, versions=VERSIONS, host="h",
               info={"num_test": 2, "eval_seconds": 1.0}, warnings=[])


def test_json_rows_follow_the_order_the_runs_were_asked_for_not_run_ids(tmp_path):
    orders = []
    # two identical commands whose random run ids sort in opposite orders
    for directory, ids in (("a", ("zzz", "aaa")), ("b", ("aaa", "zzz"))):
        store = Store(tmp_path / directory)
        for run_id, label in zip(ids, ("pixeldp", "baseline")):
            store.save_run(make_run(run_id, label, "2026-01-01T00:00:00+00:00"),
                           records([0.0, 0.0], [None, None], [True, False]))
        data = json.loads(render(build_tables(store), "json"))
        orders.append([row["label"] for row in data["clean"]])
        assert [row["label"] for row in data["cost"]] == ["pixeldp", "baseline"]
    assert orders == [["pixeldp", "baseline"], ["pixeldp", "baseline"]]


def test_each_table_is_a_tidy_csv_that_pandas_reads_back(tmp_path):
    store = Store(tmp_path)
    run = make_run("r1", "pixeldp", "2026-01-01T00:00:00+00:00", defense="pixeldp")
    store.save_run(run, records([0.3, 0.0, 0.1], [3, 3, 3], [True, True, False])
                   + records([0.1, 0.0, 0.0], [3, 3, 3], [True, False, False], attack="pgd-l2", epsilon=0.5))
    tables = build_tables(store, thresholds=(0.0, 0.1))
    for name, table in tables.items():
        back = pd.read_csv(io.StringIO(to_csv(table)))
        assert list(back.columns) == list(table.columns) and len(back) == len(table), name
    back = pd.read_csv(io.StringIO(to_csv(tables["accuracy_under_attack"])))
    assert back.set_index("epsilon").accuracy.to_dict() == pytest.approx({0.0: 2 / 3, 0.5: 1 / 3})
    assert json.loads(back.params.iloc[0]) == {}


def test_epsilons_per_attack_then_per_norm_then_shared_then_the_attacks_default():
    from bench.spec import epsilons_for

    keyed = {"linf": [0.1], "pgd-l2": [1.0], "l2": [0.5]}
    assert epsilons_for(keyed, "pgd-linf", "linf", (0.3,)) == [0.1]
    assert epsilons_for(keyed, "pgd-l2", "l2", (3.0,)) == [1.0]
    assert epsilons_for(keyed, "cw-l2", "l2", (3.0,)) == [0.5]
    assert epsilons_for({"linf": [0.1]}, "cw-l2", "l2", (3.0, 4.0)) == [3.0, 4.0]
    assert epsilons_for([0.2], "cw-l2", "l2", (3.0,)) == [0.2]
    assert epsilons_for(None, "cw-l2", "l2", (3.0,)) == [3.0]


def parse_run(*argv):
    from bench.cli import build_parser, merged_options, specs_from
    from bench.validation import validate_request

    specs = specs_from(merged_options(build_parser().parse_args(["run", *argv])))
    validate_request(specs)
    return specs


def test_epsilons_option_per_norm_and_its_errors():
    from bench.errors import BenchError

    [spec] = parse_run("--attack", "pgd-linf", "--attack", "pgd-l2", "--epsilons", "linf=0.05,0.1",
                       "--epsilons", "l2=0.5,1")
    # the audit attacks run at the epsilons of their norm's gradient attacks
    assert spec.epsilons == {"linf": [0.05, 0.1], "l2": [0.5, 1.0], "square-linf": [0.05, 0.1],
                             "transfer-linf": [0.05, 0.1], "square-l2": [0.5, 1.0], "transfer-l2": [0.5, 1.0]}
    assert spec.attacks == ["pgd-linf", "pgd-l2", "square-linf", "transfer-linf", "square-l2", "transfer-l2"]
    assert parse_run("--attack", "pgd-linf", "--epsilons", "0.1")[0].epsilons == [0.1]
    with pytest.raises(BenchError, match="'l3' is neither a norm"):
        parse_run("--attack", "pgd-linf", "--epsilons", "l3=0.1")
    with pytest.raises(BenchError, match="no selected attack has norm l2"):
        parse_run("--attack", "pgd-linf", "--epsilons", "l2=0.5")
    with pytest.raises(BenchError, match="not both"):
        parse_run("--attack", "pgd-linf", "--epsilons", "0.1", "--epsilons", "linf=0.2")
    with pytest.raises(BenchError, match="given twice"):
        parse_run("--attack", "pgd-linf", "--epsilons", "linf=0.1", "--epsilons", "linf=0.2")


def test_a_run_attacks_each_norm_at_its_own_epsilons(bench, tmp_path):
    from conftest import FAST

    code, _, err = bench("run", *FAST, "--attack", "pgd-linf", "--attack", "pgd-l2", "--attack-param", "steps=2",
                         "--epsilons", "linf=0.05", "--epsilons", "l2=0.5,1", "--out", str(tmp_path))
    assert code == 0, err
    code, out, _ = bench("report", "--results", str(tmp_path), "--format", "json")
    rows = json.loads(out)["accuracy_under_attack"]
    assert sorted(r["epsilon"] for r in rows if r["attack"] == "pgd-linf") == [0.0, 0.05]
    assert sorted(r["epsilon"] for r in rows if r["attack"] == "pgd-l2") == [0.0, 0.5, 1.0]
