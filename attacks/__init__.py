"""Attack families; each module registers its attacks in ``bench.registry.ATTACKS``."""
from bench.attacks.base import Attack
from bench.attacks.eot import EOT
from bench.attacks import audit, autoattack, cw, fmn, pgd  # noqa: F401  (register their attacks)

__all__ = ["EOT", "Attack"]
