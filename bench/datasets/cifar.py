"""CIFAR-10 and CIFAR-100 in the official python-pickle layout."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.datasets.base import Dataset, corrupt, fetch, missing_files_error, md5, to_float_images
from bench.errors import BenchError
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


# -- reading the pickles without running them ----------------------------------------------------
# pickle.load runs whatever callables a file names, so a planted test_batch could run code. The
# official files name only numpy's array reconstruction (and, re-pickled by Python 3, the bytes
# codec); this unpickler maps exactly those names to inert stand-ins that record the pickled
# state, refuses every other name, and builds the arrays itself from checked raw bytes, so
# numpy never sees pickle state either.
ARRAY_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}


class _PickledArray:
    """An ndarray as pickled: shape, dtype, memory order and raw bytes, checked in ``array``."""

    def __init__(self, state: tuple | None = None) -> None:
        self.state = state

    def __setstate__(self, state: tuple) -> None:  # the pickle's BUILD step of _reconstruct
        self.state = state

    def array(self) -> np.ndarray:
        state = self.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError("malformed array state")
        shape, dtype, fortran, raw = state[-4:]
        if not isinstance(dtype, _PickledDType) or not isinstance(raw, (bytes, bytearray, str)):
            raise ValueError("arrays must hold numbers")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"malformed array shape {shape!r}")
        raw = raw.encode("latin1") if isinstance(raw, str) else bytes(raw)
        kind = dtype.numpy()
        count = int(np.prod(shape, dtype=np.int64))
        if len(raw) != count * kind.itemsize:
            raise ValueError(f"array of shape {shape} needs {count * kind.itemsize} bytes, found {len(raw)}")
        return np.frombuffer(raw, dtype=kind, count=count).reshape(shape, order="F" if fortran else "C")


class _PickledDType:
    """A numpy dtype as pickled; only plain numeric types are accepted."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        self.name = name.decode("latin1") if isinstance(name, bytes) else name
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def numpy(self) -> np.dtype:
        order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else "|"
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if self.name not in ARRAY_DTYPES or order not in ("<", ">", "|", "="):
            raise ValueError(f"dtype {self.name!r} is not a plain numeric type")
        return np.dtype(self.name).newbyteorder("=" if order == "|" else order)


_NDARRAY = object()  # numpy.ndarray: only _reconstruct's first argument, never callable


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _PickledArray:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _PickledArray()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _PickledArray:
    """numpy's protocol-5 array reduction."""
    return _PickledArray((shape, dtype, order in ("F", b"F"), buffer))


def _scalar(dtype: Any, raw: Any) -> int | float:
    """A numpy scalar (e.g. labels re-pickled as a list of numpy integers), as a Python number."""
    return _PickledArray(((), dtype, False, raw)).array()[()].item()


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """How Python 3 pickles bytes at protocols 0-2: _codecs.encode(text, "latin1")."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than text to latin1 bytes")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1 (the official files)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,  # protocol 5
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _PickledDType,
    ("_codecs", "encode"): _encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}; CIFAR pickles may name only numpy arrays and dtypes"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of CIFAR pickles")


def _unpickle(path: Path, name: str) -> Any:
    try:
        with open(path, "rb") as handle:
            return _CifarUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - whatever a damaged or hostile file raises, one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise corrupt(name, path, f"not a readable CIFAR pickle: {reason}") from None


def _numbers(value: Any) -> np.ndarray:
    if isinstance(value, _PickledArray):
        return value.array()
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return np.asarray(value, dtype=np.int64)
    raise ValueError(f"found {type(value).__name__}")


def _read_classes(path: Path, key: bytes, name: str) -> list[str]:
    meta = _unpickle(path, name)
    names = meta.get(key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(c, (bytes, str)) for c in names):
        raise corrupt(name, path, f"expected a dict whose {key!r} is a list of class names")
    return [c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in names]


def _read_batches(
    directory: Path, files: list[str], label_key: bytes, name: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    expected = f"expected a dict with b'data' (N x 3072 uint8) and {label_key!r} (N integers below {num_classes})"
    for file in files:
        batch = _unpickle(directory / file, name)
        if not isinstance(batch, dict):
            raise corrupt(name, directory / file, f"{expected}, found a {type(batch).__name__}")
        try:
            data, batch_labels = _numbers(batch.get(b"data")), _numbers(batch.get(label_key))
        except (ValueError, TypeError, OverflowError) as error:
            raise corrupt(name, directory / file, f"{expected}: {error}") from None
        if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) == 0
                or batch_labels.dtype.kind not in "iu" or batch_labels.shape != (len(data),)
                or batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise corrupt(name, directory / file, expected)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
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
    test_files = [meta_file, *spec["test"]]
    if missing and not any(f in missing for f in test_files):
        # The test split is here, the training split is not: a run must train, an evaluation need not.
        raise BenchError(
            f"{name}: the training split is missing: expected {', '.join(spec['train'])} in {directory} next to "
            f"{', '.join(spec['test'])} (found only the test split); put the training files there or pass --download "
            "to train; to evaluate a trained model, the test split is enough: bench eval --model ... --dataset "
            f"{name}")
    if missing:
        raise missing_files_error(name, directory, needed)
    checksums = {**spec["test"], **(spec["train"] if "train" in splits else {})}
    provenance = {f: md5(directory / f) == c for f, c in checksums.items()}
    classes = _read_classes(directory / meta_file, meta_key, name)
    x_test, y_test = _read_batches(directory, list(spec["test"]), spec["label_key"], name, len(classes))
    if "train" in splits:
        x_train, y_train = _read_batches(directory, list(spec["train"]), spec["label_key"], name, len(classes))
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
    (for evaluating a stored checkpoint, e.g. on a 1,000-image subset of the test batch)."""
    return load_cifar(CIFAR10, "cifar10", data_dir, download, ("test",) if test_only else ("train", "test"))


@DATASETS.register("cifar100")
def load_cifar100(data_dir: Path, download: bool = False, test_only: bool = False, **_: object) -> Dataset:
    """CIFAR-100 (fine labels) from ``data_dir/cifar-100-python``."""
    return load_cifar(CIFAR100, "cifar100", data_dir, download, ("test",) if test_only else ("train", "test"))

