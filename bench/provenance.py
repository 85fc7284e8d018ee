"""Where a result came from: seeds, library versions, the time and the identity of weights.

On the ground floor, so that the store, the grid and the public API record a run's provenance
the same way without importing each other."""
from __future__ import annotations

import datetime
import hashlib
import platform
import random
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (every step of a run starts from here)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def library_versions() -> dict[str, str]:
    """The versions of Python and of the libraries a record depends on."""
    versions = {"python": platform.python_version()}
    for package in ("robustness-bench", "torch", "numpy", "foolbox", "adversarial-robustness-toolbox", "pyautoattack"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def now() -> str:
    """The time in UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def fingerprint(state: nn.Module | Mapping[str, Any]) -> str:
    """A short hash of a model's (or a defense's) state: names, shapes and bytes of every tensor.
    The identity of an outside model in specs: a resumed run must continue with the same weights."""
    digest = hashlib.sha256()

    def add(value: Any, name: str) -> None:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(str((tuple(value.shape), value.dtype)).encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key in sorted(value, key=str):
                add(value[key], f"{name}.{key}")
        else:
            digest.update(repr(value).encode())

    add(state.state_dict() if isinstance(state, nn.Module) else state, "")
    return digest.hexdigest()[:12]
