"""Validate a whole request before any work starts: no data loaded, nothing trained, nothing stored.

Two entry points, one set of checks:

- ``validate_options(options)``: the values of ``bench run`` options, whether they came from
  the command line (already parsed from text by argparse) or from a TOML config (typed by
  TOML). Types and ranges only; imports nothing heavy, so a typo here costs milliseconds.
- ``validate_request(specs, device=..., out=...)``: everything a list of ``RunSpec`` needs
  (the same value checks, then registry names, every defense's and attack's parameters built
  and checked, backends, model names); returns warnings. ``bench.api`` and the CLI call it.

Every failure is a ``BenchError`` whose message names the bad value and what is accepted.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bench.errors import BenchError
from bench.spec import RunSpec, check_epsilon_keys, epsilons_for, scoped
from bench.types import Norm

# Seeds are stored in an SQLite INTEGER (signed 64 bits); torch.manual_seed takes up to 2**64 - 1
# and the runner reduces the numpy seed modulo 2**32, so the store is the binding limit.
SEED_MAX = 2**63 - 1
ATTACK_BACKENDS = ("foolbox", "art")
DEVICES = "cpu, cuda, cuda:N (N = GPU index) or mps"
# Image shapes (C, H, W) of the built-in datasets, known before any file is read: the bounds of
# L2 and L1 epsilons. imagenet's size is --image-size; a plug-in dataset's is known once loaded.
DATASET_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "svhn": (3, 32, 32),
                  "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _name_list(key: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(name, str) and name for name in names):
            raise BenchError(f"{key} must be a name or a list of names, e.g. {key} = [\"NAME\"]; got {value!r}")
    return check


def _text(key: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise BenchError(f"{key} must be a non-empty string; got {value!r}")
    return check


def _positive_int(key: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not _is_int(value) or value < 1:
            raise BenchError(f"{key} must be a positive integer (1, 2, ...); got {value!r}")
    return check


def _each(check: Callable[[Any], None]) -> Callable[[Any], None]:
    """A grid axis (dataset, seed): one value or a non-empty list of values, each checked."""
    def check_all(value: Any) -> None:
        for item in value if isinstance(value, list) and value else [value]:
            check(item)
    return check_all


def check_seed(value: Any) -> None:
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise BenchError(f"seed must be an integer from 0 to 2**63-1 ({SEED_MAX}); got {value!r}")


def check_lr(value: Any) -> None:
    if not _is_number(value) or not (math.isfinite(value) and value > 0):
        raise BenchError(f"lr must be a finite number above 0, e.g. 0.05; got {value!r}")


def check_epsilons(value: Any, key: str = "epsilons") -> None:
    """A non-empty list of finite numbers >= 0 (attack sizes or certified thresholds); for
    ``epsilons`` also a table of such lists keyed by norm or attack name."""
    example = f"{key} = [0.05, 0.1] in a config, --{key} 0.05,0.1 on the command line"
    if key == "epsilons" and isinstance(value, Mapping) and value:
        for name, values in value.items():
            check_epsilons(values, f"epsilons.{name}" if isinstance(name, str) and name else "epsilons")
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise BenchError(f"{key} must be a non-empty list of numbers ({example}); got {value!r}")
    for eps in value:
        if not _is_number(eps) or not (math.isfinite(eps) and eps >= 0):
            raise BenchError(f"{key} must be finite numbers >= 0 ({example}); got {eps!r}")


def check_epsilon_bounds(attack: str, norm: Norm, epsilons: Sequence[float], input_dim: int | None,
                         dataset: str = "the images") -> None:
    """Every epsilon of ``attack`` is at most ``Norm.diameter(input_dim)``, the largest distance
    between two images (a larger one constrains nothing, so it is a mistake); one rule for
    ``bench run``, ``bench eval`` and ``bench.evaluate``."""
    bound = Norm(norm).diameter(input_dim)
    too_large = [eps for eps in epsilons if bound is not None and eps > bound]
    if too_large:
        reach = "1" if norm == "linf" else f"{'sqrt(d)' if norm == 'l2' else 'd'} = {bound:.6g} for d = {input_dim} values"
        raise BenchError(f"{attack}: {norm} epsilon {too_large[0]:g} is larger than the distance between any two images "
                         f"in [0, 1] of {dataset} ({reach}), so it constrains nothing; accepted: 0 to {bound:.6g}")


def check_subset_size(size: int | None, available: int, what: str, dataset: str) -> None:
    """A ``--test-size``/``--train-size`` the split can give (the whole split when ``None``)."""
    if size is not None and size > available:
        raise BenchError(f"{what} {size} is larger than the {dataset} {what.split('_')[0]} split ({available} images); "
                         f"give at most {available}, or leave it out for the whole split")


def check_attack_backend(value: Any) -> None:
    if value not in ATTACK_BACKENDS:
        raise BenchError(f"attack_backend {value!r} is not accepted; choose one of {', '.join(ATTACK_BACKENDS)}")


def check_data_dir(value: Any) -> None:
    _text("data_dir")(value)
    if Path(value).exists() and not Path(value).is_dir():
        raise BenchError(f"data_dir {value} is a file; give the folder that holds (or receives) the dataset files")


def check_download(value: Any) -> None:
    if not isinstance(value, bool):
        raise BenchError(f"download must be true or false; got {value!r}")


def check_device(device: Any) -> None:
    """cpu always; cuda[:N] and mps only where torch can use them (torch is imported only for those)."""
    if not isinstance(device, str):
        raise BenchError(f"device must be a string: {DEVICES}; got {device!r}")
    if device == "cpu":
        return
    match = re.fullmatch(r"(cuda|mps)(?::(\d+))?", device)
    if match is None:
        raise BenchError(f"device {device!r} is not accepted; use {DEVICES}")
    import torch

    kind, index = match.group(1), int(match.group(2) or 0)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            seen = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise BenchError(f"device {device!r} is not available: torch {torch.__version__} sees {seen}; use --device cpu")
    elif index or not torch.backends.mps.is_available():
        raise BenchError(f"device {device!r} is not available: torch {torch.__version__} has no MPS device here; use --device cpu")


def check_writable_dir(path: Any, what: str = "--out") -> None:
    """``path`` is a directory this process can create (if missing) and write into.

    Probes the nearest existing ancestor with a temporary directory that is removed at once, so
    nothing is left behind; catches a regular file in the way, /proc, read-only file systems and
    missing permissions (except for root, whom permission bits do not stop).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BenchError(f"{what} {path} is a file; give a directory (it is created if missing)")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise BenchError(f"{what} {path} cannot be created: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bench-write-check-", dir=existing))
    except OSError as error:
        reason = error.strerror or str(error)
        raise BenchError(f"{what} {path} is not writable: cannot create a directory in {existing} ({reason})") from None


def check_scheduler(address: str) -> None:
    """A Dask scheduler address: ``PROTOCOL://HOST:PORT`` (tcp, tls, ws, wss, ucx) or ``HOST:PORT``."""
    if not re.fullmatch(r"((tcp|tls|ws|wss|ucx)://)?(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", address):
        raise BenchError(f"--scheduler {address!r} is not a scheduler address; expected PROTOCOL://HOST:PORT "
                         "(tcp, tls, ws, wss, ucx), e.g. tcp://10.0.0.5:8786, as 'dask scheduler' prints it")


def _boolean(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise BenchError(f"{key} must be true or false, got {value!r}")


# One checker per option key; the CLI's parsed flags and a TOML config's values both go through it.
OPTION_CHECKS: dict[str, Callable[[Any], None]] = {
    "defense": _name_list("defense"),
    "attack": _name_list("attack"),
    "dataset": _each(_text("dataset")),
    "model": _text("model"),
    "epsilons": check_epsilons,
    "attack_backend": check_attack_backend,
    "eot_draws": _positive_int("eot_draws"),
    "epochs": _positive_int("epochs"),
    "batch_size": _positive_int("batch_size"),
    "lr": check_lr,
    "seed": _each(check_seed),
    "train_size": _positive_int("train_size"),
    "test_size": _positive_int("test_size"),
    "image_size": _positive_int("image_size"),
    "eval_batch_size": _positive_int("eval_batch_size"),
    "attack_batch_size": _positive_int("attack_batch_size"),
    "data_dir": check_data_dir,
    "download": check_download,
    "audit": lambda value: _boolean("audit", value),
    "out": lambda value: (_text("out")(value), check_writable_dir(value)),
    "device": check_device,
    "threads": _positive_int("threads"),
}


def validate_options(options: Mapping[str, Any]) -> None:
    """Check the type and range of every ``bench run`` option value (``None`` = not given).

    ``options`` holds config keys (``epochs``, ``lr``, ...; see ``bench.cli.CONFIG_KEYS``) and,
    for a config with ``[[runs]]``, ``runs``: a list of such dicts, each checked the same way.
    The cheap checks run first; only ``device`` other than cpu imports torch.
    """
    for key in sorted(OPTION_CHECKS, key=lambda k: k == "device"):
        value = options.get(key)
        if value is not None:
            OPTION_CHECKS[key](value)
    for entry in options.get("runs") or []:
        validate_options({k: v for k, v in entry.items() if k not in ("out", "device")})


def _spec_options(spec: RunSpec) -> dict[str, Any]:
    fields = dataclasses.asdict(spec)
    options = {key: fields[key] for key in OPTION_CHECKS if key in fields}
    options["attack"] = list(spec.attacks) or None
    return options


def _offers_bpda(defense_class: type) -> bool:
    """Whether a defense class overrides ``Defense.bpda_model`` (the base offers no approximation)."""
    return defense_class.bpda_model.__qualname__ != "Defense.bpda_model"


def validate_request(
    specs: Sequence[RunSpec], *, device: str = "cpu", out: str | os.PathLike | None = None
) -> list[str]:
    """Check a whole request before any work; return warnings worth showing (empty when none).

    Checks, for every spec: option values (as ``validate_options``), the results directory
    ``out`` (when given) is creatable and writable, ``device`` is available, the dataset,
    model, defense and attack names exist, every defense's and attack's parameters (keys and
    values: types, ranges, NaN/inf, through the ``Params.check()`` of each), and that each
    attack supports the backend. Raises ``BenchError`` on the first problem.
    """
    if not specs:
        raise BenchError("nothing to run: no defense selected")
    for spec in specs:
        validate_options(_spec_options(spec))
    if out is not None:
        check_writable_dir(out)
    check_device(device)

    from bench.registry import ATTACKS, DATASETS, DEFENSES, build_params

    warnings: list[str] = []
    for spec in specs:
        DATASETS.get(spec.dataset)
        if spec.model is not None:
            check_model_name(spec.model)
        defense = DEFENSES.get(spec.defense)
        fields = {f.name for f in dataclasses.fields(defense.Params)}
        build_params(defense.Params, scoped(spec.params, spec.defense, fields), f"defense {spec.defense}")
        check_epsilon_keys(spec.epsilons, {name: ATTACKS.get(name).norm for name in spec.attacks})
        unused = (f"epsilons are set but run {spec.defense} on {spec.dataset} has no attack: they are not used "
                  "(select attacks with --attack NAME or attack = [...])")
        if spec.epsilons is not None and not spec.attacks and unused not in warnings:
            warnings.append(unused)
        for name in spec.attacks:
            attack = ATTACKS.get(name)
            fields = {f.name for f in dataclasses.fields(attack.Params)}
            build_params(attack.Params, scoped(spec.attack_params, name, fields), f"attack {name}")
            if getattr(attack, "target", None) == "bpda" and not _offers_bpda(defense):
                raise BenchError(f"attack {name} runs through the defense's differentiable approximation, and defense "
                                 f"{spec.defense} offers none (Defense.bpda_model()); see docs/adaptive.md")
            backends = getattr(attack, "backends", ATTACK_BACKENDS)
            if spec.attack_backend not in backends:
                raise BenchError(f"attack {name} has no {spec.attack_backend!r} backend; use --attack-backend {' or '.join(backends)}")
            epsilons = epsilons_for(spec.epsilons, name, attack.norm, attack.default_epsilons)
            shape = DATASET_SHAPES.get(spec.dataset) or ((3, spec.image_size, spec.image_size)
                                                        if spec.dataset == "imagenet" else None)
            check_epsilon_bounds(name, attack.norm, epsilons, math.prod(shape) if shape else None, spec.dataset)
    return warnings


def check_model_name(name: str) -> None:
    """A model zoo name (the names ``bench.models.build_model`` accepts), without building it."""
    from bench.models import MODEL_NAMES, SMALL_CNNS

    wide = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if wide:
        depth, width = int(wide.group(1)), int(wide.group(2))
        if (depth - 4) % 6 != 0 or depth < 10 or width < 1:
            raise BenchError(f"model {name}: wide ResNet depth must be 6n+4 and at least 10 (10, 16, 22, 28, ...), width >= 1")
    elif name not in SMALL_CNNS and name not in ("resnet18", "resnet34", "resnet50"):
        raise BenchError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
