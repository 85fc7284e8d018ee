"""Attack speed, side by side in one process on the same model and batch (not a test); the
references and the measuring live in bench/perf.py, which `bench perf` also uses.

    python benchmarks/bench_attacks.py [--images 256] [--repeats 3] [--threads N] [--no-mnist]

Compares
- our pgd-linf (foolbox and ART backends, 20 steps) with a hand-written torch PGD loop;
- our cw-l2 (foolbox backend) with calling foolbox's L2CarliniWagnerAttack directly;
on the digits CNN trained for a few epochs on scikit-learn digits and, for PGD, on the MNIST CNN
(random weights and inputs: PGD's cost does not depend on them). All runs use the same 64-image
chunks; each timing is the best of ``--repeats`` interleaved runs, since the CPU may be shared.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Callable

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)  # foolbox imports scipy.ndimage.filters

from bench.attacks.base import DEFAULT_CHUNK  # noqa: E402
from bench.perf import foolbox_cw_direct as _foolbox_cw_direct, interleaved, torch_pgd as _torch_pgd  # noqa: E402
from bench.attacks.cw import CarliniWagnerL2, CWL2Params  # noqa: E402
from bench.attacks.pgd import LinfPGD, PGDParams  # noqa: E402
from bench.datasets.digits import load_digits  # noqa: E402
from bench.models import build_model  # noqa: E402
from bench.training import TrainConfig  # noqa: E402
from bench.defenses.baseline import Baseline  # noqa: E402

STEPS = 20


def torch_pgd(model, x, y, eps):
    return _torch_pgd(model, x, y, eps, DEFAULT_CHUNK, STEPS)


def foolbox_cw_direct(model, x, y, params):
    return _foolbox_cw_direct(model, x, y, params, DEFAULT_CHUNK)


def best_of(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` interleaved rounds (bench.perf's measure)."""
    return {name: seconds for name, (seconds, _) in interleaved(functions, repeats).items()}


def report(title: str, times: dict[str, float], reference: str) -> None:
    print(f"\n{title}")
    for name, seconds in times.items():
        print(f"  {name:34s} {seconds:7.3f} s   {seconds / times[reference]:5.2f}x {reference}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-mnist", action="store_true", help="skip the MNIST-size PGD comparison")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    digits = load_digits()
    torch.manual_seed(0)
    defense = Baseline(build_model("digits-cnn", digits.shape, 10, digits.mean, digits.std))
    defense.fit(digits.x_train, digits.y_train, TrainConfig(epochs=5))
    model = defense.attack_model().eval()
    x, y = digits.x_test[: args.images], digits.y_test[: args.images]

    ours = LinfPGD(PGDParams(steps=STEPS, restarts=1))
    ours_art = LinfPGD(PGDParams(steps=STEPS, restarts=1), backend="art")
    eps = 0.1
    times = best_of({
        "hand-written torch PGD": lambda: torch_pgd(model, x, y, eps),
        "pgd-linf (foolbox backend)": lambda: ours.run(model, x, y, [eps]),
        "pgd-linf (art backend)": lambda: ours_art.run(model, x, y, [eps]),
    }, args.repeats)
    report(f"PGD-Linf, {STEPS} steps, eps {eps}, digits CNN, {len(x)} images 1x8x8", times, "hand-written torch PGD")

    if not args.no_mnist:
        mnist = build_model("mnist-cnn", (1, 28, 28), 10, (0.13,), (0.31,)).eval()
        xm = torch.rand(args.images, 1, 28, 28)
        ym = mnist(xm).argmax(1).detach()
        times = best_of({
            "hand-written torch PGD": lambda: torch_pgd(mnist, xm, ym, eps),
            "pgd-linf (foolbox backend)": lambda: ours.run(mnist, xm, ym, [eps]),
            "pgd-linf (art backend)": lambda: ours_art.run(mnist, xm, ym, [eps]),
        }, args.repeats)
        report(f"PGD-Linf, {STEPS} steps, eps {eps}, MNIST CNN, {len(xm)} images 1x28x28", times, "hand-written torch PGD")

    params = CWL2Params()
    cw = CarliniWagnerL2(params)
    times = best_of({
        "foolbox L2CarliniWagnerAttack direct": lambda: foolbox_cw_direct(model, x, y, params),
        "cw-l2 (foolbox backend)": lambda: cw.smallest_adversarials(model, x, y),
    }, args.repeats)
    report(f"CW-L2 (9 x 100, PixelDP settings), digits CNN, {len(x)} images", times, "foolbox L2CarliniWagnerAttack direct")


if __name__ == "__main__":
    main()
