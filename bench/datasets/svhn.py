"""SVHN cropped digits: the official ``train_32x32.mat`` / ``test_32x32.mat`` (label 10 = digit 0)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.datasets.base import Dataset, corrupt, require_files, to_float_images
from bench.errors import BenchError
from bench.registry import DATASETS

SVHN_MD5 = {
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d0373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


# The official files hold 73,257 (train), 26,032 (test) and 531,131 (extra) images; a file that
# declares far more is refused before its arrays are read (a compressed .mat can be a zip bomb).
MAX_IMAGES = 1_000_000


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``X`` and ``y`` of a MATLAB v5 file; scipy's reader builds arrays only (it runs no code),
    and the declared shapes are checked from the headers before any data is decompressed."""
    from scipy.io import loadmat, whosmat

    try:
        declared = {name: (shape, kind) for name, shape, kind in whosmat(path)}
        images_shape, _ = declared.get("X", ((), ""))
        labels_shape, _ = declared.get("y", ((), ""))
        if (len(images_shape) != 4 or tuple(images_shape[:3]) != (32, 32, 3) or images_shape[3] > MAX_IMAGES
                or int(np.prod(labels_shape)) != images_shape[3]):
            raise corrupt("svhn", path, f"expected keys X (32x32x3xN, N <= {MAX_IMAGES:,}) and y (N)")
        mat = loadmat(path, variable_names=["X", "y"])
    except BenchError:
        raise
    except Exception as error:  # scipy raises several types for damaged files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise corrupt("svhn", path, f"not a readable MATLAB file: {reason}") from None
    images, labels = mat.get("X"), mat.get("y")
    if images is None or labels is None or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise corrupt("svhn", path, "expected keys X (32x32x3xN) and y (N)")
    if images.dtype.kind not in "uif" or labels.dtype.kind not in "uif":
        raise corrupt("svhn", path, "X and y must be numeric arrays")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != images.shape[3] or labels.min() < 1 or labels.max() > 10:
        raise corrupt("svhn", path, "labels must be N values in 1..10")
    labels[labels == 10] = 0  # the official files use 10 for the digit 0
    return images.transpose(3, 2, 0, 1).astype(np.uint8), labels


@DATASETS.register("svhn")
def load_svhn(data_dir: Path, download: bool = False, **_: object) -> Dataset:
    """SVHN from ``data_dir`` or ``data_dir/svhn``."""
    directory = Path(data_dir)
    if not (directory / "test_32x32.mat").exists():
        directory = directory / "svhn"
    provenance = require_files("svhn", directory, SVHN_MD5, {f: SVHN_URL + f for f in SVHN_MD5}, download)
    x_train, y_train = read_svhn_mat(directory / "train_32x32.mat")
    x_test, y_test = read_svhn_mat(directory / "test_32x32.mat")
    return Dataset(
        name="svhn",
        x_train=to_float_images(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=to_float_images(x_test),
        y_test=torch.from_numpy(y_test),
        classes=[str(d) for d in range(10)],
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        provenance=provenance,
    )
