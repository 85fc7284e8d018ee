"""Attack families; each module registers its attacks in ``bench.registry.ATTACKS``."""
from bench.attacks.base import EOT, Attack, perturbation_norm
from bench.attacks import cw, pgd  # noqa: F401  (registers pgd-linf, pgd-l2, cw-l2, cw-linf)

__all__ = ["EOT", "Attack", "perturbation_norm"]
