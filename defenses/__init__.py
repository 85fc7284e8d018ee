"""Defense adapters; each module registers itself in ``bench.registry.DEFENSES``."""
from defenses import baseline  # noqa: F401  (registration)
from defenses import madry  # noqa: F401  (registration)
from defenses import pixeldp  # noqa: F401  (registration)
from defenses import robustopt  # noqa: F401  (registration)
from defenses import smoothing  # noqa: F401  (registration)
from defenses.base import ABSTAIN, Certificate, Defense

__all__ = ["ABSTAIN", "Certificate", "Defense"]
