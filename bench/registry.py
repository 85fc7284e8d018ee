"""One registry type for datasets, defenses and attacks.

Built-ins register themselves when their package is imported; third-party adapters arrive
through a Python entry-point group (``bench.defenses``, ``bench.attacks``, ``bench.datasets``),
so ``pip install my-defense`` makes ``bench run --defense my-defense`` work.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from importlib.metadata import entry_points
from typing import Any, Callable, Generic, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str, builtin_package: str):
        self.kind = kind
        self.group = group
        self.builtin_package = builtin_package
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@DEFENSES.register("baseline")``."""

        def decorate(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise BenchError(f"{self.kind} {name!r} is registered twice")
            self._add(name, obj)
            return obj

        return decorate

    def _add(self, name: str, obj: T) -> None:
        """Register ``obj`` as ``name``: for a class with a ``name`` attribute (defenses, attacks),
        the key becomes its name, so that it has one name in stored runs, defaults and reports."""
        if isinstance(obj, type) and hasattr(obj, "name"):
            obj.name = name
        self._items[name] = obj

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self.builtin_package)
        for entry in entry_points(group=self.group):
            if entry.name in self._items:
                continue  # a built-in name wins over a plug-in of the same name
            try:
                self._add(entry.name, entry.load())
            except Exception as error:  # a broken plug-in must not take the harness down
                raise BenchError(
                    f"{self.kind} plug-in {entry.name!r} ({entry.value}) failed to load: {error}"
                ) from error

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            raise BenchError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def name_of(self, obj: T) -> str | None:
        """The name ``obj`` is registered under (built-ins and plug-ins alike), if any: the one name
        a defense or attack has in stored runs, training defaults and reports."""
        self._load()
        return next((name for name, item in self._items.items() if item is obj), None)

    def items(self) -> list[tuple[str, T]]:
        return [(name, self.get(name)) for name in self.names()]


DATASETS: Registry[Any] = Registry("dataset", "bench.datasets", "bench.datasets")
DEFENSES: Registry[Any] = Registry("defense", "bench.defenses", "bench.defenses")
ATTACKS: Registry[Any] = Registry("attack", "bench.attacks", "bench.attacks")


def defense_name(defense: Any) -> str:
    """A defense's one name: its registry key (for a plug-in, the entry point's name), else its
    declared ``name``, else its class name for an unregistered class."""
    return DEFENSES.name_of(type(defense)) or defense.name or type(defense).__name__.lower()


def _coerce(value: Any, annotation: Any, key: str, owner: str) -> Any:
    """Turn a command-line string (or a TOML value) into the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise BenchError(
                f"{owner} parameter {key}={value!r} is not accepted; choose one of {', '.join(map(str, choices))}"
            )
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise BenchError(f"{owner} parameter {key}={value!r} is not a boolean; use true or false")
    if annotation in (int, float):
        # TOML gives numbers, the command line text; a boolean is neither, and NaN or inf is never
        # a meaningful parameter (every range check would let NaN through).
        try:
            if isinstance(value, bool) or (annotation is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = annotation(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        except (TypeError, ValueError, OverflowError):
            kind = "an integer" if annotation is int else "a finite number"
            raise BenchError(f"{owner} parameter {key}={value!r} is not {kind}") from None
    if annotation is str:
        if not isinstance(value, str):
            raise BenchError(f"{owner} parameter {key}={value!r} is not a string")
        return value
    if annotation in (float | None, int | None, str | None):
        if value in (None, "", "none", "None"):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _coerce(value, inner, key, owner)
    return value


def build_params(params_class: type, values: dict[str, Any], owner: str) -> Any:
    """Build a parameter dataclass from user values, with one-line errors for bad keys/values."""
    if not dataclasses.is_dataclass(params_class):
        raise TypeError(f"{owner}: Params must be a dataclass")
    hints = typing.get_type_hints(params_class)
    fields = {f.name for f in dataclasses.fields(params_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        accepted = ", ".join(sorted(fields)) or "none"
        raise BenchError(f"{owner} has no parameter {unknown[0]!r}; accepted: {accepted}")
    coerced = {key: _coerce(value, hints[key], key, owner) for key, value in values.items()}
    instance = params_class(**coerced)
    check = getattr(instance, "check", None)
    if check is not None:
        check()
    return instance
