"""scikit-learn's bundled 8x8 digits: the embedded default, no download."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.datasets.base import Dataset
from bench.registry import DATASETS


@DATASETS.register("digits")
def load_digits(data_dir: Path | None = None, download: bool = False, **_: object) -> Dataset:
    """1,797 images; a fixed, stratified 1,297/500 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=500, random_state=0, stratify=labels
    )
    return Dataset(
        name="digits",
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        classes=[str(d) for d in range(10)],
        mean=(0.3,),
        std=(0.4,),
    )
