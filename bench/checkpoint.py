"""Loading model weights from files that are not trusted (kept free of heavy imports: defenses
load classifier checkpoints with it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.errors import BenchError


def load_weights(path: Path | str, device: str = "cpu", what: str = "checkpoint", hint: str = "") -> Any:
    """``torch.load`` with ``weights_only``: tensors and plain containers, so nothing in the file
    can run code; whatever fails is one BenchError line."""
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
