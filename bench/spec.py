"""The experiment spec: what a run trains and evaluates, from CLI flags and/or a TOML file."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from bench.errors import BenchError
from bench.types import NORMS, Norm

# Attack sizes: one list for every attack, or lists keyed by norm (``linf``, ``l2``, ``l1``) or by
# attack name (``pgd-l2``); an attack that no key names uses its own default epsilons.
Epsilons = Union[Sequence[float], Mapping[str, Sequence[float]]]

# Batch sizes tuned for CPUs (measured: batches above about 128 rows are slower per image on 2
# cores); a GPU user raises them with --eval-batch-size / --attack-batch-size.
DEFAULT_EVAL_BATCH_SIZE = 128
DEFAULT_ATTACK_BATCH_SIZE = 64
# Fields added after stores existed: left out of the spec hash while unset, so that the runs of
# older stores keep their hash.
_HASHED_WHEN_SET = ("eval_batch_size", "attack_batch_size")


@dataclass
class RunSpec:
    """One defense on one dataset, with its training settings and the attacks it faces."""

    defense: str
    dataset: str = "digits"
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    attacks: list[str] = field(default_factory=list)
    attack_params: dict[str, Any] = field(default_factory=dict)
    epsilons: Epsilons | None = None
    attack_backend: str = "foolbox"
    eot_draws: int = 20
    # None: the defense's default on the dataset (bench.training.TRAINING_DEFAULTS); the runner
    # stores the resolved value.
    epochs: int | None = None
    batch_size: int = 64
    lr: float | None = None
    seed: int = 0
    train_size: int | None = None
    test_size: int | None = None
    image_size: int = 224
    # Batch sizes can change randomized results (noise and random starts are drawn per batch),
    # so they are part of the spec, though not of the training key. None: the CPU defaults.
    eval_batch_size: int | None = None
    attack_batch_size: int | None = None

    def training_key(self) -> dict[str, Any]:
        """The fields a trained model depends on: equal keys mean a checkpoint can be reused."""
        keys = ("defense", "dataset", "model", "params", "epochs", "batch_size", "lr", "seed", "train_size", "image_size")
        return {k: getattr(self, k) for k in keys}

    def training_hash(self) -> str:
        return stable_hash(self.training_key())

    def hash(self) -> str:
        fields = dataclasses.asdict(self)
        for key in _HASHED_WHEN_SET:
            if fields[key] is None:
                del fields[key]
        return stable_hash(fields)


def epsilons_for(epsilons: Epsilons | None, attack: str, norm: Norm, default: Sequence[float]) -> list[float]:
    """The attack sizes one attack runs at: its own key, else its norm's, else the one list for
    every attack, else the attack's ``default``."""
    if epsilons is None:
        return list(default)
    if isinstance(epsilons, Mapping):
        chosen = epsilons.get(attack, epsilons.get(norm))
        return list(default) if chosen is None else [float(e) for e in chosen]
    return [float(e) for e in epsilons]


# The audit: attacks that do not follow the defense's gradients, added beside the gradient
# attacks of each norm they cover (bench.attacks.audit); its norms, and nothing else, get a
# verdict on gradient masking.
AUDIT_ATTACKS: dict[str, tuple[str, ...]] = {"linf": ("square-linf", "transfer-linf"), "l2": ("square-l2", "transfer-l2")}
GRADIENT_KINDS = ("gradient", "adaptive")


def with_audit(attacks: Sequence[Any], epsilons: Epsilons | None) -> tuple[list[Any], Epsilons | None]:
    """``attacks`` (names or ``Attack`` objects) with the audit's attacks of every norm that a
    gradient attack among them covers, and ``epsilons`` extended so the audit attacks run at the
    union of that norm's epsilons (so they can be compared point for point)."""
    from bench.registry import ATTACKS  # registered attacks load torch; spec stays light

    attacks = list(attacks)
    names = {a if isinstance(a, str) else a.name for a in attacks}
    chosen: dict[str, list[float]] = {}
    for entry in attacks:
        attack = ATTACKS.get(entry) if isinstance(entry, str) else entry
        name = entry if isinstance(entry, str) else entry.name
        if attack.kind in GRADIENT_KINDS and attack.norm in AUDIT_ATTACKS:
            values = epsilons_for(epsilons, name, attack.norm, attack.default_epsilons)
            chosen.setdefault(attack.norm, [])
            chosen[attack.norm] = sorted(set(chosen[attack.norm]) | set(values))
    added = [(name, norm) for norm in chosen for name in AUDIT_ATTACKS[norm] if name not in names]
    if not added:
        return attacks, epsilons
    if isinstance(epsilons, Mapping) or epsilons is None:
        epsilons = dict(epsilons or {})
        for name, norm in added:
            if name not in epsilons:
                epsilons[name] = chosen[norm]
    return attacks + [name for name, _ in added], epsilons


def check_epsilon_keys(epsilons: Epsilons | None, attacks: Mapping[str, str]) -> None:
    """Every key of per-norm/per-attack epsilons names a norm or one of the selected ``attacks``
    (name -> norm), so a typo is not silently replaced by an attack's defaults."""
    if not isinstance(epsilons, Mapping):
        return
    for key in epsilons:
        if key not in NORMS and key not in attacks:
            raise BenchError(f"--epsilons {key}=...: {key!r} is neither a norm ({', '.join(NORMS)}) nor a selected "
                             f"attack ({', '.join(attacks) or 'none selected'})")
        if key in NORMS and attacks and key not in attacks.values():
            raise BenchError(f"--epsilons {key}=...: no selected attack has norm {key} "
                             f"(selected: {', '.join(f'{a} ({n})' for a, n in attacks.items())})")


def stable_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(table: dict[str, Any]) -> dict[str, Any]:
    """One level of nesting to dotted keys: ``{"pixeldp": {"L": 0.1}, "seed": 1}`` ->
    ``{"pixeldp.L": 0.1, "seed": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def parse_assignments(items: Sequence[str], flag: str, example: str = "L=0.1") -> list[tuple[str, str]]:
    """``["L=0.1", "pixeldp.draws=300"]`` -> ``[("L", "0.1"), ("pixeldp.draws", "300")]``, in order and
    keeping a repeated key (``--where`` matches any of its values; ``dict()`` keeps the last); a
    one-line error naming ``flag`` for anything else."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"{flag} {item!r} is malformed; expected KEY=VALUE, e.g. {flag} {example}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def scoped(values: dict[str, Any], owner: str, accepted: set[str]) -> dict[str, Any]:
    """Values for one defense or attack: ``owner.key`` always, a bare ``key`` when ``owner`` accepts it."""
    chosen = {k: v for k, v in values.items() if "." not in k and k in accepted}
    chosen.update({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(owner + ".")})
    return chosen


def unclaimed(
    values: dict[str, Any],
    owners: dict[str, set[str]],
    what: str,
    candidates: dict[str, set[str]] | None = None,
    default: str | None = None,
) -> None:
    """Fail on a parameter that none of the selected defenses/attacks accepts.

    ``candidates`` (every registered name -> its parameters) lets the message say which ones
    have the key; ``default`` names what was selected implicitly (the default defense).
    """
    kind = what.split()[0]
    for key in values:
        owner, dot, name = key.partition(".")
        if dot:
            if owner not in owners:
                selected = ", ".join(owners) or "none"
                raise BenchError(f"{what} {key!r} names {owner!r}, which is not selected (--{kind} {owner}); selected: {selected}")
            if name not in owners[owner]:
                raise BenchError(f"{owner} has no parameter {name!r}; accepted: {', '.join(sorted(owners[owner])) or 'none'}")
        elif not any(key in accepted for accepted in owners.values()):
            if default is not None:
                own = ", ".join(sorted(owners.get(default, ()))) or "none"
                message = f"no selected {kind} has parameter {key!r}: without --{kind} the {kind} is {default} (parameters: {own})"
            elif not owners:
                message = f"{what} {key!r} given but no {kind} is selected (--{kind} NAME)"
            else:
                accepted = sorted({f"{o}.{k}" for o, keys in owners.items() for k in keys})
                message = f"no selected {kind} has parameter {key!r}; accepted: {', '.join(accepted) or 'none'}"
            having = sorted(n for n, keys in (candidates or {}).items() if key in keys)
            if having:
                message += f"; {kind}s with {key!r}: {', '.join(having)} (e.g. --{kind} {having[0]})"
            elif candidates is not None:
                message += f"; no {kind} has {key!r}"
            raise BenchError(message)


def load_config(path: Path) -> dict[str, Any]:
    """Read a TOML config; its keys are the long CLI options with ``_`` for ``-``."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise BenchError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise BenchError(f"config file {path} is not valid TOML: {error}") from None
    except OSError as error:
        raise BenchError(f"config file {path} is not readable: {error.strerror or error}") from None
