"""CIFAR-10 and CIFAR-100 in the official python-pickle layout."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from bench.datasets.base import Dataset, corrupt, fetch, missing_files_error, md5, to_float_images
from bench.registry import DATASETS

CIFAR10 = {
    "folder": "cifar-10-batches-py",
    "archive": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "train": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    },
    "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
    "meta": ("batches.meta", b"label_names"),
    "label_key": b"labels",
}
CIFAR100 = {
    "folder": "cifar-100-python",
    "archive": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
    "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
    "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    "meta": ("meta", b"fine_label_names"),
    "label_key": b"fine_labels",
}


def _unpickle(path: Path, name: str) -> dict:
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise corrupt(name, path, f"not a readable CIFAR pickle: {error}") from None


def _read_batches(directory: Path, files: list[str], label_key: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file in files:
        batch = _unpickle(directory / file, name)
        data = np.asarray(batch.get(b"data", []), dtype=np.uint8)
        batch_labels = np.asarray(batch.get(label_key, []), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch_labels) or len(data) == 0:
            raise corrupt(name, directory / file, f"expected b'data' N x 3072 uint8 and {label_key!r} of length N")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def load_cifar(spec: dict, name: str, data_dir: Path, download: bool, splits: tuple[str, ...]) -> Dataset:
    data_dir = Path(data_dir)
    directory = data_dir / spec["folder"]
    meta_file, meta_key = spec["meta"]
    needed = [meta_file] + [f for split in splits for f in spec[split]]
    missing = [f for f in needed if not (directory / f).is_file()]
    if missing and download:
        url, checksum = spec["archive"]
        archive = data_dir / url.rsplit("/", 1)[1]
        data_dir.mkdir(parents=True, exist_ok=True)
        if not archive.is_file():
            fetch(url, archive, checksum)
        with tarfile.open(archive) as tar:
            tar.extractall(data_dir, filter="data")
        missing = [f for f in needed if not (directory / f).is_file()]
    if missing:
        raise missing_files_error(name, directory, needed)
    checksums = {**spec["test"], **(spec["train"] if "train" in splits else {})}
    provenance = {f: md5(directory / f) == c for f, c in checksums.items()}
    classes = [c.decode() for c in _unpickle(directory / meta_file, name)[meta_key]]
    x_test, y_test = _read_batches(directory, list(spec["test"]), spec["label_key"], name)
    if "train" in splits:
        x_train, y_train = _read_batches(directory, list(spec["train"]), spec["label_key"], name)
    else:
        x_train, y_train = x_test[:0], y_test[:0]
    return Dataset(
        name=name,
        x_train=to_float_images(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=to_float_images(x_test),
        y_test=torch.from_numpy(y_test),
        classes=classes,
        mean=(0.4914, 0.4822, 0.4465) if name == "cifar10" else (0.5071, 0.4865, 0.4409),
        std=(0.2470, 0.2435, 0.2616) if name == "cifar10" else (0.2673, 0.2564, 0.2762),
        provenance=provenance,
    )


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Path, download: bool = False, test_only: bool = False, **_: object) -> Dataset:
    """CIFAR-10 from ``data_dir/cifar-10-batches-py``; ``test_only`` skips the training batches
    (for evaluating a stored checkpoint, e.g. on the 1,000-image test batch of ../shared/data)."""
    return load_cifar(CIFAR10, "cifar10", data_dir, download, ("test",) if test_only else ("train", "test"))


@DATASETS.register("cifar100")
def load_cifar100(data_dir: Path, download: bool = False, test_only: bool = False, **_: object) -> Dataset:
    """CIFAR-100 (fine labels) from ``data_dir/cifar-100-python``."""
    return load_cifar(CIFAR100, "cifar100", data_dir, download, ("test",) if test_only else ("train", "test"))

