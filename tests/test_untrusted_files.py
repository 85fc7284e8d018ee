"""Data files are untrusted: a CIFAR pickle may not run code, and a malformed one is a one-line error."""
from __future__ import annotations

import builtins
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from bench.errors import BenchError
from bench.registry import DATASETS
from test_datasets import write_cifar

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def python2_pickle(value) -> bytes:
    """``value`` as Python 2's cPickle (protocol 2) wrote the official CIFAR files: byte strings
    as BINSTRING, arrays through numpy 1's ``numpy.core.multiarray._reconstruct``."""

    def encode(item) -> bytes:
        if isinstance(item, bytes):
            return b"T" + struct.pack("<i", len(item)) + item
        if isinstance(item, int):
            return b"J" + struct.pack("<i", item)
        if isinstance(item, list):
            return b"](" + b"".join(encode(v) for v in item) + b"e"
        if isinstance(item, dict):
            return b"}(" + b"".join(encode(k) + encode(v) for k, v in item.items()) + b"u"
        if isinstance(item, np.ndarray):
            assert item.dtype == np.uint8 and item.flags.c_contiguous
            dtype = b"cnumpy\ndtype\n" + encode(b"u1") + b"\x89\x88\x87R" + b"(" + encode(3) + encode(b"|") + b"NNN" + encode(-1) + encode(-1) + encode(0) + b"tb"
            array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + encode(0) + b"\x85" + encode(b"b") + b"\x87R"
            state = b"(" + encode(1) + b"(" + b"".join(encode(n) for n in item.shape) + b"t" + dtype + b"\x89" + encode(item.tobytes()) + b"tb"
            return array + state
        raise TypeError(type(item))

    return b"\x80\x02" + encode(value) + b"."


def test_the_official_python2_layout_loads(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
        batches[name] = data
        batch = {b"batch_label": b"testing batch 1 of 1", b"labels": [0, 9, 4], b"data": data,
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
        (folder / name).write_bytes(python2_pickle(batch))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(python2_pickle({b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}))
    data = DATASETS.get("cifar10")(data_dir=tmp_path)
    assert data.classes[1] == "automobile" and data.y_test.tolist() == [0, 9, 4]
    expected = batches["test_batch"].reshape(3, 3, 32, 32).astype(np.float32) / 255
    assert np.array_equal(data.x_test.numpy(), expected)
    assert np.array_equal(data.x_train[:3].numpy(), batches["data_batch_1"].reshape(3, 3, 32, 32).astype(np.float32) / 255)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_batches_repickled_by_python3_load_at_every_protocol(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {name: 2 for name in CIFAR10_FILES}, b"labels", ("batches.meta", b"label_names"), 10)
    data = np.asfortranarray(np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256).astype(np.uint8)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": data, b"labels": np.array([7, 3])}, handle, protocol=protocol)
    loaded = DATASETS.get("cifar10")(data_dir=tmp_path)
    assert loaded.y_test.tolist() == [7, 3]
    assert np.array_equal(loaded.x_test.numpy(), data.reshape(2, 3, 32, 32) / np.float32(255))


class Reduces:
    """Unpickles to ``function(*args)``: the classic pickle gadget."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def gadgets(marker: Path) -> dict[str, object]:
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": Reduces(os.system, f"touch {marker}"),
        "builtins.eval": Reduces(builtins.eval, touch),
        "builtins.exec": Reduces(builtins.exec, touch),
        "inside the labels": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Reduces(builtins.eval, touch)]},
        "in an object array": {b"data": np.array([Reduces(os.system, f"touch {marker}")], dtype=object), b"labels": [0]},
    }


@pytest.mark.parametrize("target", ["test_batch", "batches.meta"])
@pytest.mark.parametrize("gadget", list(gadgets(Path("m"))))
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, target, gadget):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {name: 2 for name in CIFAR10_FILES}, b"labels", ("batches.meta", b"label_names"), 10)
    marker = tmp_path / "ran"
    (folder / target).write_bytes(pickle.dumps(gadgets(marker)[gadget]))
    with pytest.raises(BenchError) as error:
        DATASETS.get("cifar10")(data_dir=tmp_path)
    assert not marker.exists()
    message = str(error.value)
    assert f"{target} is corrupt (not a readable CIFAR pickle: it names " in message and "\n" not in message


def test_the_cli_refuses_a_planted_pickle_on_one_line_before_any_work(bench, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {name: 2 for name in CIFAR10_FILES}, b"labels", ("batches.meta", b"label_names"), 10)
    marker = tmp_path / "ran"
    (folder / "test_batch").write_bytes(pickle.dumps(Reduces(os.system, f"touch {marker}")))
    code, stdout, stderr = bench("run", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    assert code == 2 and not marker.exists() and not (tmp_path / "r").exists()
    (line,) = stderr.splitlines()
    assert line.startswith("bench: error: cifar10:") and "names posix.system" in line


@pytest.mark.parametrize("content, why", [
    ([1, 2, 3], "found a list"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"cat", b"dog"]}, "found list"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "integers below 10"),
    ({b"data": np.zeros((2, 3072), np.float64), b"labels": [0, 1]}, "N x 3072 uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "found NoneType"),
])
def test_a_batch_of_the_wrong_structure_is_a_one_line_error(tmp_path, content, why):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {name: 2 for name in CIFAR10_FILES}, b"labels", ("batches.meta", b"label_names"), 10)
    (folder / "test_batch").write_bytes(pickle.dumps(content))
    with pytest.raises(BenchError, match="test_batch is corrupt") as error:
        DATASETS.get("cifar10")(data_dir=tmp_path)
    assert why in str(error.value) and "\n" not in str(error.value)


def test_meta_of_the_wrong_structure_is_a_one_line_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder, {name: 2 for name in CIFAR10_FILES}, b"labels", ("batches.meta", b"label_names"), 10)
    (folder / "batches.meta").write_bytes(pickle.dumps([b"airplane"]))
    with pytest.raises(BenchError, match=r"batches.meta is corrupt \(expected a dict whose b'label_names' is a list"):
        DATASETS.get("cifar10")(data_dir=tmp_path)


def test_an_idx_file_is_never_decompressed_past_its_declared_size(tmp_path):
    import gzip

    from test_datasets import write_mnist

    write_mnist(tmp_path)
    # 10^12 declared bytes: refused from the header alone, nothing more is read.
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (10**6, 1000, 1000)))
    with pytest.raises(BenchError, match="header declares 1,000,000,000,016 bytes"):
        DATASETS.get("mnist")(data_dir=tmp_path)
    # A payload longer than declared (a stream that goes on expanding) stops one byte past it.
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (20, 28, 28)) + bytes(20 * 784 + 10**6))
    with pytest.raises(BenchError, match=f"expected {16 + 20 * 784} bytes after decompression, found more"):
        DATASETS.get("mnist")(data_dir=tmp_path)


def test_an_svhn_file_of_the_wrong_structure_is_refused_from_its_headers(tmp_path):
    from scipy.io import savemat

    labels = np.array([[1], [2]])
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": labels})
    savemat(tmp_path / "test_32x32.mat", {"X": {"nested": np.zeros(3)}, "y": labels})
    with pytest.raises(BenchError, match=r"test_32x32.mat is corrupt \(expected keys X \(32x32x3xN") as error:
        DATASETS.get("svhn")(data_dir=tmp_path)
    assert "\n" not in str(error.value)


def test_an_image_file_is_read_only_by_the_jpeg_and_png_decoders(tmp_path, monkeypatch):
    from PIL import Image

    for split in ("train", "val"):
        folder = tmp_path / split / "cat"
        folder.mkdir(parents=True)
        Image.new("RGB", (12, 12), (10, 20, 30)).save(folder / "a.png")
    Image.new("RGB", (12, 12)).save(tmp_path / "val" / "cat" / "b.jpg", format="GIF")  # a GIF named .jpg
    with pytest.raises(BenchError, match=r"b.jpg is corrupt \(not a readable JPEG/PNG image"):
        DATASETS.get("imagenet")(data_dir=tmp_path, image_size=8)
    (tmp_path / "val" / "cat" / "b.jpg").unlink()
    # Past PIL's pixel limit an image is a decompression bomb: an error, not PIL's warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BenchError, match="decompression bomb"):
        DATASETS.get("imagenet")(data_dir=tmp_path, image_size=8)


def test_a_checkpoint_that_would_run_code_is_refused_on_one_line(tmp_path):
    from bench.store import Store

    store = Store(tmp_path)
    marker = tmp_path / "ran"
    path = store.checkpoint_path("abc")
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(Reduces(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(BenchError, match=r"is not loadable \(it holds more than tensors: .*; delete it to retrain") as error:
        store.load_checkpoint("abc")
    assert not marker.exists() and "\n" not in str(error.value)
