"""``bench run``, ``bench list``, ``bench report``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

from bench import progress
from bench.errors import BenchError
from bench.registry import ATTACKS, DATASETS, DEFENSES
from bench.spec import RunSpec, load_config, parse_assignments, unclaimed

# TOML keys accepted by --config: the long options, with "_" for "-".
CONFIG_KEYS = {
    "defense", "dataset", "model", "attack", "epsilons", "attack_backend", "eot_draws", "epochs",
    "batch_size", "lr", "seed", "train_size", "test_size", "image_size", "data_dir", "download",
    "out", "device", "param", "attack_param",
}


def _epsilons(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.05,0.1") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: epsilons must be non-negative numbers")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Benchmark adversarial-robustness defenses.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train/evaluate defenses and store per-sample records")
    run.add_argument("--config", type=Path, help="TOML file with the same keys as these options; options win")
    run.add_argument("--defense", action="append", help="defense name (repeatable); default baseline")
    run.add_argument("--dataset", help="dataset name; default digits (ships with scikit-learn)")
    run.add_argument("--model", help="model zoo name (digits-cnn, mnist-cnn, wrn-DEPTH-WIDTH, resnet18); default per dataset")
    run.add_argument("--attack", action="append", help="attack name (repeatable)")
    run.add_argument("--epsilons", type=_epsilons, help="comma-separated attack sizes in [0,1] pixel units")
    run.add_argument("--attack-backend", choices=["foolbox", "art"])
    run.add_argument("--eot-draws", type=_positive_int, help="noise draws per attack step on randomized defenses (default 20)")
    run.add_argument("--epochs", type=_positive_int)
    run.add_argument("--batch-size", type=_positive_int)
    run.add_argument("--lr", type=float)
    run.add_argument("--seed", type=int)
    run.add_argument("--train-size", type=_positive_int, help="seeded class-balanced training subset")
    run.add_argument("--test-size", type=_positive_int, help="seeded class-balanced test subset")
    run.add_argument("--image-size", type=_positive_int, help="imagenet: resize to this size (default 224)")
    run.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                     help="defense parameter (repeatable); DEFENSE.KEY=VALUE targets one defense")
    run.add_argument("--attack-param", action="append", default=None, metavar="KEY=VALUE",
                     help="attack parameter (repeatable); ATTACK.KEY=VALUE targets one attack")
    run.add_argument("--data-dir", type=Path, help="where dataset files are (default ./data)")
    run.add_argument("--download", action="store_true", default=None, help="download missing dataset files")
    run.add_argument("--out", type=Path, help="results directory (default ./results)")
    run.add_argument("--device", help="torch device (default cpu)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    commands.add_parser("list", help="registered defenses, attacks and datasets")

    report = commands.add_parser("report", help="tables from a results directory")
    report.add_argument("--results", type=Path, default=Path("results"))
    report.add_argument("--format", choices=["md", "csv", "json"], default="md")
    report.add_argument("--thresholds", type=_epsilons, help="certified thresholds T (default 0 to 1 by 0.05)")
    return parser


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """TOML config values, overridden by every option given on the command line."""
    options: dict[str, Any] = {}
    if args.config is not None:
        config = load_config(args.config)
        unknown = sorted(set(config) - CONFIG_KEYS)
        if unknown:
            raise BenchError(f"config {args.config}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(CONFIG_KEYS))}")
        options.update(config)
    for key in ("param", "attack_param"):
        table = _flatten(options.get(key, {}), key)
        table.update(parse_assignments(getattr(args, key) or [], "--" + key.replace("_", "-")))
        options[key] = table
    for key, value in vars(args).items():
        if key in CONFIG_KEYS and key not in ("param", "attack_param") and value is not None:
            options[key] = value
    for key in ("defense", "attack"):
        if isinstance(options.get(key), str):
            options[key] = [options[key]]
    return options


def _flatten(table: Any, key: str) -> dict[str, Any]:
    """``{pixeldp = {L = 0.1}, draws = 10}`` -> ``{"pixeldp.L": 0.1, "draws": 10}``."""
    if not isinstance(table, dict):
        raise BenchError(f"config key {key!r} must be a table of KEY = VALUE")
    flat = {}
    for name, value in table.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def specs_from(options: dict[str, Any]) -> list[RunSpec]:
    defenses = options.get("defense") or ["baseline"]
    attacks = options.get("attack") or []
    for name in defenses:
        DEFENSES.get(name)
    for name in attacks:
        ATTACKS.get(name)
    DATASETS.get(options.get("dataset", "digits"))
    unclaimed(options["param"], {d: _fields(DEFENSES.get(d).Params) for d in defenses}, "defense parameter")
    unclaimed(options["attack_param"], {a: _fields(ATTACKS.get(a).Params) for a in attacks}, "attack parameter")
    common = {
        key: options[key]
        for key in ("dataset", "model", "epsilons", "attack_backend", "eot_draws", "epochs", "batch_size",
                    "lr", "seed", "train_size", "test_size", "image_size")
        if key in options
    }
    return [
        RunSpec(defense=name, params=dict(options["param"]), attacks=list(attacks),
                attack_params=dict(options["attack_param"]), **common)
        for name in defenses
    ]


def _fields(params_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(params_class)}


def command_run(args: argparse.Namespace) -> int:
    from bench.runner import execute, load_dataset
    from bench.store import Store
    from reports.tables import build_tables, render

    options = merged_options(args)
    progress.QUIET = bool(args.quiet)
    specs = specs_from(options)
    store = Store(options.get("out", Path("results")))
    data_dir = options.get("data_dir")
    dataset = load_dataset(specs[0], Path(data_dir) if data_dir else None, bool(options.get("download")))
    run_ids = []
    for spec in specs:
        result = execute(spec, dataset, store, device=options.get("device", "cpu"))
        run_ids.append(result.run_id)
    tables = build_tables(store)
    shown = {name: table[table.run_id.isin(run_ids)] if not table.empty else table for name, table in tables.items()}
    if not shown["certified"].empty:
        certified = shown["certified"]
        shown["certified"] = certified[(certified.attack == "clean") & certified.threshold.isin([0.0, 0.05, 0.1, 0.2, 0.3, 0.5])]
    print(render(shown, "md"))
    print(f"stored {len(run_ids)} run(s) in {store.path}")
    return 0


def command_list(_: argparse.Namespace) -> int:
    for title, registry in (("defenses", DEFENSES), ("attacks", ATTACKS), ("datasets", DATASETS)):
        print(f"{title}:")
        for name, obj in registry.items():
            doc = (obj.__doc__ or "").strip().splitlines()
            print(f"  {name:16s} {doc[0] if doc else ''}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    from bench.metrics import DEFAULT_THRESHOLDS
    from bench.store import Store
    from reports.tables import build_tables, render

    tables = build_tables(Store(args.results), tuple(args.thresholds or DEFAULT_THRESHOLDS))
    sys.stdout.write(render(tables, args.format) + "\n")
    return 0


COMMANDS = {"run": command_run, "list": command_list, "report": command_report}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; completed runs are in the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
