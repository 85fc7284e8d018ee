"""The CIFAR-10 and SVHN reproductions end to end through the CLI at their tiny profile, on tiny
files written in the official formats (CIFAR-10's python pickles, SVHN's MATLAB files), and the
one-line error a user without the files gets."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

# One colour per class (pixels in [0, 1]): images a small net tells apart in a few dozen steps,
# even with PixelDP's noise at L = 1.0.
PALETTE = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0],
                    [1, 0, 1], [0, 1, 1], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0.5, 0]])


def coloured_images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` images (uint8, N x 3 x 32 x 32), each its class's colour plus a little noise,
    and their labels (0..9, balanced, shuffled)."""
    labels = rng.permutation(np.arange(count) % 10)
    colours = PALETTE[labels][:, :, None, None] * 0.8 + 0.1
    pixels = colours + rng.normal(0, 0.05, (count, 3, 32, 32))
    return np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8), labels


def write_cifar10(root: Path, per_batch: int = 60, test: int = 40, train: bool = True) -> Path:
    """``root/cifar-10-batches-py`` in the official python layout: data_batch_1..5 (unless not
    ``train``), test_batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = [(f"data_batch_{i}", per_batch) for i in range(1, 6)] if train else []
    for name, count in files + [("test_batch", test)]:
        images, labels = coloured_images(count, rng)
        # Official layout: N x 3072 uint8, 1024 red values, then green, then blue; labels a list.
        batch = {b"batch_label": name.encode(), b"data": images.reshape(count, 3072), b"labels": labels.tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, handle)
    return folder


def write_svhn(root: Path, train: int = 300, test: int = 40) -> None:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat``: X is 32 x 32 x 3 x N, y is N x 1
    with 10 for the digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for name, count in (("train_32x32.mat", train), ("test_32x32.mat", test)):
        images, labels = coloured_images(count, rng)
        savemat(root / name, {"X": images.transpose(2, 3, 1, 0), "y": np.where(labels == 0, 10, labels)[:, None]})


@pytest.mark.parametrize("name, write", [("pixeldp-cifar10", write_cifar10), ("pixeldp-svhn", write_svhn)])
def test_the_reproduction_runs_on_official_format_files_through_the_cli(bench, tmp_path, name, write):
    from bench import reproduce

    data, out = tmp_path / "data", tmp_path / "out"
    write(data)
    code, stdout, stderr = bench("reproduce", name, "--profile", "tiny", "--data-dir", str(data), "--out", str(out),
                                 "--quiet")
    assert code == 0, stderr
    ids = [claim.id for claim in reproduce.load(name).claims]
    for claim_id in ids:  # every claim printed with a verdict
        assert re.search(rf"^(HOLDS|CONTRADICTED|INCONCLUSIVE) +{re.escape(claim_id)} ", stdout, re.M), claim_id
    assert re.search(r"claims: \d+ holds, \d+ contradicted, \d+ inconclusive", stdout)
    page = (out / "report" / "report.html").read_text()
    assert all(f"<td>{claim_id}</td>" in page for claim_id in ids)
    assert (out / "report" / "overhead.csv").is_file() == reproduce.load(name).uses_overhead


@pytest.mark.parametrize("name, folder, files", [
    ("pixeldp-cifar10", "cifar-10-batches-py", ["batches.meta", "data_batch_1", "data_batch_5", "test_batch"]),
    ("pixeldp-svhn", "svhn", ["train_32x32.mat", "test_32x32.mat"]),
])
def test_without_the_files_one_line_says_where_to_put_which(bench, tmp_path, name, folder, files):
    out = tmp_path / "out"
    code, _, stderr = bench("reproduce", name, "--profile", "tiny", "--data-dir", str(tmp_path / "data"),
                            "--out", str(out), "--quiet")
    assert code == 2 and stderr.strip().count("\n") == 0, stderr
    assert str(tmp_path / "data" / folder) in stderr and all(f in stderr for f in files), stderr
    assert "--download" in stderr
    assert not out.exists()  # missing files leave no results folder behind


def test_cifar10_with_only_the_test_split_names_the_training_files(bench, tmp_path):
    folder = write_cifar10(tmp_path / "data", train=False)
    code, _, stderr = bench("reproduce", "pixeldp-cifar10", "--profile", "tiny", "--data-dir", str(tmp_path / "data"),
                            "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and stderr.strip().count("\n") == 0, stderr
    assert "training split is missing" in stderr and str(folder) in stderr
    assert all(f"data_batch_{i}" in stderr for i in range(1, 6))
