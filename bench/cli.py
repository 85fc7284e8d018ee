"""``bench run``, ``bench eval``, ``bench list``, ``bench report``: shells over :mod:`bench.api`."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from bench import log
from bench.errors import BenchError
from bench.registry import ATTACKS, DATASETS, DEFENSES
from bench.spec import (
    DEFAULT_ATTACK_BATCH_SIZE, DEFAULT_EVAL_BATCH_SIZE, RunSpec, flatten, load_config, parse_assignments, with_audit,
    unclaimed,
)
from bench.validation import (
    check_epsilons, check_scheduler, check_subset_size, check_writable_dir, validate_options, validate_request,
)
from bench.types import CLEAN, TABLE_NAMES

# TOML keys accepted by --config: the long options, with "_" for "-".
CONFIG_KEYS = {
    "defense", "dataset", "model", "attack", "epsilons", "attack_backend", "eot_draws", "epochs",
    "batch_size", "lr", "seed", "train_size", "test_size", "image_size", "data_dir", "download",
    "out", "device", "param", "attack_param", "eval_batch_size", "attack_batch_size", "audit",
}
NO_ATTACK = "--epsilons sets attack sizes, but no attack is selected; add --attack NAME (bench list shows the attacks)"
# bench.threads.default_threads, in words.
THREADS_RULE = ("OMP_NUM_THREADS if set, else the idle cores (cores minus the load average) shared among the "
                "processes, at most 4 each")
# The parts of `bench perf` (bench.perf.SECTIONS; not imported here, it imports torch).
PERF_SECTIONS = ("attacks", "autoattack", "pixeldp", "training", "grid")


# Option types only turn text into numbers; ranges are checked by bench.validation, the same way
# for command-line flags and config values.
def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.05,0.1") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _keyed_numbers(text: str) -> tuple[str | None, list[float]]:
    """``0.05,0.1`` (every attack) or ``KEY=0.05,0.1`` (KEY a norm or an attack name)."""
    key, sep, values = text.partition("=")
    if not sep:
        return None, _numbers(text)
    if not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NORM=LIST or ATTACK=LIST, e.g. linf=0.05,0.1")
    return key.strip(), _numbers(values)


def _epsilon_option(items: list[tuple[str | None, list[float]]]) -> list[float] | dict[str, list[float]]:
    """Repeated ``--epsilons``: one plain list for every attack, or lists keyed by norm/attack."""
    keys = [key for key, _ in items]
    if None in keys and len(items) > 1:
        raise BenchError("--epsilons: give either one list for every attack (--epsilons 0.05,0.1) or one list per "
                         "norm or attack (--epsilons linf=0.05,0.1 --epsilons l2=0.5,1), not both")
    if None in keys:
        return items[0][1]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise BenchError(f"--epsilons {duplicated[0]}=... is given twice; give each norm or attack once")
    return dict(items)


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return value


# Print resolution is 300-600 dpi; a 6.4 x 4.8 inch figure at 1200 dpi is already 44 megapixels.
DPI_MAX = 1200


def _dpi(text: str) -> int:
    value = _positive_int(text)
    if value > DPI_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is above {DPI_MAX}; give a resolution from 1 to {DPI_MAX} dpi")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``bench: error: ...``, exit status 2, like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise BenchError(f"{message} (see {self.prog} --help)")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robustness-bench")
    except PackageNotFoundError:
        from bench import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench", description="Benchmark adversarial-robustness defenses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s (robustness-bench) {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    # Defaults are written into the help text: the options themselves default to None, so that a
    # value from --config is only overridden by an option actually given.
    spec = RunSpec(defense="baseline")
    run = commands.add_parser("run", help="train/evaluate defenses and store per-sample records")
    run.add_argument("--config", type=Path, help="TOML file with the same keys as these options; options win (default: none)")
    run.add_argument("--profile", help="profile of the config to use, e.g. cpu or paper ([profiles.NAME] tables; default: none)")
    run.add_argument("--defense", action="append", help="defense name (repeatable: one run per defense; default baseline)")
    run.add_argument("--dataset", action="append",
                     help=f"dataset name (repeatable: one run per defense x dataset x seed; default {spec.dataset}, "
                          "which ships with scikit-learn)")
    run.add_argument("--model", help="model zoo name: digits-cnn, mnist-cnn, wrn-DEPTH-WIDTH, resnet18 "
                                     "(default: the defense's, else the dataset's)")
    run.add_argument("--attack", action="append", help="attack name (repeatable; default: none, clean evaluation only)")
    run.add_argument("--epsilons", type=_keyed_numbers, action="append", metavar="[NORM|ATTACK=]LIST",
                     help="comma-separated attack sizes in [0,1] pixel units, for every attack (0.05,0.1) or per "
                          "norm or attack, repeatable (--epsilons linf=0.05,0.1 --epsilons l2=0.5,1); "
                          "default: each attack's own grid")
    run.add_argument("--attack-backend", choices=["foolbox", "art"], help=f"attack library (default {spec.attack_backend})")
    run.add_argument("--eot-draws", type=_integer,
                     help=f"noise draws per attack step on randomized defenses (default {spec.eot_draws})")
    run.add_argument("--no-audit", dest="audit", action="store_false", default=None,
                     help="do not add the gradient-free (square-*) and transfer (transfer-*) attacks beside the "
                          "gradient attacks of each norm (default: added; without them gradient masking goes unseen)")
    run.add_argument("--epochs", type=_integer, help="training epochs (default per defense and dataset, bench.training.TRAINING_DEFAULTS: 30, MNIST 8)")
    run.add_argument("--batch-size", type=_integer, help=f"training batch size (default {spec.batch_size})")
    run.add_argument("--lr", type=_number, help="training learning rate (default per defense and dataset, bench.training.TRAINING_DEFAULTS: 0.05, robustopt 0.01, madry on MNIST 0.02)")
    run.add_argument("--seed", type=_integer, action="append",
                     help=f"seed of subsets, training, noise and attacks (repeatable: one run per seed; default {spec.seed})")
    run.add_argument("--train-size", type=_integer, help="seeded class-balanced training subset (default: all)")
    run.add_argument("--test-size", type=_integer, help="seeded class-balanced test subset (default: all)")
    run.add_argument("--image-size", type=_integer, help=f"imagenet: resize to this size (default {spec.image_size})")
    run.add_argument("--eval-batch-size", type=_integer,
                     help=f"rows per forward pass when predicting and certifying (images, or image x noise draw); "
                          f"raise it on a GPU (default {DEFAULT_EVAL_BATCH_SIZE}, tuned for CPU)")
    run.add_argument("--attack-batch-size", type=_integer,
                     help=f"images per attack batch; raise it on a GPU (default {DEFAULT_ATTACK_BATCH_SIZE}, tuned for CPU)")
    run.add_argument("--param", action="append", default=None, metavar="KEY=VALUE",
                     help="defense parameter (repeatable); DEFENSE.KEY=VALUE targets one defense "
                          "(default: the defense's own; see bench list)")
    run.add_argument("--attack-param", action="append", default=None, metavar="KEY=VALUE",
                     help="attack parameter (repeatable); ATTACK.KEY=VALUE targets one attack (default: the attack's own)")
    run.add_argument("--data-dir", type=Path, help="where dataset files are (default ./data)")
    run.add_argument("--download", action="store_true", default=None, help="download missing dataset files (default: off)")
    run.add_argument("--out", type=Path, help="results directory (default ./results)")
    run.add_argument("--device", help="torch device (default cpu)")
    run.add_argument("--jobs", type=_positive_int, default=1,
                     help="worker processes on this machine: training and evaluation jobs run in parallel, "
                          "with the records of a serial run (default 1: in this process)")
    run.add_argument("--scheduler", metavar="ADDRESS",
                     help="run the jobs on a Dask distributed cluster, e.g. tcp://HOST:8786; needs "
                          "pip install -e '.[dask]' in a clone of the harness on every machine (default: none, local)")
    run.add_argument("--threads", "--worker-threads", type=_positive_int,
                     help=f"torch threads per process: this one, and each worker of --jobs or --scheduler "
                          f"(--worker-threads: its former name; default: {THREADS_RULE}; 1 per job on a Dask cluster)")
    run.add_argument("--force", action="store_true",
                     help="start new runs even where a complete run of the same spec is stored (default: off, skip "
                          "complete runs, resume unfinished ones); checkpoints are still reused")
    _add_verbosity(run)

    evaluation = commands.add_parser(
        "eval", help="evaluate your own model (MODULE:CALLABLE or FILE.py:CALLABLE) under attacks",
        description="Evaluate an outside model (any nn.Module mapping [0,1] images to logits), as it is or inside "
                    "a defense that wraps it, on a dataset's test split: the Python call bench.evaluate(...) from "
                    "the command line. Prints the tables; stores the run only with --out.")
    evaluation.add_argument("--model", required=True, metavar="MODULE:CALLABLE",
                            help="my_package.models:small_cnn or path/to/file.py:factory; called without arguments")
    evaluation.add_argument("--checkpoint", type=Path, metavar="FILE",
                            help="the model's state dict (torch.save), loaded with weights_only=True")
    evaluation.add_argument("--defense", default="baseline",
                            help="defense around the model (default baseline: the model as it is; smoothing); "
                                 "defenses that must be trained first: from Python, bench.train")
    evaluation.add_argument("--param", action="append", default=None, metavar="KEY=VALUE", help="defense parameter (repeatable)")
    evaluation.add_argument("--dataset", default="digits", help="dataset name (default digits)")
    evaluation.add_argument("--attack", action="append", default=None, help="attack name (repeatable)")
    evaluation.add_argument("--epsilons", type=_keyed_numbers, action="append", metavar="[NORM|ATTACK=]LIST",
                            help="attack sizes, as for bench run (default: each attack's own grid)")
    evaluation.add_argument("--attack-param", action="append", default=None, metavar="KEY=VALUE",
                            help="attack parameter (repeatable); ATTACK.KEY=VALUE targets one attack")
    evaluation.add_argument("--attack-backend", choices=["foolbox", "art"], default="foolbox")
    evaluation.add_argument("--eot-draws", type=_integer, default=20,
                            help="noise draws per attack step on randomized defenses (default 20)")
    evaluation.add_argument("--no-audit", dest="audit", action="store_false",
                            help="do not add the gradient-free and transfer attacks (default: added)")
    evaluation.add_argument("--seed", type=_integer, default=0, help="seed of every step and of --test-size (default 0)")
    evaluation.add_argument("--test-size", type=_integer, help="seeded class-balanced test subset (default: all)")
    evaluation.add_argument("--data-dir", type=Path, help="where dataset files are (default ./data)")
    evaluation.add_argument("--download", action="store_true", help="download missing dataset files")
    evaluation.add_argument("--out", type=Path, help="results directory to store the run in (default: not stored)")
    evaluation.add_argument("--device", default="cpu", help="torch device (default cpu)")
    evaluation.add_argument("--threads", type=_positive_int, help=f"torch threads (default: {THREADS_RULE})")
    evaluation.add_argument("--format", choices=["md", "json"], default="md", help="how to print the tables (default md)")
    _add_verbosity(evaluation)

    commands.add_parser("list", help="registered defenses, attacks and datasets")

    again = commands.add_parser(
        "reproduce", help="re-run a paper's evaluation and judge each of its claims (holds, contradicted, inconclusive)",
        description="Runs a reproduction's experiments (resumable: what is stored is not redone), then writes the "
                    "HTML report whose first section is the verdict table, and prints that table. Verdicts are "
                    "results: the exit status is 0 whatever they say, non-zero only when something failed.")
    again.add_argument("name", nargs="?", help="the reproduction, e.g. pixeldp-mnist (bench reproduce --list)")
    again.add_argument("--list", action="store_true", help="name the reproductions and exit")
    again.add_argument("--profile", default="cpu", help="cpu (a 2-core machine) or paper (the paper's settings, for a GPU) (default cpu)")
    again.add_argument("--dataset", help="run on another dataset of the same kind (default: the paper's)")
    again.add_argument("--data-dir", type=Path, help="where dataset files are (default ./data)")
    again.add_argument("--download", action="store_true", default=None, help="download missing dataset files (default: off)")
    again.add_argument("--out", type=Path, help="results directory (default ./results/reproduce-NAME-PROFILE[-DATASET])")
    again.add_argument("--docs", type=Path, metavar="DIR", help="also write the generated page DIR/NAME.md with its figures")
    again.add_argument("--jobs", type=_positive_int, default=1, help="worker processes on this machine (default 1)")
    again.add_argument("--scheduler", metavar="ADDRESS", help="run the jobs on a Dask distributed cluster (default: local)")
    again.add_argument("--threads", type=_positive_int, help=f"torch threads per process (default: {THREADS_RULE})")
    _add_verbosity(again)

    perf = commands.add_parser(
        "perf", help="our attacks, PixelDP and parallel grids against their floors, side by side",
        description="Times each code path of the harness against a reference doing the same work on the same "
                    "model and batch, interleaved, and prints a table with ratios, targets and peak memory.")
    perf.add_argument("--only", action="append", choices=PERF_SECTIONS, help="measure only this part (repeatable; default: all)")
    perf.add_argument("--rounds", type=_positive_int, default=6,
                      help="interleaved rounds per row at least; more until the 95%% interval of the ratio is on one "
                           "side of the target (6 is the fewest that give a 95%% interval; default 6)")
    perf.add_argument("--max-rounds", type=_positive_int, default=30, help="rounds per row at most (default 30)")
    perf.add_argument("--row-seconds", type=_positive_float, default=120.0,
                      help="no new round once a row has measured this long; its verdict may then be noisy (default 120)")
    perf.add_argument("--images", type=_positive_int, default=64, help="images per attack comparison (default 64)")
    perf.add_argument("--reproduction", metavar="NAME",
                      help="instead: print the cost model of a reproduction (bench reproduce --list): unit costs "
                           "measured here times counts = CPU seconds per run and step, and the total")
    perf.add_argument("--profile", default="cpu", help="with --reproduction: its profile (default cpu)")
    perf.add_argument("--dataset", help="with --reproduction: another dataset of the same kind")
    perf.add_argument("--data-dir", type=Path, help="with --reproduction: where dataset files are (default ./data)")
    perf.add_argument("--jobs", type=_positive_int, default=1,
                      help="with --reproduction: the worker processes the wall time is estimated for (default 1)")
    perf.add_argument("--threads", type=_positive_int, help=f"torch threads (default: {THREADS_RULE})")
    _add_verbosity(perf)

    report = commands.add_parser(
        "report", help="tables, plots and an HTML report from results directories",
        description="Without --out: print the tables in --format. With --out DIR: write DIR/report.html "
                    "(self-contained), tables.md/.tex/.csv/.json and figures/*.png|svg.")
    report.add_argument("--results", type=Path, action="append", metavar="DIR",
                        help="results directory (repeatable; default ./results); a directory whose "
                             "subdirectories hold results.sqlite stands for all of them")
    report.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep runs with this dataset, defense, label, run_id, seed, spec field or defense "
                             "parameter (repeatable; one key given twice matches either value)")
    report.add_argument("--out", type=Path, metavar="DIR", help="write the full report into DIR")
    report.add_argument("--format", choices=["md", "csv", "latex", "html", "json", "robustbench"], default="md",
                        help="what to print when --out is not given (default md; robustbench: RobustBench-style "
                             "model cards as JSON)")
    report.add_argument("--table", choices=TABLE_NAMES,
                        default="accuracy_under_attack",
                        help="the table --format csv prints (one tidy table; default accuracy_under_attack); "
                             "--out DIR writes one CSV per table")
    report.add_argument("--thresholds", type=_numbers,
                        help="certified thresholds T shown in tables and JSON (default: JSON 0 to 1 by 0.05; "
                             "tables 0,0.05,0.1,0.2,0.3,0.5,1; robust precision/recall 0.05,0.1)")
    report.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="what changed from run A to run B, metric by metric (run ids or unique prefixes)")
    report.add_argument("--title", default="Robustness benchmark report", help="title of the HTML report")
    report.add_argument("--dpi", type=_dpi, default=150, help=f"resolution of the PNG plots, 1 to {DPI_MAX} (default 150)")
    return parser


def _add_verbosity(command: argparse.ArgumentParser) -> None:
    noise = command.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress lines, warnings only (default: off)")
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="more detail on stderr: every progress update, each step's figures (default: off)")


def merged_options(args: argparse.Namespace) -> dict[str, Any]:
    """TOML config values, overridden by every option given on the command line.

    ``--profile NAME`` merges the config's ``[profiles.NAME]`` table over its top-level keys
    (tables such as ``param`` key by key). A config with ``[[runs]]`` entries yields
    ``options["runs"]``: one option dict per entry, the entry merged over the common keys and
    the command line over both; ``specs_from`` then builds the specs of every entry.
    """
    config: dict[str, Any] = {}
    profile = getattr(args, "profile", None)
    if args.config is not None:
        config = _with_profile(experiment_of(load_config(args.config)), args.config, profile)
    elif profile is not None:
        raise BenchError("--profile selects a profile of a config file; give --config FILE too")
    runs = config.pop("runs", None)
    _check_keys(config, f"config {args.config}")
    options = _with_command_line(config, args)
    if runs is not None:
        if not isinstance(runs, list) or not runs or not all(isinstance(entry, dict) for entry in runs):
            raise BenchError(f"config {args.config}: 'runs' must be a non-empty array of tables ([[runs]])")
        entries = []
        for number, entry in enumerate(runs, 1):
            where = f"config {args.config}, [[runs]] entry {number}"
            if isinstance(entry, dict) and not _in_profile(entry, profile, where):
                continue
            entry = _entry_profile(entry, profile, where) if isinstance(entry, dict) else entry
            _check_keys(entry, where)
            shared = sorted(set(entry) & {"out", "data_dir", "download", "device"})
            if shared:
                raise BenchError(f"{where}: {shared[0]!r} applies to all runs; set it at the top level")
            entries.append(_with_command_line(_deep_merge(config, entry), args))
        options["runs"] = entries
    validate_options(options)
    return options


def experiment_of(config: dict[str, Any]) -> dict[str, Any]:
    """A config's experiment: the file itself, or a reproduction file's ``[experiment]`` table
    (so ``bench run --config`` runs a reproduction's experiments without judging its claims)."""
    if "experiment" in config and isinstance(config["experiment"], dict):
        return config["experiment"]
    return config


def _in_profile(entry: dict[str, Any], profile: str | None, where: str) -> bool:
    """Whether a ``[[runs]]`` entry runs under ``profile``: ``only_in = ["paper"]`` keeps a run
    that a profile cannot afford out of the others."""
    only = entry.get("only_in")
    if only is None:
        return True
    if not isinstance(only, list) or not all(isinstance(name, str) for name in only):
        raise BenchError(f"{where}: 'only_in' must be a list of profile names, e.g. only_in = [\"paper\"]")
    return profile in only


def _entry_profile(entry: dict[str, Any], profile: str | None, where: str) -> dict[str, Any]:
    """A ``[[runs]]`` entry with its own ``[runs.profiles.NAME]`` table merged over it (a setting
    that only one run changes in one profile, e.g. a smaller training set for RobustOpt on CPU)."""
    entry = {key: value for key, value in entry.items() if key != "only_in"}
    profiles = entry.pop("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(table, dict) for table in profiles.values()):
        raise BenchError(f"{where}: 'profiles' must hold tables, e.g. [runs.profiles.cpu]")
    return _deep_merge(entry, profiles.get(profile, {})) if profile is not None else entry


def _check_keys(config: dict[str, Any], where: str) -> None:
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; accepted: {', '.join(sorted(CONFIG_KEYS | {'profiles', 'runs'}))}")


def _with_profile(config: dict[str, Any], path: Path, profile: str | None) -> dict[str, Any]:
    profiles = config.pop("profiles", None)
    if profiles is None:
        if profile is not None:
            raise BenchError(f"config {path} has no [profiles.*] tables; drop --profile {profile}")
        return config
    if not isinstance(profiles, dict) or not all(isinstance(table, dict) for table in profiles.values()):
        raise BenchError(f"config {path}: 'profiles' must hold tables, e.g. [profiles.cpu]")
    if profile is None:
        raise BenchError(f"config {path} has profiles {', '.join(profiles)}; choose one with --profile NAME")
    if profile not in profiles:
        raise BenchError(f"config {path} has no profile {profile!r}; available: {', '.join(profiles)}")
    return _deep_merge(config, profiles[profile])


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; tables merge key by key, everything else is replaced."""
    merged = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _deep_merge(merged[key], value) if both_tables else value
    return merged


def _with_command_line(config: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    options = dict(config)
    for key in ("param", "attack_param"):
        table = _flatten(options.get(key, {}), key)
        table.update(dict(parse_assignments(getattr(args, key) or [], "--" + key.replace("_", "-"))))
        options[key] = table
    for key, value in vars(args).items():
        if key in CONFIG_KEYS and key not in ("param", "attack_param") and value is not None:
            options[key] = _epsilon_option(value) if key == "epsilons" else value
    for key in ("defense", "attack", "dataset", "seed"):  # the axes of a grid: one or several values
        if key in options and not isinstance(options[key], list):
            options[key] = [options[key]]
    return options


def _flatten(table: Any, key: str) -> dict[str, Any]:
    """``{pixeldp = {L = 0.1}, draws = 10}`` -> ``{"pixeldp.L": 0.1, "draws": 10}``."""
    if not isinstance(table, dict):
        raise BenchError(f"config key {key!r} must be a table of KEY = VALUE")
    return flatten(table)


def specs_from(options: dict[str, Any]) -> list[RunSpec]:
    if options.get("runs"):
        # A parameter scoped to a defense/attack of another entry (e.g. a profile's pixeldp.draws
        # seen by the baseline entry) is not an error for this entry.
        selected = [{"defense": set(entry.get("defense") or ["baseline"]),
                     "attack": set(with_audit(entry.get("attack") or [], entry.get("epsilons"))[0]
                                   if entry.get("audit", True) is not False else entry.get("attack") or [])}
                    for entry in options["runs"]]
        everywhere = {key: set().union(*(names[key] for names in selected)) for key in ("defense", "attack")}
        specs = []
        for entry, names in zip(options["runs"], selected):
            entry = dict(entry)
            for key, owner in (("param", "defense"), ("attack_param", "attack")):
                others = everywhere[owner] - names[owner]
                entry[key] = {k: v for k, v in entry[key].items() if "." not in k or k.partition(".")[0] not in others}
            specs.extend(specs_from(entry))
        return specs
    defenses = options.get("defense") or ["baseline"]
    attacks = options.get("attack") or []
    for name in defenses:
        DEFENSES.get(name)
    for name in attacks:
        ATTACKS.get(name)
    epsilons = options.get("epsilons")
    if options.get("audit", True) is not False:
        attacks, epsilons = with_audit(attacks, epsilons)
    datasets = options.get("dataset") or ["digits"]
    seeds = options.get("seed") or [0]
    for name in datasets:
        DATASETS.get(name)
    unclaimed(options["param"], {d: _fields(DEFENSES.get(d).Params) for d in defenses}, "defense parameter",
              {name: _fields(obj.Params) for name, obj in DEFENSES.items()},
              default=None if options.get("defense") else "baseline")
    unclaimed(options["attack_param"], {a: _fields(ATTACKS.get(a).Params) for a in attacks}, "attack parameter",
              {name: _fields(obj.Params) for name, obj in ATTACKS.items()})
    common = {
        key: options[key]
        for key in ("model", "epsilons", "attack_backend", "eot_draws", "epochs", "batch_size",
                    "lr", "train_size", "test_size", "image_size", "eval_batch_size", "attack_batch_size")
        if key in options
    }
    if epsilons is not None:
        common["epsilons"] = epsilons
    return [
        RunSpec(defense=name, dataset=dataset, seed=seed, params=dict(options["param"]), attacks=list(attacks),
                attack_params=dict(options["attack_param"]), **common)
        for dataset in datasets for name in defenses for seed in seeds
    ]


def _fields(params_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(params_class)}


def command_run(args: argparse.Namespace) -> int:
    store, outcome, _ = run_request(args)
    from bench.metrics import TABLE_THRESHOLDS
    from bench.reports.render import render
    from bench.reports.tables import build_tables

    run_ids = outcome.run_ids
    tables = build_tables(store)
    shown = {name: table[table.run_id.isin(run_ids)] if not table.empty else table for name, table in tables.items()}
    if not shown["certified"].empty:
        certified = shown["certified"]
        shown["certified"] = certified[(certified.attack == CLEAN) & certified.threshold.isin(TABLE_THRESHOLDS)]
    print(render(shown, "md"))
    if _report_failures(outcome):
        return 1
    log.LOGGER.info(f"{len(run_ids)} run(s) in {store.path}")
    return 0


def _report_failures(outcome: Any) -> bool:
    if not outcome.failures:
        return False
    print(f"bench: {len(outcome.failures)} of {outcome.jobs} job(s) failed; their runs are marked failed, "
          "the others are stored, and the same command retries the failed jobs:", file=sys.stderr)
    for failure in outcome.failures:
        print(f"  {failure}", file=sys.stderr)
    return True


def planned_request(args: argparse.Namespace, threads: int) -> tuple[dict[str, Any], list[Any], dict[Any, Any]]:
    """The whole request checked, every spec of it, before any data is loaded or anything trained;
    then its data loaded and the subset sizes checked. Returns the options, specs and datasets."""
    from bench.threads import set_threads

    options = merged_options(args)
    specs = specs_from(options)
    if args.epsilons and not any(spec.attacks for spec in specs):
        raise BenchError(NO_ATTACK)
    for warning in validate_request(specs, device=options.get("device", "cpu"), out=options.get("out", Path("results"))):
        print(f"bench: warning: {warning}", file=sys.stderr)
    set_threads(threads)
    from bench.datasets.base import load_dataset

    data_dir = options.get("data_dir")
    datasets: dict[Any, Any] = {}
    for spec in specs:
        if (spec.dataset, spec.image_size) not in datasets:
            datasets[(spec.dataset, spec.image_size)] = load_dataset(
                spec.dataset, Path(data_dir) if data_dir else None, bool(options.get("download")), spec.image_size)
    for spec in specs:
        dataset = datasets[(spec.dataset, spec.image_size)]
        check_subset_size(spec.test_size, len(dataset.y_test), "test_size", spec.dataset)
        check_subset_size(spec.train_size, len(dataset.y_train), "train_size", spec.dataset)
    return options, specs, datasets


def run_request(args: argparse.Namespace, before_work: Callable[[list[Any], dict[Any, Any]], None] | None = None
                ) -> tuple[Any, Any, list[Any]]:
    """What ``bench run`` does before printing: check the whole request, load the data, run the
    grid. ``before_work`` sees the specs and the loaded datasets before any work starts (to check
    or announce them). Returns the store, the grid's outcome and the datasets."""
    most = 4 * (os.cpu_count() or 1)
    if args.jobs > most:
        raise BenchError(f"--jobs {args.jobs} is more worker processes than this machine can run: at most {most} "
                         f"(4 per core, {os.cpu_count() or 1} cores; each worker holds a copy of torch and the data); "
                         "for more, use --scheduler with a Dask cluster")
    if args.scheduler and args.jobs > 1:
        raise BenchError("--jobs sets local worker processes and --scheduler a Dask cluster; give one of them")
    if args.scheduler:
        check_scheduler(args.scheduler)
    from bench.executors import DaskCluster, LocalProcesses, Serial
    from bench.threads import default_threads, export_threads

    threads = args.threads or default_threads(args.jobs)
    export_threads(threads)  # before the workers (or their fork server) load torch
    executor = Serial()
    if args.jobs > 1:
        # The workers' start-up (importing torch, seconds) overlaps the checks, this process's
        # own imports (the checks import torch) and the data loading.
        executor = LocalProcesses(args.jobs, threads, fork_server=True)
        executor.start()
    try:
        options, specs, datasets = planned_request(args, threads)
        if before_work is not None:
            before_work(specs, datasets)
        if args.scheduler:
            executor = DaskCluster(args.scheduler, args.threads or 1)
        from bench.jobs import run_grid
        from bench.store import Store

        out = options.get("out", Path("results"))
        store = Store(out)  # after the data: missing or broken files leave no results folder behind
        outcome = run_grid(specs, datasets, store, executor, device=options.get("device", "cpu"), force=args.force)
    finally:
        executor.close()  # the fork server, if any, leaves with this process
    return store, outcome, list(datasets.values())


def reproduction_run_args(reproduction: Any, args: argparse.Namespace, out: Path) -> argparse.Namespace:
    """The ``bench run`` request of a reproduction's experiment under ``args`` (profile, dataset,
    data folder, workers)."""
    argv = ["run", "--config", str(reproduction.path), "--profile", args.profile, "--jobs", str(args.jobs), "--out", str(out)]
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir),
                        ("--scheduler", getattr(args, "scheduler", None)), ("--threads", args.threads)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--download"] if getattr(args, "download", None) else []
    return build_parser().parse_args(argv)


def command_reproduce(args: argparse.Namespace) -> int:
    from bench import reproduce

    if args.list:
        for name in reproduce.names():
            print(f"{name}: {reproduce.load(name).title}")
        return 0
    if not args.name:
        raise BenchError(f"bench reproduce needs a reproduction name: {', '.join(reproduce.names())} (or --list)")
    reproduction = reproduce.load(args.name)
    out = args.out or Path("results") / "-".join(["reproduce", args.name, args.profile] + ([args.dataset] if args.dataset else []))
    check_writable_dir(out, "reproduce --out")
    if args.docs is not None:
        check_writable_dir(args.docs, "reproduce --docs")
    run_args = reproduction_run_args(reproduction, args, out)
    log.LOGGER.info(f"reproduction {args.name} ({reproduction.title}), profile {args.profile}: "
                    f"{len(reproduction.claims)} claims to judge, results in {out}")
    journal = reproduce.Journal(out)  # the session's clock starts here, before any work

    def announce(specs: list[Any], loaded: dict[Any, Any]) -> None:
        for dataset in loaded.values():
            reproduce.check_dataset_kind(reproduction, dataset)
        if not log.LOGGER.isEnabledFor(logging.INFO):  # --quiet: nobody would read the estimate
            return
        log.LOGGER.info(f"what will run ({len(specs)} runs) and an upper bound of its cost, from unit costs "
                        f"measured here:\n{reproduce.plan_text(reproduce.cost_model(specs, loaded), args.jobs)}")

    finished = False
    try:
        store, outcome, datasets = run_request(run_args, before_work=announce)
        overhead = None
        if reproduction.uses_overhead:
            log.LOGGER.info("training and prediction overhead (Q4): interleaved rounds of each defense's training "
                            "steps and of PixelDP predictions (measured once per results folder)")
            overhead = reproduce.overhead_table(out, datasets[0], **reproduction.overhead_settings(args.profile))
        finished = True
    finally:
        if out.is_dir():  # every session's wall time is kept, an interrupted one's too
            journal.save(status="complete" if finished else "interrupted",
                         **({"failed_jobs": len(outcome.failures)} if finished else {}))
    shown_dir = "DIR" if args.data_dir is not None else None
    command = " ".join(["bench reproduce", args.name, "--profile", args.profile, "--jobs", str(args.jobs)]
                       + (["--dataset", args.dataset] if args.dataset else [])
                       + (["--data-dir", shown_dir] if shown_dir else []))
    verdicts, written = reproduce.write_outputs(reproduction, store, out, overhead, command, journal, args.docs,
                                                outcome.run_ids)
    print(reproduce.verdict_text(verdicts))
    log.LOGGER.info(f"report: {written[0]}" + (f"; docs page: {written[-1]}" if args.docs else ""))
    return 1 if _report_failures(outcome) else 0


def command_eval(args: argparse.Namespace) -> int:
    """``bench eval``: the checks that need no model first, then ``bench.api`` does the rest."""
    epsilons = _epsilon_option(args.epsilons) if args.epsilons else None
    validate_options({"seed": args.seed, "test_size": args.test_size, "eot_draws": args.eot_draws,
                      "device": args.device, "epsilons": epsilons if isinstance(epsilons, list) else None})
    if args.out is not None:
        check_writable_dir(args.out)
    DATASETS.get(args.dataset)
    defense_class = DEFENSES.get(args.defense)
    params = dict(parse_assignments(args.param or [], "--param"))
    attack_params = dict(parse_assignments(args.attack_param or [], "--attack-param"))
    attacks = args.attack or []
    if epsilons is not None and not attacks:
        raise BenchError(NO_ATTACK)
    for name in attacks:
        ATTACKS.get(name)
    unclaimed(params, {args.defense: _fields(defense_class.Params)}, "defense parameter")
    from bench.threads import default_threads, set_threads

    threads = args.threads or default_threads()
    set_threads(threads)
    from bench.api import evaluate, load_model, wrap
    from bench.metrics import TABLE_THRESHOLDS
    from bench.reports.render import render

    model = load_model(args.model, args.checkpoint)
    defense = wrap(args.defense, model, device=args.device, **params)
    results = evaluate(
        defense, args.dataset, attacks, epsilons, store=args.out, seed=args.seed, test_size=args.test_size,
        attack_params=attack_params, attack_backend=args.attack_backend, eot_draws=args.eot_draws, audit=args.audit,
        data_dir=args.data_dir, download=args.download, device=args.device, log=log.LOGGER.info, threads=threads,
    )
    tables = dict(results.tables)
    if args.format == "json":
        print(render(tables, "json"))
    else:
        certified = tables["certified"]
        if not certified.empty:
            tables["certified"] = certified[(certified.attack == CLEAN) & certified.threshold.isin(TABLE_THRESHOLDS)]
        print(render(tables, "md"))
        if args.out is not None:
            print(f"stored run {results.runs.run_id[0]} in {args.out / 'results.sqlite'}")
    return 0


def command_list(_: argparse.Namespace) -> int:
    for title, registry in (("defenses", DEFENSES), ("attacks", ATTACKS), ("datasets", DATASETS)):
        print(f"{title}:")
        for name, obj in registry.items():
            doc = (obj.__doc__ or "").strip().splitlines()
            print(f"  {name:16s} {doc[0] if doc else ''}")
            option = {"defenses": "--param", "attacks": "--attack-param"}.get(title)
            if option and dataclasses.is_dataclass(getattr(obj, "Params", None)):
                defaults = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in dataclasses.asdict(obj.Params()).items()]
                print(f"  {'':16s} {option} {' '.join(defaults) if defaults else '(none)'}")
            if title == "defenses":
                for line in _dataset_defaults(name):
                    print(f"  {'':16s} {line}")
            epsilons = getattr(obj, "default_epsilons", None)
            if title == "attacks" and epsilons:
                print(f"  {'':16s} {obj.norm} epsilons {','.join(f'{e:g}' for e in epsilons)}")
    return 0


def _dataset_defaults(defense: str) -> list[str]:
    """``bench list``'s lines for the defaults ``defense`` has per dataset (bench.training.TRAINING_DEFAULTS)."""
    from bench.training import TRAINING_DEFAULTS

    lines = []
    for (name, dataset), row in TRAINING_DEFAULTS.items():
        if name != defense:
            continue
        values = [f"--{key} {value:g}" if isinstance(value, float) else f"--{key} {value}"
                  for key, value in row.items() if key != "params"]
        values += [f"--param {key}={value:g}" if isinstance(value, float) else f"--param {key}={value}"
                   for key, value in row.get("params", {}).items()]
        lines.append(f"{'every dataset' if dataset == '*' else 'on ' + dataset}: {' '.join(values)}")
    return lines


def command_report(args: argparse.Namespace) -> int:
    if args.thresholds is not None:
        check_epsilons(args.thresholds, "thresholds")
    if args.out is not None:
        check_writable_dir(args.out, "report --out")
    from bench.metrics import TABLE_THRESHOLDS, THRESHOLD_GRID
    from bench.reports.compare import compare, render_comparison
    from bench.reports.load import load_results, result_stores
    from bench.reports.render import render, to_csv, write_json
    from bench.reports.tables import tables_from

    stores = result_stores(args.results)
    shown = tuple(args.thresholds) if args.thresholds else None
    if args.compare:
        if args.format == "robustbench":
            raise BenchError("--compare prints md, csv, latex or json; robustbench cards come from a report")
        comparison = compare(stores, *args.compare, thresholds=shown or TABLE_THRESHOLDS)
        fmt = "md" if args.format == "html" else args.format
        text = render_comparison(comparison, fmt)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"comparison.{ {'md': 'md', 'latex': 'tex', 'csv': 'csv', 'json': 'json'}[fmt] }"
            path.write_text(text + "\n", encoding="utf-8")
            print(path)
        else:
            sys.stdout.write(text + "\n")
        return 0
    where = parse_assignments(args.where, "--where", "dataset=svhn")
    results = load_results(stores, where)
    # plots draw certified accuracy over the full default grid, whatever the tables show
    grid = sorted({round(float(t), 6) for t in (*THRESHOLD_GRID, *(shown or ()))})
    tables = tables_from(results, grid)
    sources = [str(store.directory) for store in stores]
    if args.out or args.format == "html":
        import tempfile

        from bench.reports.html import write_report

        with tempfile.TemporaryDirectory() as scratch:
            out = args.out or Path(scratch)
            written = write_report(tables, results.runs, out, shown, shown, sources, where, args.title, args.dpi)
            if args.out:
                print("\n".join(str(p) for p in written))
            else:
                sys.stdout.write(written[0].read_text(encoding="utf-8"))
        return 0
    if shown and not tables["certified"].empty:
        certified = tables["certified"]
        tables["certified"] = certified[certified.threshold.isin([round(t, 6) for t in shown])]
    if args.format == "csv":
        sys.stdout.write(to_csv(tables[args.table]) if not tables[args.table].empty else "")
        return 0
    if args.format == "robustbench":
        from bench.reports.robustbench import render_robustbench

        sys.stdout.write(render_robustbench(tables, results.runs) + "\n")
        return 0
    if args.format == "json":
        write_json(tables, sys.stdout)  # row chunk by row chunk: the document can be hundreds of MB
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(render(tables, args.format, shown, shown) + "\n")
    return 0


def print_cost_model(args: argparse.Namespace) -> int:
    """``bench perf --reproduction NAME``: the reproduction's cost model, per run and step."""
    from bench import reproduce
    from bench.threads import default_threads

    reproduction = reproduce.load(args.reproduction)
    out = Path("results") / "-".join(["reproduce", args.reproduction, args.profile])
    _, specs, datasets = planned_request(reproduction_run_args(reproduction, args, out),
                                         args.threads or default_threads(args.jobs))
    for dataset in datasets.values():
        reproduce.check_dataset_kind(reproduction, dataset)
    costs = reproduce.cost_model(specs, datasets)
    shown = costs.assign(**{column: costs[column].map(lambda seconds: f"{seconds:.2f}") for column in ("CPU s", "expected CPU s")})
    print(f"cost model of {args.reproduction}, profile {args.profile}: unit costs measured on this machine "
          f"({reproduce.machine_class()}) times counts: a bound (no point broke before the largest budget) and "
          "the expected cost (the epsilon sweep's prior share of it)")
    print(shown.to_markdown(index=False))
    print(reproduce.plan_text(costs, args.jobs))
    return 0


def command_perf(args: argparse.Namespace) -> int:
    from bench.perf import Budget, render, run_perf
    from bench.threads import default_threads, set_threads

    if args.reproduction:
        return print_cost_model(args)
    set_threads(args.threads or default_threads())
    budget = Budget(rounds=args.rounds, max_rounds=max(args.rounds, args.max_rounds), seconds=args.row_seconds)
    rows, before, after = run_perf(tuple(args.only or PERF_SECTIONS), budget, images=args.images)
    print(f"machine: {before}")
    print(render(rows))
    print(f"after: load average {after.rsplit('load average ', 1)[-1]}")
    return 0


COMMANDS = {"run": command_run, "eval": command_eval, "list": command_list, "report": command_report, "perf": command_perf,
            "reproduce": command_reproduce}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is: the same clean-up as Ctrl-C (finished steps kept,
    unfinished runs handed back, workers stopped)."""


def _terminate(signum: int, frame: Any) -> NoReturn:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    committed_before = _committed_steps()
    previous_handler = _handle_sigterm()
    try:
        args = build_parser().parse_args(argv)
        log.configure(log.QUIET if getattr(args, "quiet", False) else log.VERBOSE if getattr(args, "verbose", False) else log.NORMAL)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a reader that left (BrokenPipeError) is caught, not at exit
        return code
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return getattr(error, "exit_status", 2)
    except Terminated:
        print(f"bench: terminated (SIGTERM); {_what_was_stored(committed_before)}", file=sys.stderr)
        return 143  # 128 + SIGTERM, what the shell reports for a process the signal ended
    except KeyboardInterrupt:
        print(f"bench: interrupted; {_what_was_stored(committed_before)}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout left (`bench report | head`): not an error of ours. Output still
        # buffered for the closed pipe goes nowhere instead of failing again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:
        print(f"bench: unexpected error (a bug: please report it); {_what_was_stored(committed_before)}", file=sys.stderr)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _handle_sigterm() -> Any:
    """Make SIGTERM raise ``Terminated`` while ``main`` runs; returns the handler to restore
    (None where signals cannot be handled: outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminate)


def _committed_steps() -> int:
    """Steps the results store committed in this process so far (0 before it was ever imported)."""
    store = sys.modules.get("bench.store")
    return store.committed_steps() if store is not None else 0


def _what_was_stored(committed_before: int) -> str:
    """What an interrupted or failed command kept: results are committed step by step, so the
    steps (and checkpoints) finished before stay stored, and the same command resumes after them."""
    committed = _committed_steps() - committed_before
    if committed:
        return (f"completed steps are stored and the same command resumes: this command stored {committed} "
                "step(s) or checkpoint(s), and whatever earlier commands stored is kept")
    return "nothing was stored by this command; whatever earlier commands stored is kept, and the same command resumes from it"


if __name__ == "__main__":
    sys.exit(main())
