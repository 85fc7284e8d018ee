"""The vocabulary every layer shares: norms and the per-sample record."""
from __future__ import annotations

from typing import Literal, NamedTuple

Norm = Literal["linf", "l2", "l1"]
NORMS: tuple[Norm, ...] = ("linf", "l2", "l1")


class Record(NamedTuple):
    """One test sample under one evaluation step (``attack = "clean"`` or an attack at ``epsilon``).

    ``correct`` is 0/1; ``distance`` is the perturbation's size in ``norm`` (None on clean inputs);
    the ``certified_*`` fields are None for defenses that do not certify.
    """

    sample_index: int
    attack: str
    norm: Norm | None
    epsilon: float
    prediction: int
    label: int
    correct: int
    distance: float | None
    certified_label: int | None
    certified_radius: float | None
    certified_norm: Norm | None


RECORD_COLUMNS: tuple[str, ...] = ("run_id",) + Record._fields
