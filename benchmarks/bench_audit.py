"""What the audit costs, and what it finds: the default evaluation with and without it, side by side.

For each digits defense (trained as ``bench run --defense NAME`` trains it, checkpoints shared
with ``--results``) and each norm, one ``bench run``-like evaluation of the gradient attack alone
(``audit=False``) and one with the audit (Square, the transfer attack, the diagnostics' probes),
interleaved, on the same images. Prints per row: the seconds of each, their ratio, the gradient
attack's accuracy at each epsilon, the headline (per-point worst case) with the audit, and the run's
verdict.

    OMP_NUM_THREADS=1 python benchmarks/bench_audit.py [--images 200] [--defense NAME ...] [--results DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from bench import progress  # noqa: E402
from bench.reports.labels import verdict  # noqa: E402
from digits_models import trained  # noqa: E402

ATTACKS = {"linf": ("pgd-linf", [0.05, 0.1, 0.2]), "l2": ("pgd-l2", [0.5, 1.0, 1.5])}


def accuracy(results, attack: str) -> str:
    table = results.accuracy_under_attack
    rows = table[(table.attack == attack) & (table.epsilon > 0)].sort_values("epsilon")
    return " / ".join(f"{a:.3f}" for a in rows.accuracy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--defense", action="append", help="repeatable; default baseline, madry, pixeldp")
    parser.add_argument("--results", type=Path, help="store of trained checkpoints (default: a temporary one)")
    args = parser.parse_args()
    progress.QUIET = True
    torch.set_num_threads(1)
    scratch = tempfile.TemporaryDirectory()
    results_dir = args.results or Path(scratch.name)
    print(f"| defense | norm | gradient attack alone (s) | with the audit (s) | ratio | {ATTACKS['linf'][0]}/{ATTACKS['l2'][0]} "
          "accuracy | worst case with the audit | verdict |")
    print("|:--|:--|--:|--:|--:|:--|:--|:--|")
    for name in args.defense or ("baseline", "madry", "pixeldp"):
        defense = trained(name, results_dir)
        for norm, (attack, epsilons) in ATTACKS.items():
            seconds, outcome = {}, {}
            for audit in (False, True):
                started = time.perf_counter()
                outcome[audit] = bench.evaluate(defense, "digits", [attack], epsilons, test_size=args.images,
                                                audit=audit)
                seconds[audit] = time.perf_counter() - started
            audited = outcome[True]
            print(f"| {name} | {norm} | {seconds[False]:.1f} | {seconds[True]:.1f} | {seconds[True] / seconds[False]:.2f} | "
                  f"{accuracy(outcome[False], attack)} | {accuracy(audited, 'worst-case')} | "
                  f"{verdict(audited.runs['info'][0])}: {audited.tables['diagnostics'].fired[0] or 'none fired'} |",
                  flush=True)


if __name__ == "__main__":
    main()
