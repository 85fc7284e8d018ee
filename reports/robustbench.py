"""Results as RobustBench model cards (the JSON files of RobustBench's ``model_info/DATASET/THREAT``).

One card per configuration, threat model and attack size: the fields RobustBench's cards use
where the harness knows them (``name``, ``dataset``, ``architecture``, ``eps``, ``clean_acc`` and
the robust accuracy as percentage strings with two decimals, ``threat_model`` as RobustBench's
``Linf``/``L2``), plus what a reader needs to trust the number: the attack, ``n``, the run, its
seed and library versions. The paper fields (``link``, ``authors``, ``venue``, ``reported``,
``additional_data``) are for the author to add. RobustBench's leaderboard number is
``autoattack_acc``; a card carries it only when the attack was AutoAttack, and ``robust_acc``
always.
"""
from __future__ import annotations

import json
from typing import Any

import pandas as pd

from bench.metrics import WORST_CASE
from bench.reports.labels import verdict
from bench.types import Norm


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def robustbench_cards(tables: dict[str, pd.DataFrame], runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Cards for every run, norm and epsilon > 0 in ``tables`` (from ``tables_from``); where a run
    faced several attacks of one norm, the per-sample worst case over them is the robust accuracy."""
    attacked = tables.get("accuracy_under_attack", pd.DataFrame())
    if attacked.empty:
        return []
    clean = tables["clean"].set_index("run_id")
    run_of = runs.set_index("run_id")
    attacks_of = attacked[attacked.attack != WORST_CASE].groupby(["run_id", "norm"], sort=False).attack.agg(
        lambda names: sorted(set(names)))
    has_worst = attacked.groupby(["run_id", "norm"], sort=False).attack.transform(lambda a: (a == WORST_CASE).any())
    lines = attacked[((attacked.attack == WORST_CASE) | ~has_worst) & (attacked.epsilon > 0)]
    cards = []
    for row in lines.itertuples(index=False):
        run = run_of.loc[row.run_id]
        names = attacks_of.loc[(row.run_id, row.norm)]
        card = {
            "name": row.config,
            "dataset": row.dataset,
            "threat_model": Norm(row.norm).threat_model,
            "architecture": (run["params"] or {}).get("model"),
            "eps": f"{row.epsilon:g}",
            # None for a run without clean records (imported ones): no clean figure is invented
            "clean_acc": _percent(clean.loc[row.run_id, "accuracy"]) if row.run_id in clean.index else None,
            "robust_acc": _percent(row.accuracy),
        }
        if all(name.startswith("autoattack") for name in names):
            card["autoattack_acc"] = card["robust_acc"]
        card.update({
            "attack": names[0] if len(names) == 1 else f"worst case of {', '.join(names)}",
            "n": int(row.n),
            "clean_n": int(clean.loc[row.run_id, "n"]) if row.run_id in clean.index else 0,
            "defense": row.defense,
            "params": run["params"],
            "seed": int(run["seed"]),
            "run_id": row.run_id,
            "versions": run["versions"],
            # bench.diagnostics' verdict: "flagged" means gradient masking was found; do not submit
            "diagnostics": verdict(run["info"]),
        })
        cards.append(card)
    return cards


def render_robustbench(tables: dict[str, pd.DataFrame], runs: pd.DataFrame) -> str:
    """The cards as a JSON list (RobustBench keeps one card per file: split it to submit)."""
    return json.dumps(robustbench_cards(tables, runs), indent=2, default=str)
