"""How foolbox and ART see a torch model: the library adapters the attack modules share."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn


def foolbox_model(model: nn.Module, device: torch.device) -> Any:
    """foolbox's view of ``model`` over [0,1] images (foolbox 3.3.4 works with numpy 2)."""
    import foolbox

    return foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device=device)


def art_classifier(model: nn.Module, x: torch.Tensor, num_classes: int) -> Any:
    """ART's view of ``model``: cross-entropy on its logits, inputs clipped to [0,1]."""
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type="gpu" if x.is_cuda else "cpu",
    )


def to_numpy(x: torch.Tensor) -> np.ndarray:
    # ART computes in float32 and some of its attacks break on float64 input under numpy 2.
    return x.detach().cpu().numpy().astype(np.float32)


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])
