"""Attack families; each module registers its attacks in ``bench.registry.ATTACKS``."""
from attacks.base import EOT, Attack, perturbation_norm

__all__ = ["EOT", "Attack", "perturbation_norm"]
