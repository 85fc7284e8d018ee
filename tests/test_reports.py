"""Reports from fabricated per-sample records with answers computed by hand, the CLI around them,
config profiles and [[runs]] sweeps, and the experiments/*.toml files."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import build_parser, merged_options, specs_from
from bench.errors import BenchError
from bench.store import Run, Store
from conftest import FAST
from bench.confidence import clopper_pearson_interval
from bench.reports.compare import compare
from bench.reports.display import FLAG_NOTE, RANKING_RULE, display_tables
from bench.reports.html import build_html
from bench.reports.labels import FLAG
from bench.reports.load import load_results
from bench.reports.render import render
from bench.reports.tables import build_tables, interval_rank
from bench.types import ABSTAIN, Record

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = {"python": "3.11", "torch": "2.13.0", "numpy": "2.4.0", "foolbox": "3.3.4"}


def record(i, attack, norm, eps, correct, certified_label=None, radius=None, label=3):
    """One stored record; ``certified`` is left for the store to derive (as for stores written before it)."""
    prediction = label if correct else (label + 1) % 10
    return Record(i, attack, norm, eps, prediction, label, int(correct), None if attack == "clean" else eps,
                  certified_label, radius, None if radius is None else "l2")


def correct_set(attack, norm, eps, indices, n=10):
    return [record(i, attack, norm, eps, i in indices) for i in range(n)]


def make_run(run_id, dataset, defense, label, params, info, warnings=(), created="2026-01-01T00:00:00+00:00", seed=0):
    spec = {"defense": defense, "dataset": dataset, "params": params, "seed": seed, "epochs": 2}
    return Run(run_id=run_id, created=created, dataset=dataset, defense=defense, label=label, params=params,
               spec=spec, spec_hash=run_id + "-spec", training_hash=run_id + "-train", seed=seed,
               versions=VERSIONS, host="testhost", info=info, warnings=list(warnings))


# Clean radii and certified labels of the fabricated PixelDP run (true label 3 everywhere; sample 9
# is certified with the wrong label). Under pgd-l2 at 0.5 the certificates shrink.
CLEAN_RADII = [0.0, 0.02, 0.05, 0.08, 0.1, 0.12, 0.2, 0.3, 0.5, 1.0]
CLEAN_CERT_LABELS = [3] * 9 + [4]
ATTACK_RADII = [0.0, 0.0, 0.06, 0.06, 0.11, 0.11, 0.2, 0.0, 0.3, 0.5]
ATTACK_CERT_LABELS = [3] * 7 + [4, 4, 4]


def fabricate(directory: Path) -> Store:
    """Three runs: mnist baseline (two attack norms, two L2 attacks), mnist PixelDP (certifies),
    svhn baseline (one attack, a sanity warning)."""
    store = Store(directory)
    info = {"train_seconds": 12.0, "eval_seconds": 3.0, "num_train": 100, "num_test": 10, "reused_checkpoint": False,
            "device": "cpu"}
    records = correct_set("clean", None, 0.0, set(range(9)))
    records += correct_set("pgd-linf", "linf", 0.1, set(range(6))) + correct_set("pgd-linf", "linf", 0.3, set(range(3)))
    records += correct_set("pgd-l2", "l2", 0.5, set(range(8))) + correct_set("pgd-l2", "l2", 1.0, set(range(4)))
    records += correct_set("cw-l2", "l2", 0.5, set(range(6)) | {8, 9}) + correct_set("cw-l2", "l2", 1.0, {0, 1, 2, 3, 9})
    store.save_run(make_run("aaaa00000001", "mnist", "baseline", "baseline", {"model": "mnist-cnn"}, info), records)

    pixeldp = [record(i, "clean", None, 0.0, i != 9, CLEAN_CERT_LABELS[i], CLEAN_RADII[i]) for i in range(10)]
    pixeldp += [record(i, "pgd-l2", "l2", 0.5, i < 7, ATTACK_CERT_LABELS[i], ATTACK_RADII[i]) for i in range(10)]
    params = {"L": 0.1, "model": "mnist-cnn"}
    store.save_run(make_run("bbbb00000002", "mnist", "pixeldp", "pixeldp(L=0.1)", params,
                            {**info, "train_seconds": 120.0, "eval_seconds": 30.0}), pixeldp)

    svhn = correct_set("clean", None, 0.0, set(range(7))) + correct_set("pgd-linf", "linf", 0.03, {0, 1})
    svhn += correct_set("pgd-linf", "linf", 0.1, {0, 1, 2, 3})
    store.save_run(make_run("cccc00000003", "svhn", "baseline", "baseline", {"model": "wrn"}, info,
                            ["pgd-linf: accuracy rises with epsilon (0.700, 0.200, 0.400); the attack may be too weak"]),
                   svhn)
    return store


@pytest.fixture
def store(tmp_path) -> Store:
    return fabricate(tmp_path / "results")


def rows(table, **where):
    selected = table
    for key, value in where.items():
        selected = selected[np.isclose(selected[key], value)] if isinstance(value, float) else selected[selected[key] == value]
    return selected


# -- numbers -----------------------------------------------------------------------------------
def test_clopper_pearson_matches_known_values():
    low, high = clopper_pearson_interval([0, 5, 10], [10, 10, 10])
    # exact 95% limits: 0/10 -> [0, 0.3085]; 5/10 -> [0.1871, 0.8129]; 10/10 -> [0.6915, 1]
    # to the 5 decimals of published tables
    assert np.round(low, 5).tolist() == [0.0, 0.18709, 0.6915]
    assert np.round(high, 5).tolist() == [0.3085, 0.81291, 1.0]
    assert np.isnan(clopper_pearson_interval(0, 0)[0]).all()


def test_clean_and_attacked_accuracy_with_worst_case_and_intervals(store):
    tables = build_tables(store)
    clean = tables["clean"]
    assert rows(clean, run_id="aaaa00000001").accuracy.item() == 9 / 10
    assert rows(clean, run_id="cccc00000003").n.item() == 10
    attacked = tables["accuracy_under_attack"]
    base = rows(attacked, run_id="aaaa00000001")
    assert rows(base, attack="pgd-linf", epsilon=0.3).accuracy.item() == 3 / 10
    # worst case over pgd-l2 and cw-l2 per sample: {0..7} & {0..5, 8, 9} = {0..5}; {0..3} & {0..3, 9} = {0..3}
    assert rows(base, attack="worst-case", norm="l2", epsilon=0.5).accuracy.item() == 6 / 10
    assert rows(base, attack="worst-case", norm="l2", epsilon=1.0).accuracy.item() == 4 / 10
    assert rows(base, attack="worst-case", norm="linf").empty  # one linf attack: no worst-case row
    row = rows(base, attack="pgd-l2", epsilon=0.5)
    low, high = clopper_pearson_interval(8, 10)
    # the same function on the same counts: exact
    assert row.ci_low.item() == float(low) and row.ci_high.item() == float(high)


def test_certified_accuracy_and_robust_precision_recall_by_hand(store):
    certified = build_tables(store)["certified"]
    assert set(certified.run_id) == {"bbbb00000002"}
    clean = rows(certified, attack="clean")
    # radius >= T and certified label right: T=0.05 -> samples 2..8; T=0.1 -> 4..8; T=0.5 -> 8
    assert rows(clean, threshold=0.05).certified_accuracy.item() == 7 / 10
    assert rows(clean, threshold=0.1).certified_accuracy.item() == 5 / 10
    assert rows(clean, threshold=0.5).certified_accuracy.item() == 1 / 10
    attacked = rows(certified, attack="pgd-l2", epsilon=0.5)
    assert set(attacked.attack_norm) == {"l2"} and clean.attack_norm.isna().all()
    # T=0.1: robust {4,5,6,8,9}, of which right {4,5,6} -> precision 3/5, recall 5/10
    at_01 = rows(attacked, threshold=0.1)
    assert at_01.robust_precision.item() == 3 / 5 and at_01.robust_recall.item() == 5 / 10
    assert at_01.robust_n.item() == 5
    low, high = clopper_pearson_interval(3, 5)
    assert at_01.robust_precision_ci_low.item() == float(low) and at_01.robust_precision_ci_high.item() == float(high)
    # T=0.05: robust {2,3,4,5,6,8,9}, right {2..6} -> 5/7
    assert rows(attacked, threshold=0.05).robust_precision.item() == 5 / 7
    # nothing certified at T=0.6 under attack: precision undefined, recall 0
    at_06 = rows(attacked, threshold=0.6)
    assert np.isnan(at_06.robust_precision.item()) and at_06.robust_recall.item() == 0.0


def random_records(rng: np.random.Generator, n: int, certifies: bool) -> list[Record]:
    """Records of one run drawn at random: two linf attacks (a worst case) and one l2 attack, each
    at epsilon 0 (replaced by clean) and above; points missing from some steps; correctness drawn
    independently per step (so points wrong clean and right attacked, as randomized defenses give);
    distances on a 0.01 grid (ties) and some absent; certificates with abstentions, radius 0,
    wrong certified labels and stored flags None, 0 or 1."""
    records = []
    steps = [("clean", None, 0.0)] + [(a, "linf", e) for a in ("pgd-linf", "fgsm-linf") for e in (0.0, 0.1, 0.3)]
    steps += [("cw-l2", "l2", e) for e in (0.0, 0.5)]
    for attack, norm, epsilon in steps:
        for i in range(n):
            if attack != "clean" and rng.random() < 0.15:
                continue
            label, right = i % 4, bool(rng.random() < (0.8 if attack == "clean" else 0.4))
            distance = None if attack == "clean" or rng.random() < 0.1 else round(float(rng.uniform(0, 0.5)), 2)
            cert_label = radius = cert_norm = flag = None
            if certifies:
                cert_label = int(rng.choice([label, label, label, ABSTAIN, (label + 1) % 4]))
                radius, cert_norm = float(rng.choice([0.0, 0.05, 0.1, 0.1, 0.25, 0.6, 1.0])), "l2"
                flag = [None, 0, 1, 1, 1][int(rng.integers(5))]
            records.append(Record(i, attack, norm, epsilon, label if right else label + 1, label, int(right), distance,
                                  cert_label, radius, cert_norm, flag))
    return records


def expected_tables(records: list[Record], thresholds) -> tuple[dict, dict, dict, dict]:
    """The counts of one run computed directly from its records with plain Python and numpy:
    clean (correct, n); per (attack, epsilon) robust (correct, n) with epsilon 0 = clean and the
    linf worst case; per (attack, epsilon, T) certified (certified_correct, robust_n, n); per attack
    the median perturbation."""
    clean = {r.sample_index: r.correct for r in records if r.attack == "clean"}
    clean_counts = (sum(clean.values()), len(clean))
    verdicts: dict = {}  # (attack, epsilon) -> {sample: verdict}
    for r in records:
        if r.attack != "clean" and r.epsilon > 0:
            verdicts.setdefault((r.attack, r.epsilon), {})[r.sample_index] = r.correct * clean.get(r.sample_index, 1)
    for epsilon in (0.1, 0.3):
        points: dict = {}
        for attack in ("pgd-linf", "fgsm-linf"):
            for i, v in verdicts.get((attack, epsilon), {}).items():
                points[i] = min(points.get(i, 1), v)
        verdicts[("worst-case", epsilon)] = points
    attacked = {key: (sum(v.values()), len(v)) for key, v in verdicts.items()}
    for attack in ("pgd-linf", "fgsm-linf", "cw-l2", "worst-case"):
        attacked[(attack, 0.0)] = clean_counts
    certified = {}
    groups: dict = {}
    for r in records:
        if r.certified_radius is not None:
            groups.setdefault((r.attack, r.epsilon), []).append(r)
    for (attack, epsilon), group in groups.items():
        for t in thresholds:
            at = [r for r in group if r.certified is not False and r.certified != 0 and r.certified_label != ABSTAIN
                  and r.certified_radius > 0 and r.certified_radius >= t]
            certified[(attack, epsilon, t)] = (sum(r.certified_label == r.label for r in at), len(at), len(group))
    for attack in ("pgd-linf", "fgsm-linf", "cw-l2"):
        for t in thresholds:
            if ("clean", 0.0, t) in certified:
                certified[(attack, 0.0, t)] = certified[("clean", 0.0, t)]
    medians = {}
    for attack in ("pgd-linf", "fgsm-linf", "cw-l2"):
        smallest: dict = {}
        for r in records:
            if r.attack == attack and r.distance is not None:
                broken = r.distance if r.correct == 0 else np.inf
                smallest[r.sample_index] = min(smallest.get(r.sample_index, np.inf), broken)
        medians[attack] = float(np.median(list(smallest.values())))
    return {"clean": clean_counts}, attacked, certified, medians


def test_sql_tables_match_counts_computed_directly_from_random_records(tmp_path):
    from bench.api import Results

    rng = np.random.default_rng(7)
    store = Store(tmp_path)
    thresholds = (0.0, 0.05, 0.1, 0.3, 1.0)
    runs, drawn = [], {}
    for k, n in enumerate((23, 30, 41)):
        run = make_run(f"rand{k}", "mnist", "pixeldp" if k != 1 else "baseline", f"config{k}", {"k": k}, {"num_test": n})
        drawn[run.run_id] = random_records(rng, n, certifies=k != 1)
        store.save_run(run, drawn[run.run_id])
        runs.append(dataclasses.replace(run, status="complete"))
    tables = build_tables(store, thresholds)
    in_memory = Results.from_runs(runs, [(run_id, r) for run_id, rs in drawn.items() for r in rs])
    in_memory.thresholds = thresholds
    for name in ("clean", "accuracy_under_attack", "certified"):  # the same SQL on an in-memory copy
        pd.testing.assert_frame_equal(in_memory.tables[name], tables[name])
    for run_id, records in drawn.items():
        clean, attacked, certified, medians = expected_tables(records, thresholds)
        row = rows(tables["clean"], run_id=run_id)
        assert (row.correct.item(), row.n.item()) == clean["clean"]
        under = rows(tables["accuracy_under_attack"], run_id=run_id)
        assert {(r.attack, r.epsilon): (r.correct, r.n) for r in under.itertuples()} == attacked
        for r in under[under.attack != "worst-case"].itertuples():
            assert r.median_perturbation == medians[r.attack]
        table = rows(tables["certified"], run_id=run_id)
        assert {(r.attack, r.epsilon, r.threshold): (r.certified_correct, r.robust_n, r.n)
                for r in table.itertuples()} == certified
        assert (table.attack_norm.dropna() == table.attack.map({"pgd-linf": "linf", "fgsm-linf": "linf", "cw-l2": "l2"})
                .dropna()).all()
    assert np.isfinite(tables["accuracy_under_attack"].median_perturbation).any()


def test_cost_table_comes_from_run_info(store):
    cost = build_tables(store)["cost"].set_index("run_id")
    assert cost.loc["bbbb00000002", "train_seconds"] == 120.0
    assert cost.loc["bbbb00000002", "eval_ms_per_image"] == 3000.0  # 30 s * 1000 / 10 images: exact
    assert cost.loc["aaaa00000001", "num_test"] == 10
    assert cost.loc["aaaa00000001", "model_train_seconds"] == 12.0


def test_a_run_that_reused_a_checkpoint_is_charged_the_training_of_its_model(tmp_path):
    store = Store(tmp_path)
    trained = {"train_seconds": 50.0, "eval_seconds": 1.0, "num_test": 10, "reused_checkpoint": False}
    reused = {"train_seconds": 0.2, "eval_seconds": 2.0, "num_test": 10, "reused_checkpoint": True}
    for run_id, info, created in (("first", trained, "2026-01-01T00:00:00"), ("second", reused, "2026-01-01T00:01:00")):
        run = make_run(run_id, "mnist", "baseline", "baseline", {}, info, created=created)
        run.training_hash = "same-model"
        store.save_run(run, correct_set("clean", None, 0.0, {0}))
    cost = build_tables(store)["cost"].set_index("run_id")
    assert cost.loc["second", "train_seconds"] == 0.2 and cost.loc["second", "model_train_seconds"] == 50.0


def test_where_filters_runs_by_column_spec_field_or_parameter(store):
    assert set(build_tables(store, where=[("dataset", "svhn")])["clean"].run_id) == {"cccc00000003"}
    assert set(build_tables(store, where=[("L", "0.1")])["clean"].run_id) == {"bbbb00000002"}
    both = build_tables(store, where=[("defense", "baseline"), ("dataset", "mnist"), ("dataset", "svhn")])
    assert set(both["clean"].run_id) == {"aaaa00000001", "cccc00000003"}
    with pytest.raises(BenchError, match="no run has a field 'nosuch'"):
        build_tables(store, where=[("nosuch", "1")])


def test_json_keeps_the_contract_and_adds_intervals(store):
    data = json.loads(render(build_tables(store), "json"))
    assert set(data) == {"clean", "accuracy_under_attack", "certified", "cost", "diagnostics", "ranking"}
    for row in data["clean"]:
        assert set(row) >= {"run_id", "dataset", "defense", "label", "params", "accuracy", "n", "ci_low", "ci_high"}
    assert isinstance(data["clean"][0]["params"], dict)
    assert set(data["certified"][0]) >= {"attack", "epsilon", "norm", "threshold", "certified_accuracy",
                                         "robust_precision", "robust_recall", "n", "robust_n"}


def test_human_tables_pivot_epsilons_and_carry_intervals_and_counts(store):
    shown = display_tables(build_tables(store))
    assert list(shown) == ["Ranking: mnist, L2", "Ranking: mnist, L∞", "Ranking: svhn, L∞",
                           "Clean accuracy", "Accuracy under attack: mnist, L2", "Accuracy under attack: mnist, L∞",
                           "Accuracy under attack: svhn, L∞", "Certified accuracy",
                           "Robust precision under attack: mnist, L2 attacks",
                           "Robust recall under attack: mnist, L2 attacks", "Cost"]
    attack = shown["Accuracy under attack: mnist, L2"]
    worst = attack[attack.attack == "worst-case"]
    assert worst["ε=0.5"].item() == "0.600 [0.262, 0.878]" and worst["n"].item() == "10"
    assert worst["ε=0"].item().startswith("0.900")
    baseline = attack[attack.configuration == "baseline"]
    assert baseline.attack.tolist() == ["cw-l2", "pgd-l2", "worst-case"]
    assert list(attack.columns) == ["configuration", "attack", "ε=0", "ε=0.5", "ε=1", "n", "median min. perturbation"]
    assert attack[attack.attack == "worst-case"]["median min. perturbation"].eq("–").all()
    certified = shown["Certified accuracy"]
    assert [c for c in certified.columns if c.startswith("T=")] == ["T=0", "T=0.05", "T=0.1", "T=0.2", "T=0.3", "T=0.5", "T=1"]
    precision = shown["Robust precision under attack: mnist, L2 attacks"]
    assert precision[precision["T"] == 0.1]["ε=0.5"].item().startswith("0.600") and "n=5" in precision["ε=0.5"].iloc[1]
    markdown = render(build_tables(store), "md")
    assert "Clopper-Pearson" in markdown and "| worst-case" in markdown
    latex = render(build_tables(store), "latex")
    assert latex.count(r"\begin{tabular}") == 11 and r"\toprule" in latex and "pixeldp(L=0.1)" in latex


def test_same_label_twice_in_a_dataset_gets_the_differing_spec_field(tmp_path):
    store = Store(tmp_path)
    info = {"train_seconds": 1.0, "eval_seconds": 1.0, "num_train": 1, "num_test": 10}
    for run_id, seed in (("r1", 1), ("r2", 2)):
        store.save_run(make_run(run_id, "mnist", "baseline", "baseline", {}, info, seed=seed),
                       correct_set("clean", None, 0.0, {0}))
    configs = set(build_tables(store)["clean"].config)
    assert configs == {"baseline [seed=1]", "baseline [seed=2]"}


def test_compare_lists_changed_metrics_and_setup(store):
    comparison = compare(store, "aaaa", "bbbb")
    setup = comparison["setup"].set_index("field")
    assert setup.loc["defense", "B"] == "pixeldp" and "spec.params.L" in setup.index
    metrics = comparison["metrics"]
    clean = metrics[(metrics.metric == "accuracy") & (metrics.attack == "clean")]
    assert clean.change.item() == "+0.000"
    l2 = metrics[(metrics.metric == "accuracy") & (metrics.attack == "pgd-l2") & (metrics.epsilon == "0.5")]
    assert l2.value_a.item() == 8 / 10 and l2.value_b.item() == 7 / 10
    assert l2.change.item() == "-0.100"
    certified = metrics[metrics.metric == "certified accuracy"]
    assert certified.A.eq("–").all() and not certified.B.eq("–").any()
    with pytest.raises(BenchError, match="matches no run"):
        compare(store, "zzzz", "aaaa")


# -- ranking: who wins per dataset, norm and epsilon ---------------------------------------------
def test_interval_rank_is_one_plus_the_intervals_entirely_above():
    # [0.8, 0.9] and [0.5, 0.85] overlap: both 1; [0.25, 0.6] lies below [0.8, 0.9] only: 2;
    # [0.1, 0.3] lies below the first two but overlaps [0.25, 0.6]: 3
    assert interval_rank([0.8, 0.5, 0.1, 0.25], [0.9, 0.85, 0.3, 0.6]) == [1, 1, 3, 2]
    assert interval_rank([0.5, 0.7], [0.7, 0.9]) == [1, 1]  # touching intervals overlap: a tie
    assert interval_rank([0.71, 0.5], [0.9, 0.7]) == [1, 2]  # separated by a hair: ranked
    # docs/reports.md's example: B overlaps A but lies below C
    assert interval_rank([0.5, 0.3, 0.65], [0.9, 0.6, 0.95]) == [1, 2, 1]


def ranking_store(directory: Path) -> Store:
    """One dataset, L-inf at 0.1 and 0.3 (counts out of n; the attacked correct points are a
    subset of the clean ones, so accuracy under attack is the count / n):

    config     n    clean   0.1                    0.3
    strong     100  95      90 [0.824, 0.951]      80 [0.708, 0.873]
    weak       100  94      30 [0.212, 0.400]      10 [0.049, 0.176]
    small      20   19      12 [0.361, 0.809]       4 [0.057, 0.437]
    masked     100  99      pgd 99, square 97      pgd 95, square 60   (diagnostics fired)
                            worst 97 [0.915, 0.994] worst 60 [0.497, 0.697]
    """
    store = Store(directory)

    def attacked(attack, counts, n):
        return [r for eps, k in zip((0.1, 0.3), counts) for r in correct_set(attack, "linf", eps, set(range(k)), n)]

    for run_id, label, n, clean, counts in (("r1", "strong", 100, 95, (90, 80)), ("r2", "weak", 100, 94, (30, 10)),
                                            ("r3", "small", 20, 19, (12, 4))):
        store.save_run(make_run(run_id, "toy", "baseline", label, {}, {"num_test": n}),
                       correct_set("clean", None, 0.0, set(range(clean)), n) + attacked("pgd-linf", counts, n))
    fired = {"num_test": 100, "diagnostics": [{"name": "gradient-free-wins-linf", "fired": True, "count": 37, "n": 100,
                                               "message": "gradient-free-wins (linf): the defense masks its gradients"}]}
    store.save_run(make_run("r4", "toy", "baseline", "masked", {}, fired),
                   correct_set("clean", None, 0.0, set(range(99)), 100) + attacked("pgd-linf", (99, 95), 100)
                   + attacked("square-linf", (97, 60), 100))
    return store


def test_ranking_ties_where_intervals_overlap_and_names_a_clear_winner(tmp_path):
    ranking = build_tables(ranking_store(tmp_path))["ranking"]
    ranks = {(row.config.replace(f" {FLAG}", ""), row.epsilon): row.rank for row in ranking.itertuples()}
    # clean: every interval overlaps every other ([0.887, 0.984], [0.874, 0.978], [0.751, 0.999], [0.946, 1])
    assert [ranks[(c, 0.0)] for c in ("strong", "weak", "small", "masked")] == [1, 1, 1, 1]
    # 0.1: strong and masked overlap (0.915 < 0.951): both 1; weak and small lie below both and overlap
    # each other (0.361 < 0.400): both 3
    assert [ranks[(c, 0.1)] for c in ("strong", "weak", "small", "masked")] == [1, 3, 3, 1]
    # 0.3: strong wins alone (0.708 > 0.697); masked 2; weak and small overlap below it: 3
    assert [ranks[(c, 0.3)] for c in ("strong", "weak", "small", "masked")] == [1, 3, 3, 2]
    masked = ranking[ranking.config.str.startswith("masked")]
    assert masked.flagged.all() and masked.config.str.contains(FLAG, regex=False).all()
    assert not ranking[~ranking.config.str.startswith("masked")].flagged.any()
    # the flagged run is ranked on its worst case over pgd and the audit's square attack, not on pgd
    at_03 = masked[np.isclose(masked.epsilon, 0.3)]
    assert at_03.attack.item() == "worst-case" and at_03.accuracy.item() == 0.6
    assert set(ranking[ranking.config == "small"].n) == {20}


def test_ranking_is_a_json_list(tmp_path):
    data = json.loads(render(build_tables(ranking_store(tmp_path)), "json"))
    rows = data["ranking"]
    assert len(rows) == 4 * 3  # four configurations, epsilons 0, 0.1, 0.3, one norm
    assert set(rows[0]) == {"dataset", "norm", "epsilon", "config", "run_id", "attack", "accuracy", "ci_low", "ci_high",
                            "n", "rank", "flagged"}
    weak = next(r for r in rows if r["config"] == "weak" and r["epsilon"] == 0.1)
    assert (weak["rank"], weak["accuracy"], weak["n"], weak["attack"], weak["flagged"]) == (3, 0.3, 100, "pgd-linf", False)
    assert [r["config"] for r in rows[:3]] == ["strong"] * 3  # the configurations' order


def test_ranking_and_n_notes_in_markdown_and_html(tmp_path):
    store = ranking_store(tmp_path)
    tables = build_tables(store)
    markdown = render(tables, "md")
    ranking = markdown.split("## Ranking: toy, L∞")[1].split("## ")[0]
    assert RANKING_RULE in ranking
    assert "| strong " in ranking and "| 1 (0.900) | 1 (0.800) |" in ranking
    assert "| 3 (0.600) | 3 (0.200) |" in ranking  # small: 12/20 at 0.1, 4/20 at 0.3
    assert f"masked {FLAG}" in ranking and FLAG_NOTE in ranking
    note = "Note: n differs in this table: n = 20, 100;"
    assert note in ranking
    assert note in markdown.split("## Accuracy under attack: toy, L∞")[1].split("## ")[0]
    assert note in markdown.split("## Clean accuracy")[1].split("## ")[0]
    assert "n differs" not in render(build_tables(fabricate(tmp_path / "same-n")), "md")  # n = 10 everywhere
    page = build_html(display_tables(tables), [], load_results(store).runs)
    assert page.index('id="warnings"') < page.index('id="ranking"') < page.index('id="table-ranking:-toy,-l∞"') \
        < page.index('id="tables"')
    assert page.count("n differs in this table: n = 20, 100") >= 3 and "the audit attacks" in page


# -- CLI ------------------------------------------------------------------------------------------
def test_report_command_writes_html_tables_and_plots(fabricated_report):
    _, out, stdout = fabricated_report  # `bench report --out` on fabricate()'s store (conftest.py)
    for name in ("report.html", "tables.md", "tables.tex", "tables.json", "clean.csv", "accuracy_under_attack.csv",
                 "certified.csv", "cost.csv"):
        assert (out / name).stat().st_size > 0 and str(out / name) in stdout
    for plot in ("accuracy_under_attack", "median_perturbation", "certified_accuracy", "robust_precision_recall", "cost"):
        assert (out / "figures" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (out / "figures" / f"{plot}.svg").read_text()
    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 5
    assert "src=\"http" not in page and "<script" not in page
    assert "accuracy rises with epsilon" in page and "2.13.0" in page and "&quot;seed&quot;: 0" in page


def test_report_formats_on_stdout_and_where(bench, store):
    code, stdout, _ = bench("report", "--results", str(store.directory), "--where", "dataset=svhn", "--format", "json")
    assert code == 0 and {r["dataset"] for r in json.loads(stdout)["clean"]} == {"svhn"}
    code, stdout, _ = bench("report", "--results", str(store.directory), "--format", "latex")
    assert code == 0 and r"\begin{table}" in stdout
    code, stdout, _ = bench("report", "--results", str(store.directory), "--format", "html")
    assert code == 0 and stdout.startswith("<!DOCTYPE html>")
    code, stdout, _ = bench("report", "--results", str(store.directory), "--thresholds", "0.1", "--format", "json")
    assert {r["threshold"] for r in json.loads(stdout)["certified"]} == {0.1}
    code, _, stderr = bench("report", "--results", str(store.directory), "--where", "oops")
    assert code == 2 and "--where 'oops' is malformed" in stderr


def test_report_combines_stores_below_a_directory(bench, tmp_path):
    fabricate(tmp_path / "runs" / "one")
    other = Store(tmp_path / "runs" / "two")
    other.save_run(make_run("dddd00000004", "cifar10", "madry", "madry", {}, {"num_test": 10}),
                   correct_set("clean", None, 0.0, {0, 1}))
    code, stdout, _ = bench("report", "--results", str(tmp_path / "runs"), "--format", "json")
    assert code == 0 and {r["dataset"] for r in json.loads(stdout)["clean"]} == {"mnist", "svhn", "cifar10"}


def test_compare_command(bench, store):
    code, stdout, _ = bench("report", "--results", str(store.directory), "--compare", "aaaa", "bbbb")
    assert code == 0 and "## Setup" in stdout and "| accuracy" in stdout and "-0.100" in stdout
    code, _, stderr = bench("report", "--results", str(store.directory), "--compare", "zz", "b")
    assert code == 2 and "run id 'zz' matches no run" in stderr


def test_real_run_then_report(bench, tmp_path):
    assert bench("run", *FAST, "--out", str(tmp_path / "results"))[0] == 0
    code, stdout, _ = bench("report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "report"))
    assert code == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "digits" in page and "Clean accuracy" in page and (tmp_path / "report" / "figures" / "cost.png").is_file()


# -- configs: profiles and [[runs]] ---------------------------------------------------------------
def options_for(*argv: str) -> dict:
    return merged_options(build_parser().parse_args(["run", *argv]))


def test_profile_merges_over_top_level_and_runs_sweep(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(
        'dataset = "digits"\nepochs = 5\ntest_size = 50\n[param]\nlr_unused = 1\n'
        '[profiles.cpu]\nepochs = 1\ntrain_size = 100\n[profiles.cpu.param]\nlr_unused = 2\n'
        '[[runs]]\ndefense = "baseline"\nseed = 1\n[[runs]]\ndefense = "baseline"\nseed = 2\n'
    )
    options = options_for("--config", str(config), "--profile", "cpu", "--test-size", "20")
    assert [entry["seed"] for entry in options["runs"]] == [[1], [2]]  # seed is a grid axis: a list
    for entry in options["runs"]:
        assert entry["epochs"] == 1 and entry["train_size"] == 100 and entry["test_size"] == 20
        assert entry["param"] == {"lr_unused": 2} and entry["defense"] == ["baseline"]
    with pytest.raises(BenchError, match="choose one with --profile"):
        options_for("--config", str(config))
    with pytest.raises(BenchError, match="no profile 'gpu'; available: cpu"):
        options_for("--config", str(config), "--profile", "gpu")


def test_runs_build_one_spec_per_entry_through_the_cli(bench, tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text('dataset = "digits"\nepochs = 2\nbatch_size = 16\ntrain_size = 100\ntest_size = 20\n'
                      '[[runs]]\nseed = 1\n[[runs]]\nseed = 2\n')
    specs = specs_from(options_for("--config", str(config)))
    assert [spec.seed for spec in specs] == [1, 2]
    assert bench("run", "--config", str(config), "--quiet", "--out", str(tmp_path / "r"))[0] == 0
    assert sorted(run.seed for run in Store(tmp_path / "r").runs()) == [1, 2]


def test_runs_may_span_datasets_and_seeds(tmp_path):
    # A grid's axes: each dataset is loaded once by the driver, its jobs carry what they need.
    config = tmp_path / "grid.toml"
    config.write_text('seed = [0, 1]\n[[runs]]\ndataset = "digits"\n[[runs]]\ndataset = "mnist"\n')
    specs = specs_from(options_for("--config", str(config)))
    assert [(spec.dataset, spec.seed) for spec in specs] == [("digits", 0), ("digits", 1), ("mnist", 0), ("mnist", 1)]


EXPERIMENTS = sorted((ROOT / "experiments").glob("*.toml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
@pytest.mark.parametrize("profile", ["cpu", "paper"])
def test_experiment_configs_parse_for_both_profiles(path, profile):
    options = options_for("--config", str(path), "--profile", profile)
    entries = options.get("runs") or [options]
    assert len({tuple(entry.get("dataset")) for entry in entries}) == 1
    for entry in entries:
        assert entry.get("defense"), f"{path.name}: a run without a defense"
    with open(path, "rb") as handle:
        assert set(tomllib.load(handle)["profiles"]) >= {"cpu", "paper"}


def test_experiments_exist():
    names = {p.stem for p in EXPERIMENTS}
    assert {"certified-mnist", "certified-svhn", "certified-cifar10", "pixeldp-vs-madry-cifar10",
            "pixeldp-vs-robustopt-svhn", "robust-precision-cifar10"} <= names


# -- smaller gaps: --where message, RobustBench cards, bench list ---------------------------------
def test_where_without_a_match_names_the_values_the_store_has(store):
    with pytest.raises(BenchError, match=r"--where defense=madry matches no run; the stores have defense: "
                                         r"baseline, pixeldp$"):
        build_tables(store, where=[("defense", "madry")])
    with pytest.raises(BenchError, match=r"the runs with dataset=svhn have defense: baseline$"):
        build_tables(store, where=[("dataset", "svhn"), ("defense", "pixeldp")])


def test_robustbench_cards_carry_clean_and_robust_accuracy_per_threat_model_and_eps(bench, store):
    code, stdout, _ = bench("report", "--results", str(store.directory), "--where", "run_id=aaaa00000001",
                            "--format", "robustbench")
    cards = {(card["threat_model"], card["eps"]): card for card in json.loads(stdout)}
    assert sorted(cards) == [("L2", "0.5"), ("L2", "1"), ("Linf", "0.1"), ("Linf", "0.3")]
    linf = cards[("Linf", "0.1")]
    assert (linf["clean_acc"], linf["robust_acc"], linf["attack"], linf["n"]) == ("90.00", "60.00", "pgd-linf", 10)
    assert linf["architecture"] == "mnist-cnn" and linf["dataset"] == "mnist" and linf["versions"]["torch"] == "2.13.0"
    assert "autoattack_acc" not in linf
    # two L2 attacks: the per-sample worst case (6 of 10 at 0.5, see above)
    l2 = cards[("L2", "0.5")]
    assert l2["robust_acc"] == "60.00" and l2["attack"] == "worst case of cw-l2, pgd-l2"


def test_a_run_without_clean_records_gets_a_card_without_a_clean_accuracy(bench, tmp_path):
    """An imported run may hold attack records only: its card says nothing of clean accuracy
    rather than failing (or inventing one)."""
    Store(tmp_path).save_run(make_run("cccc00000001", "mnist", "baseline", "baseline", {"model": "mnist-cnn"}, {}),
                             correct_set("pgd-linf", "linf", 0.1, {0, 1, 2}))
    code, stdout, stderr = bench("report", "--results", str(tmp_path), "--format", "robustbench")
    assert code == 0, stderr
    (card,) = json.loads(stdout)
    assert (card["clean_acc"], card["clean_n"], card["robust_acc"], card["n"]) == (None, 0, "30.00", 10)


def test_list_shows_parameters_with_defaults_and_attack_epsilons(bench):
    code, stdout, _ = bench("list")
    lines = stdout.splitlines()
    smoothing = lines[[i for i, line in enumerate(lines) if line.split()[:1] == ["smoothing"]][0] + 1]
    from bench.defenses.smoothing import Smoothing

    defaults = dataclasses.asdict(Smoothing.Params())
    shown = dict(item.split("=") for item in smoothing.split()[1:])
    assert smoothing.split()[0] == "--param" and set(shown) == set(defaults)
    assert all(float(shown[k]) == pytest.approx(v) for k, v in defaults.items() if isinstance(v, (int, float)))
    assert "l2 epsilons 0.1,0.25,0.5,1,1.5,2,3" in stdout and "--attack-param steps=20" in stdout
