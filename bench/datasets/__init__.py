"""Dataset loaders, one module per file format; each registers its dataset names."""
from bench.datasets import cifar, digits, folder, idx, svhn  # noqa: F401  (registration)
from bench.datasets.base import Dataset, balanced_subset

__all__ = ["Dataset", "balanced_subset"]
