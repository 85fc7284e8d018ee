"""The vocabulary every layer shares: norms, the per-sample record and the certificate."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # torch stays out of the imports of light modules (option checks, the CLI)
    import torch


class Norm(enum.StrEnum):
    """The norm of a threat model, and everything that depends on it: the size of a perturbation,
    the largest distance between two images, its default attack sizes and its names. A member
    equals its string (``Norm.LINF == "linf"``), so stored records and user input compare as they
    are; ``Norm(text)`` parses one."""

    LINF = "linf"
    L2 = "l2"
    L1 = "l1"

    def size(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-sample norm of a perturbation batch, in pixel units."""
        flat = delta.flatten(1)
        if self is Norm.LINF:
            return flat.abs().amax(1)
        return flat.norm(dim=1) if self is Norm.L2 else flat.abs().sum(1)

    def diameter(self, input_dim: int | None) -> float | None:
        """The largest distance between two images in [0, 1]^d (d = C*H*W values): 1 in L-inf,
        sqrt(d) in L2, d in L1 (all-black to all-white); ``None`` where it needs d and d is unknown."""
        if self is Norm.LINF:
            return 1.0
        if input_dim is None:
            return None
        return math.sqrt(input_dim) if self is Norm.L2 else float(input_dim)

    @property
    def default_epsilons(self) -> tuple[float, ...]:
        """Attack sizes in [0,1] pixel units; every attack of a norm shares them, so that their
        curves line up in one plot (0.3 is MNIST's L-inf standard; 8x8 digits break between 0.02
        and 0.1 in L-inf and around 0.5-1 in L2, MNIST around 1-2 in L2)."""
        return {"linf": (0.01, 0.02, 0.05, 0.1, 0.2, 0.3), "l2": (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
                "l1": (0.5, 1.0, 2.0, 4.0, 8.0)}[self.value]

    @property
    def threat_model(self) -> str:
        """The name RobustBench and AutoAttack give the norm: ``Linf``, ``L2``, ``L1``."""
        return {"linf": "Linf", "l2": "L2", "l1": "L1"}[self.value]

    @property
    def symbol(self) -> str:
        """The name in tables and plots: ``L∞``, ``L2``, ``L1``."""
        return {"linf": "L∞", "l2": "L2", "l1": "L1"}[self.value]


NORMS: tuple[Norm, ...] = tuple(Norm)

ABSTAIN = -1
"""The label of a point on which a defense declines to predict or certify."""

# The tables of the JSON contract (``bench.reports.tables``), named once: ``bench report --table``
# takes them before any heavy import.
TABLE_NAMES = ("clean", "accuracy_under_attack", "certified", "cost", "diagnostics", "ranking")

CLEAN = "clean"
"""The attack name of the unattacked step: the clean inputs' records and diagnostics carry it."""


def has_certificate(label, radius):
    """The certificate rule, the one definition: a point is certified iff its certified ``label``
    is not ``ABSTAIN`` and its ``radius`` is above 0 (elementwise on tensors, arrays and Series)."""
    return (label != ABSTAIN) & (radius > 0)


def certified_at(certified, radius, threshold):
    """Certified at threshold T: certified (``has_certificate``) and ``radius >= T``."""
    return certified & (radius >= threshold)


# ``has_certificate`` as an SQL expression over the records table's columns (the store derives the
# ``certified`` column of older stores with it).
HAS_CERTIFICATE_SQL = f"(certified_label != {ABSTAIN} AND certified_radius > 0)"


@dataclass
class Certificate:
    """Per input: the certified ``label``, the certified ``radius`` in ``norm``, and ``certified``,
    the mask of the points that carry a certificate at all.

    The guarantee: for a certified point, every input within ``radius`` (in ``norm``) of it gets
    ``label``. It is exact (deterministic) when ``confidence`` is None, e.g. RobustOpt's dual
    bound; for Monte Carlo certificates (PixelDP, randomized smoothing) it holds with probability
    at least ``confidence = 1 - eta`` over the defense's noise draws.

    One convention for every defense: a point without a certificate is not certified at any
    threshold T, T = 0 included. That covers abstention (``label = ABSTAIN``), a robustness test
    that failed, and a radius of exactly 0 (a certificate of size 0 guarantees nothing about any
    perturbed input), so ``certified`` is always false where ``label`` is ``ABSTAIN`` or the
    radius is not above 0 (``has_certificate``), and the radius of an uncertified point is stored
    as 0. Certified at T means ``certified and radius >= T`` (``certified_at``).
    """

    label: torch.Tensor
    radius: torch.Tensor
    norm: Norm
    certified: torch.Tensor | None = None
    confidence: float | None = None

    def __post_init__(self) -> None:
        mask = has_certificate(self.label, self.radius)
        self.certified = mask if self.certified is None else self.certified.bool() & mask
        self.radius = self.radius.where(self.certified, self.radius.new_zeros(()))


class Record(NamedTuple):
    """One test sample under one evaluation step (``attack = "clean"`` or an attack at ``epsilon``).

    ``correct``: the prediction equals the true label (stored as 0/1); ``distance`` is the perturbation's size in ``norm`` (None on clean inputs);
    the ``certified_*`` fields and ``certified`` (0/1, the point carries a certificate; see
    ``Certificate``) are None for defenses that do not certify.
    """

    sample_index: int
    attack: str
    norm: Norm | None
    epsilon: float
    prediction: int
    label: int
    correct: bool
    distance: float | None
    certified_label: int | None
    certified_radius: float | None
    certified_norm: Norm | None
    certified: int | None = None


RECORD_COLUMNS: tuple[str, ...] = ("run_id",) + Record._fields
