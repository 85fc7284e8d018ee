"""Benchmark harness for adversarial-robustness defenses."""

__version__ = "0.1.0"
