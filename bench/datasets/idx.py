"""IDX (gzip) files: MNIST and Fashion-MNIST."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from bench.datasets.base import Dataset, corrupt, require_files, to_float_images
from bench.registry import DATASETS

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


# MNIST's largest file holds 47 MB; an IDX file declaring more than this is refused, and no file
# is decompressed past what its header declares (a small .gz can expand to gigabytes).
MAX_IDX_BYTES = 1 << 30


def read_idx(path: Path, name: str) -> np.ndarray:
    """Parse an IDX file (uint8 payload), checking the magic number and the exact size."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read(4)
            if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
                raise corrupt(name, path, "bad IDX magic number; expected unsigned-byte IDX data")
            ndim = raw[3]
            header = 4 + 4 * ndim
            raw += handle.read(header - 4)
            if len(raw) < header:
                raise corrupt(name, path, "truncated IDX header")
            dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            expected = header + int(np.prod(dims, dtype=object))
            if expected > MAX_IDX_BYTES:
                raise corrupt(name, path, f"its header declares {expected:,} bytes, more than any IDX dataset here")
            raw += handle.read(expected + 1 - header)  # one byte more reveals trailing data
    except (OSError, EOFError, zlib.error) as error:
        raise corrupt(name, path, f"not a complete gzip file: {error}") from None
    if len(raw) != expected:
        found = len(raw) if len(raw) < expected else "more"
        raise corrupt(name, path, f"expected {expected} bytes after decompression, found {found}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dataset(
    name: str, directory: Path, checksums: dict[str, str], url: str, download: bool, classes: list[str]
) -> Dataset:
    provenance = require_files(name, directory, checksums, {f: url + f for f in checksums}, download)
    arrays = {key: read_idx(Path(directory) / file, name) for key, file in FILES.items()}
    for split in ("train", "test"):
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise corrupt(name, Path(directory) / FILES[f"{split}_labels"], "image and label counts differ")
    return Dataset(
        name=name,
        x_train=to_float_images(arrays["train_images"][:, None]),
        y_train=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        x_test=to_float_images(arrays["test_images"][:, None]),
        y_test=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        classes=classes,
        mean=(0.1307,) if name == "mnist" else (0.2860,),
        std=(0.3081,) if name == "mnist" else (0.3530,),
        provenance=provenance,
    )


@DATASETS.register("mnist")
def load_mnist(data_dir: Path, download: bool = False, **_: object) -> Dataset:
    """MNIST from the four official IDX gz files in ``data_dir`` or ``data_dir/mnist``."""
    directory = _locate(Path(data_dir), "mnist")
    return load_idx_dataset("mnist", directory, MNIST_MD5, MNIST_URL, download, [str(d) for d in range(10)])


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(data_dir: Path, download: bool = False, **_: object) -> Dataset:
    """Fashion-MNIST from its four IDX gz files in ``data_dir`` or ``data_dir/fashion-mnist``."""
    directory = _locate(Path(data_dir), "fashion-mnist")
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    return load_idx_dataset("fashion-mnist", directory, FASHION_MD5, FASHION_URL, download, classes)


def _locate(data_dir: Path, subfolder: str) -> Path:
    """Accept both ``DIR`` holding the files and ``DIR/<dataset>`` (the layout --download makes)."""
    if (data_dir / FILES["test_images"]).exists():
        return data_dir
    return data_dir / subfolder
