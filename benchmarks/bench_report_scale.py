"""Reports at scale: every ``bench report --format`` on a synthetic store of N records (not a test).

    nice python benchmarks/bench_report_scale.py [--records 10000000] [--runs 100] [--keep DIR]

Builds a store in a temporary folder (never in the repository; ``--keep DIR`` builds it there, or
reuses it): ``--runs`` runs, half of them certifying (PixelDP/smoothing-style certificates with
abstentions, radius 0 and wrong certified labels), each with clean records and 3 linf attacks and
2 l2 attacks at 3 epsilons each (so worst-case rows), points wrong clean but right attacked, and as
many samples per run as make ``--records`` in all (100 runs: 6,250 samples per step, a full test
set). Then runs the real CLI once per format in a fresh subprocess and prints its wall seconds and
peak resident memory (that child's ``ru_maxrss``) beside the bounds: 2 minutes and 1 GB at 10
million records. Time and memory of the tables grow with the records only through SQLite's
per-run aggregation; the rendered tables and plots grow with the number of runs (one line per
configuration: HTML plots of a thousand configurations take minutes whatever the records).
"""
from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.store import Run, Store
from bench.types import ABSTAIN

FORMATS = ("md", "csv", "latex", "json", "robustbench", "html")
BOUND_SECONDS, BOUND_BYTES = 120.0, 2**30
# (attack, norm, epsilon, strength): a stronger attack breaks more points at the same epsilon.
STEPS = [("clean", None, 0.0, 0.0)] + [
    (attack, "linf", epsilon, strength)
    for attack, strength in (("pgd-linf", 1.0), ("autoattack-linf", 1.1), ("square-linf", 0.8))
    for epsilon in (0.03, 0.1, 0.3)
] + [(attack, "l2", epsilon, strength) for attack, strength in (("pgd-l2", 1.0), ("cw-l2", 1.2))
     for epsilon in (0.5, 1.0, 2.0)]
DEFENSES = ("baseline", "madry", "pixeldp", "smoothing")  # the last two certify

# One run's records, from a recursive CTE of sample indices: per sample a fixed "hardness" u in
# [0, 1) from the sample index, and per record a fresh draw (random()), so attacks of one norm
# disagree per sample and a few points are wrong clean but right attacked (randomized defenses).
RECORDS = f"""
WITH RECURSIVE sample(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM sample WHERE i + 1 < :samples),
draw AS (SELECT i, (i * 7919 % 1000) / 1000.0 AS u, (abs(random()) % 1000) / 1000.0 AS r,
                i % 10 AS label FROM sample)
INSERT INTO records
SELECT :run_id, i, :attack, :norm, :epsilon,
       CASE WHEN right THEN label ELSE (label + 1) % 10 END, label, right,
       CASE WHEN :attack = 'clean' THEN NULL WHEN :attack LIKE 'cw%' THEN 3 * r ELSE :epsilon * (0.5 + r / 2) END,
       certified_label, certified_radius, certified_norm,
       CASE WHEN certified_label IS NULL THEN NULL ELSE certified_label != {ABSTAIN} AND certified_radius > 0 END
FROM (SELECT i, label, r,
             u < 0.9 - :strength * :epsilon / (CASE WHEN :norm = 'l2' THEN 3.0 ELSE 0.4 END) + (r - 0.5) / 10 AS right,
             CASE WHEN NOT :certifies THEN NULL WHEN r < 0.1 THEN {ABSTAIN} WHEN r < 0.15 THEN (label + 1) % 10
                  ELSE label END AS certified_label,
             CASE WHEN NOT :certifies THEN NULL WHEN r < 0.1 THEN 0.0 ELSE round((1 - u) * r * 1.5, 3) END
                 AS certified_radius,
             CASE WHEN :certifies THEN 'l2' END AS certified_norm
      FROM draw)
"""


def synthetic_run(index: int, samples: int) -> Run:
    defense = DEFENSES[index % len(DEFENSES)]
    dataset = ("mnist", "cifar10")[index % 2]
    info = {"train_seconds": 60.0 + index % 7, "eval_seconds": 30.0 + index % 5, "num_train": 60000,
            "num_test": samples, "reused_checkpoint": False, "device": "cpu", "diagnostics_complete": True,
            "diagnostics": [{"name": "verdict-flips", "fired": False, "count": index % 3, "n": samples,
                             "message": "", "detail": {"per_step": [{"step": "clean", "epsilon": 0.0,
                                                                     "count": index % 3, "n": samples}]}}]}
    params = {"model": "cnn", "L": 0.1} if defense == "pixeldp" else {"model": "cnn"}
    spec = {"defense": defense, "dataset": dataset, "params": params, "seed": index, "epochs": 2}
    return Run(run_id=f"run{index:06d}", created=f"2026-01-01T00:00:{index % 60:02d}", dataset=dataset,
               defense=defense, label=f"{defense}-{index:04d}", params=params, spec=spec,
               spec_hash=f"spec{index}", training_hash=f"train{index}", seed=index, versions={"torch": "2.13.0"},
               host="synthetic", info=info, warnings=[])


def build_store(directory: Path, records: int, runs: int) -> int:
    """A store of ``runs`` runs and about ``records`` records; returns the number of records."""
    store = Store(directory)
    samples = max(1, records // (runs * len(STEPS)))
    for index in range(runs):
        store.save_run(synthetic_run(index, samples), [])
    connection = sqlite3.connect(store.path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=OFF")  # a scratch store: no rollback journal, no WAL copy
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("BEGIN")
    for index in range(runs):
        for attack, norm, epsilon, strength in STEPS:
            connection.execute(RECORDS, {"samples": samples, "run_id": f"run{index:06d}", "attack": attack,
                                         "norm": norm, "epsilon": epsilon, "strength": strength,
                                         "certifies": DEFENSES[index % len(DEFENSES)] in ("pixeldp", "smoothing")})
    connection.execute("COMMIT")
    connection.execute("PRAGMA journal_mode=WAL")  # as the store keeps it
    total = connection.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    connection.close()
    return total


def measure(command: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak resident bytes and exit status of ``command`` in a fresh subprocess
    (``os.wait4`` gives that one child's ``ru_maxrss``, in KiB on Linux)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        print(stderr.decode(errors="replace"), file=sys.stderr)
    return seconds, usage.ru_maxrss * 1024, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="build (or reuse) the store in this folder and keep it")
    args = parser.parse_args()
    scratch = tempfile.TemporaryDirectory(prefix="bench-report-scale-")
    directory = args.keep or Path(scratch.name)
    started = time.perf_counter()
    if (directory / "results.sqlite").is_file():
        with sqlite3.connect(directory / "results.sqlite") as connection:
            total = connection.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        print(f"reusing {directory}: {total:,} records")
    else:
        total = build_store(directory, args.records, args.runs)
        print(f"built {total:,} records in {args.runs} runs in {time.perf_counter() - started:.0f} s "
              f"({(directory / 'results.sqlite').stat().st_size / 2**30:.2f} GiB)")
    print("\n| format | wall s | peak RSS MiB | bound |\n|:--|--:|--:|:--|")
    for fmt in FORMATS:
        command = [sys.executable, "-m", "bench.cli", "report", "--results", str(directory), "--format", fmt]
        seconds, peak, status = measure(command)
        within = status == 0 and seconds <= BOUND_SECONDS and peak <= BOUND_BYTES
        print(f"| {fmt} | {seconds:.1f} | {peak / 2**20:.0f} | {'within' if within else 'OVER'} 120 s, 1024 MiB"
              f"{'' if status == 0 else f' (exit {status})'} |", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
