"""Benchmark harness for adversarial-robustness defenses.

The public API, from one import::

    import bench
    results = bench.evaluate(model, "digits", ["pgd-linf"], epsilons=[0.05, 0.1])
    results.accuracy_under_attack          # a pandas DataFrame with 95% intervals

``evaluate``, ``train``, ``wrap``, ``load_results``, ``load_model``, ``load_dataset`` and ``Results`` live in
:mod:`bench.api`; they load on first use, so ``import bench`` (and the CLI's bad-input errors)
stay fast.
"""

__version__ = "0.1.0"

__all__ = ["Results", "evaluate", "load_dataset", "load_model", "load_results", "train", "wrap"]


def __getattr__(name: str):
    if name in __all__:
        from bench import api

        return getattr(api, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
