"""What an evaluation takes, checked before any work: data as a dataset name, a ``Dataset`` or
``(x, y)`` tensors (images in [0,1]), and a model whose logits fit them. Every check raises a
one-line ``BenchError`` that says what was wrong and what is accepted."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.datasets.base import Dataset, balanced_subset, load_dataset
from bench.errors import BenchError
from bench.validation import check_subset_size

Data = str | Dataset | tuple[Any, Any]


@dataclass
class EvalData:
    """The inputs one evaluation sees: images in [0,1] (NCHW), labels, and their sample indices."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    num_classes: int | None
    provenance: dict[str, bool] = field(default_factory=dict)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise BenchError(f"data: {what} must be a torch tensor or numpy array, got {type(value).__name__}")
    return value


def tensors_name(x: torch.Tensor, y: torch.Tensor) -> str:
    digest = hashlib.sha256(x.contiguous().numpy().tobytes() + y.contiguous().numpy().tobytes()).hexdigest()
    return f"tensors-{digest[:8]}"


def check_images(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` as float32 NCHW images in [0,1] and int64 labels; a one-line error otherwise."""
    x, y = _tensor(x, "x"), _tensor(y, "y")
    if x.dim() != 4:
        raise BenchError(f"data: x must be images N x C x H x W, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise BenchError(f"data: x must be float images in [0, 1], got dtype {x.dtype}")
    if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise BenchError(f"data: y must be {len(x)} integer labels, got dtype {y.dtype} shape {tuple(y.shape)}")
    if len(x) == 0:
        raise BenchError("data: no samples")
    low, high = float(x.min()), float(x.max())
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 1:
        raise BenchError(f"data: images must be in [0, 1] (found {low:g} .. {high:g}); normalisation belongs in the model")
    return x.float().cpu(), y.long().cpu()


def evaluation_data(
    data: Data, *, test_size: int | None = None, seed: int = 0, data_dir: Path | str | None = None,
    download: bool = False, name: str | None = None,
) -> EvalData:
    """The test split of a dataset name or ``Dataset`` (a seeded class-balanced subset of
    ``test_size``), or given ``(x, y)`` tensors (all of them, or a subset of ``test_size``)."""
    if isinstance(data, str):
        data = load_dataset(data, data_dir, download, test_only=True)
    if isinstance(data, Dataset):
        check_subset_size(test_size, len(data.y_test), "test_size", data.name)
        index = balanced_subset(data.y_test, test_size, seed)
        return EvalData(name or data.name, data.x_test[index], data.y_test[index], index, data.num_classes, data.provenance)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = check_images(*data)
        check_subset_size(test_size, len(y), "test_size", "given")
        index = balanced_subset(y, test_size, seed)
        return EvalData(name or tensors_name(x, y), x[index], y[index], index, None)
    raise BenchError("data must be a dataset name (e.g. 'digits'), a Dataset, or a tuple (x, y) of tensors")


def train_data(data: Data, *, train_size: int | None, seed: int, data_dir: Path | str | None, download: bool) -> tuple[str, torch.Tensor, torch.Tensor]:
    if isinstance(data, str):
        data = load_dataset(data, data_dir, download)
    if isinstance(data, Dataset):
        if len(data.y_train):
            check_subset_size(train_size, len(data.y_train), "train_size", data.name)
        index = balanced_subset(data.y_train, train_size, seed)
        if len(index) == 0:
            raise BenchError(f"dataset {data.name} has no training split here; train elsewhere and load the weights")
        return data.name, data.x_train[index], data.y_train[index]
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = check_images(*data)
        check_subset_size(train_size, len(y), "train_size", "given")
        index = balanced_subset(y, train_size, seed)
        return tensors_name(x, y), x[index], y[index]
    raise BenchError("data must be a dataset name (e.g. 'digits'), a Dataset, or a tuple (x, y) of tensors")


# -- the model fits the data -------------------------------------------------------------------------
@torch.no_grad()
def check_logits(model: nn.Module, data: EvalData, what: str = "model", device: str = "cpu") -> None:
    """One forward pass before any work: the model takes the data's images, returns one row of
    finite logits per image with one column per class, also at both ends of the [0,1] range."""
    probe = data.x[:4].to(device)
    ends = torch.stack([torch.zeros_like(data.x[0]), torch.ones_like(data.x[0])]).to(device)
    shape = "x".join(str(s) for s in data.x.shape[1:])
    was_training = model.training
    model.eval()
    try:
        outputs = [model(probe), model(ends)]
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BenchError(f"{what} does not accept {data.name} images ({shape}, values in [0,1]): {message}") from None
    finally:
        model.train(was_training)
    for output, inputs in zip(outputs, (probe, ends)):
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != len(inputs):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise BenchError(f"{what} must return logits of shape (batch, classes) for {data.name} images ({shape}); got {got}")
    if not all(output.is_floating_point() for output in outputs):
        raise BenchError(f"{what} returns {outputs[0].dtype} outputs; logits must be floating point "
                         "(the scores before softmax, which attacks differentiate)")
    classes = outputs[0].shape[1]
    expected = data.num_classes if data.num_classes is not None else int(data.y.max()) + 1
    # A known class count must match; for bare tensors, every label needs a logit.
    fits = classes == expected if data.num_classes is not None else classes >= expected
    if not fits:
        raise BenchError(f"{what} returns {classes} logits per image; {data.name} has {expected} classes")
    if not all(torch.isfinite(output).all() for output in outputs):
        raise BenchError(f"{what} returns non-finite logits on {data.name} images in [0,1]; "
                         "does it expect another input range (e.g. 0..255 or normalised inputs)?")
