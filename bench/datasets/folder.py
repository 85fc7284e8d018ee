"""An ImageNet-style folder tree: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from bench.datasets.base import Dataset, corrupt, to_float_images
from bench.errors import BenchError
from bench.registry import DATASETS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG"}


def read_split(directory: Path, classes: list[str], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images, labels = [], []
    for index, name in enumerate(classes):
        for file in sorted((directory / name).iterdir()):
            if file.suffix not in IMAGE_SUFFIXES:
                continue
            try:
                # Only the JPEG and PNG decoders, whatever the bytes claim (PIL would otherwise pick
                # any plugin, EPS through Ghostscript included); an image past PIL's pixel limit is
                # a decompression bomb, an error rather than PIL's warning.
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    image = _resized(file, image_size)
            except Exception as error:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, ...)
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise corrupt("imagenet", file, f"not a readable JPEG/PNG image: {reason}") from None
            images.append(image)
            labels.append(index)
    if not images:
        raise BenchError(f"imagenet: no JPEG/PNG images under {directory}/<class>/")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _resized(file: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(file, formats=["JPEG", "PNG"]) as image:
        image = image.convert("RGB")
        # Resize the short side, then centre-crop: the usual ImageNet evaluation transform.
        scale = image_size / min(image.size)
        width, height = max(image_size, round(image.width * scale)), max(image_size, round(image.height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - image_size) // 2, (height - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


@DATASETS.register("imagenet")
def load_image_folder(data_dir: Path, download: bool = False, image_size: int = 224, **_: object) -> Dataset:
    """Class folders of JPEG/PNG images under ``data_dir/train`` and ``data_dir/val``,
    resized to ``image_size`` (``--image-size``). There is no download: ImageNet needs a licence."""
    root = Path(data_dir)
    if (root / "imagenet" / "val").is_dir() and not (root / "val").is_dir():
        root = root / "imagenet"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise BenchError(
            f"imagenet: expected folders train/<class>/ and val/<class>/ of JPEG/PNG images in {root}; "
            "ImageNet cannot be downloaded automatically (licence): place the files there"
        )
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise BenchError("imagenet: reading images needs Pillow; pip install 'robustness-bench[imagenet]'") from None
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    missing = [c for c in classes if not (root / "val" / c).is_dir()]
    if missing:
        raise BenchError(f"imagenet: class folder val/{missing[0]} is missing in {root}; train and val need the same classes")
    x_train, y_train = read_split(root / "train", classes, image_size)
    x_test, y_test = read_split(root / "val", classes, image_size)
    return Dataset(
        name="imagenet",
        x_train=to_float_images(x_train),
        y_train=torch.from_numpy(y_train),
        x_test=to_float_images(x_test),
        y_test=torch.from_numpy(y_test),
        classes=classes,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
