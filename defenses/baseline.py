"""The undefended model, trained with the shared loop and plain cross-entropy."""
from bench.defenses.base import Defense
from bench.registry import DEFENSES


@DEFENSES.register("baseline")
class Baseline(Defense):
    """No defense: the reference every other defense is compared with."""

