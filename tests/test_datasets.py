"""Every real loader on small files in the official format, written here; digits ships."""
from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.datasets.base import balanced_subset, fetch
from bench.errors import BenchError
from bench.registry import DATASETS
from helpers import float32_sum_tolerance


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_mnist(directory: Path, train: int = 30, test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": (np.arange(test) * 3) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(directory / name, array)
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader_reads_official_format(tmp_path, name):
    arrays = write_mnist(tmp_path)
    data = DATASETS.get(name)(data_dir=tmp_path)
    assert data.x_train.shape == (30, 1, 28, 28) and data.x_test.shape == (20, 1, 28, 28)
    assert data.x_test.dtype == torch.float32
    expected = arrays["t10k-images-idx3-ubyte.gz"][:, None] / 255.0
    # k / 255 in float32: one rounding (two if computed as k * (1/255)), relative to the value.
    assert np.allclose(data.x_test.numpy(), expected, rtol=float32_sum_tolerance(1), atol=0)
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()
    assert len(data.classes) == 10 and len(data.mean) == len(data.std) == 1
    assert data.provenance == {f: False for f in arrays}  # not the official files


def test_truncated_idx_file_is_a_one_line_error(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(BenchError, match="t10k-images-idx3-ubyte.gz is corrupt") as error:
        DATASETS.get("mnist")(data_dir=tmp_path)
    assert "\n" not in str(error.value) and "--download" in str(error.value)


def test_idx_payload_shorter_than_header_says(tmp_path):
    write_mnist(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + bytes(5))
    with pytest.raises(BenchError, match="expected 28 bytes"):
        DATASETS.get("mnist")(data_dir=tmp_path)


def test_missing_files_name_directory_files_and_download(tmp_path):
    with pytest.raises(BenchError) as error:
        DATASETS.get("mnist")(data_dir=tmp_path / "nowhere")
    message = str(error.value)
    assert "nowhere" in message and "t10k-images-idx3-ubyte.gz" in message and "--download" in message


def write_cifar(directory: Path, batches: dict[str, int], label_key: bytes, meta: tuple[str, bytes], classes: int) -> None:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, count in batches.items():
        batch = {b"data": rng.integers(0, 256, (count, 3072)).astype(np.uint8), label_key: list(np.arange(count) % classes)}
        with open(directory / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(directory / meta[0], "wb") as handle:
        pickle.dump({meta[1]: [f"class{i}".encode() for i in range(classes)]}, handle)


def test_cifar10_loader_and_channel_major_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}, b"labels", ("batches.meta", b"label_names"), 10)
    data = DATASETS.get("cifar10")(data_dir=tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    with open(folder / "test_batch", "rb") as handle:
        raw = pickle.load(handle)[b"data"]
    # Official layout: 1024 red values, then green, then blue, each row-major.
    assert data.x_test[0, 1, 0, 5].item() == pytest.approx(raw[0, 1024 + 5] / 255.0, rel=float32_sum_tolerance(1), abs=0)
    assert data.classes[3] == "class3"
    test_only = DATASETS.get("cifar10")(data_dir=tmp_path, test_only=True)
    assert len(test_only.x_train) == 0 and len(test_only.x_test) == 6


def test_cifar100_fine_labels(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", {"train": 8, "test": 5}, b"fine_labels", ("meta", b"fine_label_names"), 100)
    data = DATASETS.get("cifar100")(data_dir=tmp_path)
    assert data.num_classes == 100 and data.y_test.tolist() == [0, 1, 2, 3, 4]


def test_cifar_corrupt_pickle(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 6}, b"labels", ("batches.meta", b"label_names"), 10)
    (folder / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(BenchError, match="test_batch is corrupt"):
        DATASETS.get("cifar10")(data_dir=tmp_path)


def test_svhn_label_ten_is_digit_zero(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for name, labels in (("train_32x32.mat", [1, 2, 10, 3]), ("test_32x32.mat", [10, 5, 10])):
        images = rng.integers(0, 256, (32, 32, 3, len(labels))).astype(np.uint8)
        savemat(tmp_path / name, {"X": images, "y": np.array(labels)[:, None]})
    data = DATASETS.get("svhn")(data_dir=tmp_path)
    assert data.y_test.tolist() == [0, 5, 0] and data.y_train.tolist() == [1, 2, 0, 3]
    assert data.x_test.shape == (3, 3, 32, 32)
    from scipy.io import loadmat

    raw = loadmat(tmp_path / "test_32x32.mat")["X"]
    assert data.x_test[1, 2, 4, 7].item() == pytest.approx(raw[4, 7, 2, 1] / 255.0, rel=float32_sum_tolerance(1), abs=0)


def test_image_folder_resizes(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), colour).save(folder / "a.png")
    data = DATASETS.get("imagenet")(data_dir=tmp_path, image_size=16)
    assert data.classes == ["cat", "dog"] and data.x_test.shape == (2, 3, 16, 16)
    assert data.x_test[1, 2].mean().item() == 1.0  # the dog image is blue: 255 / 255 everywhere, exact


def test_digits_ships_and_is_in_unit_range():
    data = DATASETS.get("digits")()
    assert data.x_train.shape[1:] == (1, 8, 8) and len(data.x_train) + len(data.x_test) == 1797
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


def test_balanced_subset_is_seeded_and_balanced():
    labels = torch.arange(1000) % 10
    first = balanced_subset(labels, 100, seed=3)
    assert torch.equal(first, balanced_subset(labels, 100, seed=3))
    assert not torch.equal(first, balanced_subset(labels, 100, seed=4))
    assert torch.bincount(labels[first]).tolist() == [10] * 10
    skewed = torch.cat([torch.zeros(5, dtype=torch.long), torch.ones(95, dtype=torch.long)])
    assert torch.bincount(skewed[balanced_subset(skewed, 20, 0)]).tolist() == [5, 15]


def test_download_keeps_only_verified_files(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"official bytes")
    good = hashlib.md5(b"official bytes").hexdigest()
    with pytest.raises(BenchError, match="does not match"):
        fetch(source.as_uri(), tmp_path / "bad.bin", "0" * 32)
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.bin.part").exists()
    fetch(source.as_uri(), tmp_path / "good.bin", good)
    assert (tmp_path / "good.bin").read_bytes() == b"official bytes"


def test_download_fills_an_empty_directory(tmp_path, monkeypatch):
    from bench.datasets import idx
    from bench.datasets.base import md5

    mirror = tmp_path / "mirror"
    arrays = write_mnist(mirror)
    monkeypatch.setattr(idx, "MNIST_URL", mirror.as_uri() + "/")
    monkeypatch.setattr(idx, "MNIST_MD5", {f: md5(mirror / f) for f in arrays})
    target = tmp_path / "data"
    with pytest.raises(BenchError):
        DATASETS.get("mnist")(data_dir=target)
    data = DATASETS.get("mnist")(data_dir=target, download=True)
    assert len(data.x_test) == 20 and all(data.provenance.values())


def test_cifar_download_extracts_the_verified_archive(tmp_path, monkeypatch):
    import tarfile

    from bench.datasets import cifar
    from bench.datasets.base import md5

    staging = tmp_path / "staging"
    write_cifar(staging / "cifar-10-batches-py", {f"data_batch_{i}": 2 for i in range(1, 6)} | {"test_batch": 3},
                b"labels", ("batches.meta", b"label_names"), 10)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(cifar.CIFAR10, "archive", (archive.as_uri(), md5(archive)))
    data = DATASETS.get("cifar10")(data_dir=tmp_path / "data", download=True)
    assert len(data.x_train) == 10 and len(data.x_test) == 3


def test_a_test_only_cifar10_folder_loads_for_evaluation_and_names_the_missing_training_split(tmp_path):
    import bench

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {"test_batch": 6}, b"labels", ("batches.meta", b"label_names"), 10)
    data = bench.load_dataset("cifar10", tmp_path, test_only=True)
    assert data.x_test.shape == (6, 3, 32, 32) and len(data.x_train) == 0 and data.classes[9] == "class9"
    assert data.provenance == {"test_batch": False}  # written here, not the official file
    with pytest.raises(BenchError) as error:
        bench.load_dataset("cifar10", tmp_path)
    message = str(error.value)
    assert message.startswith("cifar10: the training split is missing: expected data_batch_1, data_batch_2, "
                              f"data_batch_3, data_batch_4, data_batch_5 in {folder} next to test_batch")
    assert "bench eval" in message and "\n" not in message
    assert bench.load_dataset("digits", test_only=True).x_test.shape == (500, 1, 8, 8)  # loaders without it: as usual
