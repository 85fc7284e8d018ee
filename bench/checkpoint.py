"""Loading model weights from files that are not trusted (kept free of heavy imports: defenses
load classifier checkpoints with it). The one way the harness reads a checkpoint: ``torch.load``
with ``weights_only=True``, so nothing in the file can run code."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError, one_line


def load_weights(path: Path | str, device: str = "cpu", what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load`` with ``weights_only``: tensors and plain containers, so nothing in the file
    can run code; whatever fails (a missing file or folder too) is one BenchError line."""
    path = Path(path)
    if path.is_dir():
        raise BenchError(f"{what} {path} is a directory; give the state-dict file itself (what torch.save wrote)")
    if not path.is_file():
        raise BenchError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types; its messages span lines
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            # torch's refusal: its first line advises loading unsafely, the reason comes after.
            details = [line.split("WeightsUnpickler error:")[-1].strip() for line in lines[1:]
                       if not line.startswith("Check the documentation")]
            reason = "it holds more than tensors: " + next((d for d in details if d), "refused by torch")
        else:
            reason = lines[0] if lines else type(error).__name__
        raise BenchError(f"{what} {path} is not loadable ({reason}){hint}") from None


def load_into(model: nn.Module, path: Path | str, what: str = "checkpoint", fits: str = "the model",
              device: str = "cpu") -> None:
    """Load the state dict in ``path`` (the file's dict itself, or its ``model`` or ``state_dict``
    entry) into ``model`` through :func:`load_weights`; ``fits`` names the model in the one-line
    error of weights that do not fit it."""
    state = load_weights(path, device, what)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"{what} {path} holds no state dict (names -> tensors)")
    try:
        model.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - shape and key mismatches, in torch's words
        raise BenchError(f"{what} {path} does not fit {fits}: {one_line(error)}") from None
