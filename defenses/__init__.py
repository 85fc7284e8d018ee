"""Defense adapters; each module registers itself in ``bench.registry.DEFENSES``."""
from bench.defenses import baseline  # noqa: F401  (registration)
from bench.defenses import madry  # noqa: F401  (registration)
from bench.defenses import pixeldp  # noqa: F401  (registration)
from bench.defenses import robustopt  # noqa: F401  (registration)
from bench.defenses import smoothing  # noqa: F401  (registration)
from bench.defenses.base import ABSTAIN, Certificate, Defense

__all__ = ["ABSTAIN", "Certificate", "Defense"]
