"""Reproductions: the claims machinery on tables whose verdicts are known, and a whole
reproduction through the CLI on the bundled digits at its tiny profile."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest

from bench.errors import BenchError
from bench.store import Store
from bench.reports.claims import (CONTRADICTED, HOLDS, INCONCLUSIVE, Check, Point, claims_from, combine, judge,
                                  point_verdict)
from bench.reports.tables import with_interval


def runs_frame(names: list[str]) -> pd.DataFrame:
    return pd.DataFrame([{"run_id": name, "dataset": "digits", "defense": name, "label": name, "params": {},
                          "spec": {}, "info": {}, "versions": {}, "warnings": []} for name in names])


def accuracy_table(counts: dict[str, int], n: int = 1000) -> pd.DataFrame:
    rows = [{"run_id": name, "attack": "worst-case", "norm": "l2", "epsilon": 0.5, "correct": k, "n": n,
             "accuracy": k / n} for name, k in counts.items()]
    return with_interval(pd.DataFrame(rows), "correct", "n")


def claim(left: str, right: str, relation: str = "above") -> dict:
    return {"id": f"{left}-{right}", "figure": "Fig. 0", "claim": "c", "paper": "p",
            "checks": [{"metric": "accuracy", "norm": "l2", "relation": relation, "left": {"defense": left},
                        "right": {"defense": right}, "at": [0.5]}]}


def test_verdicts_on_tables_whose_answer_is_known():
    # 900/1000 against 500/1000: intervals about +-2 and +-3 points, far apart -> holds; against
    # 950/1000 they separate the other way -> contradicted; against 890/1000 they overlap -> inconclusive.
    counts = {"a": 900, "far-below": 500, "far-above": 950, "close": 890}
    tables = {"accuracy_under_attack": accuracy_table(counts)}
    claims = claims_from([claim("a", "far-below"), claim("a", "far-above"), claim("a", "close"),
                          claim("a", "far-above", "at-least"), claim("a", "close", "at-least")])
    verdicts = judge(claims, tables, runs_frame(list(counts)))
    assert verdicts.verdict.tolist() == [HOLDS, CONTRADICTED, INCONCLUSIVE, CONTRADICTED, HOLDS]
    assert "90.0% [" in verdicts.ours[0] and "vs 50.0% [" in verdicts.ours[0]


def test_point_verdicts_follow_the_intervals_exactly():
    check = Check("accuracy", "above", {}, [0.0])
    assert point_verdict(check, Point(0.6, 0.51, 0.7), Point(0.4, 0.3, 0.5)) == HOLDS
    assert point_verdict(check, Point(0.6, 0.5, 0.7), Point(0.4, 0.3, 0.5)) == INCONCLUSIVE  # touching: overlap
    below = Check("accuracy", "below", {}, [0.0], value=0.01)
    assert point_verdict(below, Point(0.0, 0.0, 0.0074), None) == HOLDS  # 0 of 500: upper bound 0.74%
    assert point_verdict(below, Point(0.0, 0.0, 0.0116), None) == INCONCLUSIVE  # 0 of 30 cannot tell
    within = Check("ratio", "within", {}, [0.0], band=(0.8, 1.25))
    assert [point_verdict(within, Point(1, low, high), None) for low, high in ((0.9, 1.2), (0.7, 1.1), (1.3, 2))] == \
        [HOLDS, INCONCLUSIVE, CONTRADICTED]


def test_quantifiers_combine_point_verdicts():
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE and combine([HOLDS, CONTRADICTED]) == CONTRADICTED
    assert combine([HOLDS, HOLDS]) == HOLDS and combine([]) == INCONCLUSIVE
    assert combine([CONTRADICTED, HOLDS], "any") == HOLDS
    assert combine([CONTRADICTED, INCONCLUSIVE], "any") == INCONCLUSIVE
    assert combine([CONTRADICTED, CONTRADICTED], "any") == CONTRADICTED


def test_a_series_that_selects_no_run_is_inconclusive_and_says_why():
    tables = {"accuracy_under_attack": accuracy_table({"a": 900})}
    verdicts = judge(claims_from([claim("a", "missing")]), tables, runs_frame(["a"]))
    assert verdicts.verdict.tolist() == [INCONCLUSIVE] and "not measured" in verdicts.ours[0]


@pytest.mark.parametrize("broken, message", [
    ({"metric": "accurracy"}, "metric 'accurracy' is not one of"),
    ({"relation": "bigger"}, "relation 'bigger' is not one of"),
    ({"at": []}, "at must be a non-empty list"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"value": 0.5}, "give exactly one of right"),
])
def test_malformed_claims_get_a_one_line_error(broken, message):
    table = claim("a", "b")
    table["checks"][0].update(broken)
    with pytest.raises(BenchError, match=re.escape(message)) as error:
        claims_from([table])
    assert "\n" not in str(error.value) and "a-b" in str(error.value)


def test_reproductions_are_listed_and_an_unknown_one_is_refused(bench):
    code, stdout, _ = bench("reproduce", "--list")
    assert code == 0 and "pixeldp-mnist:" in stdout
    code, _, stderr = bench("reproduce", "pixeldp-nope")
    assert code == 2 and "no reproduction 'pixeldp-nope'; available: pixeldp-cifar10, pixeldp-mnist, pixeldp-svhn" in stderr


def test_another_dataset_must_be_of_the_reproductions_kind():
    from bench import reproduce

    reproduction = reproduce.load("pixeldp-mnist")
    reproduce.check_dataset_kind(reproduction, SimpleNamespace(name="digits", shape=(1, 8, 8), num_classes=10))
    with pytest.raises(BenchError, match="1 channel.*10 classes; dataset cifar10 has 3 and 10"):
        reproduce.check_dataset_kind(reproduction, SimpleNamespace(name="cifar10", shape=(3, 32, 32), num_classes=10))


def test_the_whole_mnist_reproduction_runs_on_digits_through_the_cli(bench, tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    code, stdout, stderr = bench("reproduce", "pixeldp-mnist", "--profile", "tiny", "--dataset", "digits",
                                 "--out", str(out), "--docs", str(docs), "--quiet")
    assert code == 0, stderr
    reproduction = __import__("bench.reproduce", fromlist=["load"]).load("pixeldp-mnist")
    ids = [c.id for c in reproduction.claims]
    for claim_id in ids:  # every claim printed with a verdict
        assert re.search(rf"^(HOLDS|CONTRADICTED|INCONCLUSIVE) +{re.escape(claim_id)} ", stdout, re.M), claim_id
    assert re.search(r"claims: \d+ holds, \d+ contradicted, \d+ inconclusive", stdout)
    page = (out / "report" / "report.html").read_text()
    assert page.index('id="preface"') < page.index('id="warnings"')  # the verdicts come first
    assert all(f"<td>{claim_id}</td>" in page for claim_id in ids)
    markdown = (docs / "pixeldp-mnist.md").read_text()
    assert "## Verdicts" in markdown and all(claim_id in markdown for claim_id in ids)
    assert "bench reproduce pixeldp-mnist --profile tiny" in markdown and str(tmp_path) not in markdown
    (session,) = json.loads((out / "reproduction.json").read_text())["sessions"]
    assert session["status"] == "complete"
    # the session's clock covers every step it ran (it starts before the grid, not after)
    work = sum(float(store_work.seconds.sum()) for store_work in
               (Store(out).work(run.run_id) for run in Store(out).runs()))
    assert session["wall_seconds"] >= work > 0


def test_the_cost_model_prints_every_step_of_every_run_and_their_sum(bench):
    code, stdout, stderr = bench("perf", "--reproduction", "pixeldp-mnist", "--profile", "tiny", "--dataset", "digits",
                                 "--jobs", "2", "--quiet")
    assert code == 0, stderr
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("|") and "---" not in line][1:]
    steps = {(run.strip(), step.strip()) for run, step, *_ in rows}
    runs = {run for run, _ in steps}
    assert len(runs) == 9 and all((run, "train") in steps and (run, "clean") in steps for run in runs)
    assert ("baseline", "autoattack-l2") in steps and ("baseline", "square-linf") in steps  # attacks and the audit
    seconds = [float(cpu) for _, _, _, cpu, _ in rows]
    assert all(value >= 0 for value in seconds) and all(float(cpu) > 0 for _, step, _, cpu, _ in rows if step.strip() == "train")
    assert all(float(expected) <= float(cpu) for _, _, _, cpu, expected in rows)  # the sweep only does less
    total = re.search(r"at most ([\d.]+) (s|min) of CPU", stdout)
    # the two PixelDP L=0.1 runs of 300 draws (certified accuracy; CW for robust precision) share one training
    pixeldp = [step.strip() for run, step, *_ in rows if run.strip() == "pixeldp"]
    assert pixeldp.count("clean") == 2 and pixeldp.count("train") == 1
    printed = float(total.group(1)) * (60 if total.group(2) == "min" else 1)
    # each row is printed rounded to 0.01 s, the total to 0.1 min (or 1 s)
    assert abs(printed - sum(seconds)) <= 0.005 * len(seconds) + (3 if total.group(2) == "min" else 0.5)
