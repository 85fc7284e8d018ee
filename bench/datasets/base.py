"""The in-memory dataset every loader returns, and the file checks they share."""
from __future__ import annotations

import hashlib
import inspect
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bench.errors import BenchError, one_line
from bench.registry import DATASETS


@dataclass
class Dataset:
    """Float images in [0, 1], NCHW, int64 labels, plus what its models normalise with."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # file name -> True when the file matched its official checksum; recorded with each run.
    provenance: dict[str, bool] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_test.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def to_float_images(array: np.ndarray) -> torch.Tensor:
    """uint8 NCHW array -> contiguous float32 tensor in [0, 1] (a copy: parsed buffers are
    read-only, and a transposed layout such as SVHN's would give strided tensors that AutoAttack's
    ``view`` calls refuse)."""
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C")).div_(255.0)


def balanced_subset(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Indices of a deterministic, class-balanced subset of ``size`` items (all when None).

    Classes are sampled round-robin from seeded permutations, so every class gets
    size // classes items (the first classes one more) while it has them.
    """
    n = len(labels)
    if size is None or size >= n:
        return torch.arange(n)
    if size <= 0:
        raise BenchError(f"subset size must be positive, got {size}")
    generator = torch.Generator().manual_seed(seed)
    per_class = [
        (labels == c).nonzero().flatten()[torch.randperm(int((labels == c).sum()), generator=generator)]
        for c in torch.unique(labels).tolist()
    ]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < size:
        for members in per_class:
            if depth < len(members) and len(chosen) < size:
                chosen.append(int(members[depth]))
        depth += 1
    return torch.tensor(sorted(chosen))


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def missing_files_error(name: str, directory: Path, files: list[str], hint: str = "") -> BenchError:
    how = hint or f"pass --download to fetch them into {directory}"
    return BenchError(
        f"{name}: expected {', '.join(files)} in {directory}; {how}"
    )


def require_files(
    name: str,
    directory: Path,
    checksums: dict[str, str],
    urls: dict[str, str],
    download: bool,
) -> dict[str, bool]:
    """Make sure every file exists (downloading when asked) and report which are official.

    A file whose checksum differs from the official one is still loaded (subsets such as the
    1,000-image CIFAR-10 test batch are legitimate), but the run records it as unofficial; a
    file that is structurally broken fails in its parser with a one-line error.
    """
    directory = Path(directory)
    missing = [f for f in checksums if not (directory / f).is_file()]
    if missing and download:
        directory.mkdir(parents=True, exist_ok=True)
        for file in missing:
            fetch(urls[file], directory / file, checksums[file])
        missing = []
    if missing:
        raise missing_files_error(name, directory, missing)
    return {file: md5(directory / file) == checksum for file, checksum in checksums.items()}


def fetch(url: str, target: Path, checksum: str) -> None:
    """Download to ``target.part``, verify the md5, then rename: a partial file is never kept."""
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise BenchError(f"download of {url} failed: {error}") from None
    if md5(partial) != checksum:
        partial.unlink(missing_ok=True)
        raise BenchError(f"download of {url} does not match its official md5 {checksum}; nothing kept")
    os.replace(partial, target)


def corrupt(name: str, path: Path, why: str) -> BenchError:
    return BenchError(
        f"{name}: {path} is corrupt ({why}); delete it and fetch it again with --download"
    )


def load_dataset(
    name: str, data_dir: Path | str | None = None, download: bool = False, image_size: int = 224, *,
    test_only: bool = False,
) -> Dataset:
    """A registered dataset (``digits`` ships with scikit-learn; others read ``data_dir``, default ./data).

    ``test_only=True``: only the test split is needed (evaluation); a loader that can, reads no
    training files and needs none (CIFAR-10/100: ``test_batch``/``test`` and the meta file), and
    returns an empty training split. Other loaders read their files as usual.
    """
    loader = DATASETS.get(name)
    if data_dir is None and name != "digits":
        data_dir = Path("data")
    options = {"test_only": True} if test_only and _accepts(loader, "test_only") else {}
    try:
        return loader(data_dir=Path(data_dir) if data_dir is not None else None, download=download,
                      image_size=image_size, **options)
    except OSError as error:  # a file that exists but cannot be read (permissions, a folder in its place, I/O)
        where = f" {error.filename}" if error.filename else ""
        raise BenchError(f"{name}: cannot read{where}: {error.strerror or one_line(error)}; check its permissions "
                         "(the dataset files must be readable by this user)") from None


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    """Whether ``function`` takes ``keyword`` (by name, or through ``**kwargs``): a plug-in's loader may not."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
