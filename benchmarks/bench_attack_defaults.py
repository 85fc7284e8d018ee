"""How strong the default CW and PGD settings are, and what they cost (not a test).

    OMP_NUM_THREADS=1 python benchmarks/bench_attack_defaults.py cw  [--images 500] [--results results]
    OMP_NUM_THREADS=1 python benchmarks/bench_attack_defaults.py pgd [--images 500] [--results results]
    OMP_NUM_THREADS=1 python benchmarks/bench_attack_defaults.py rand [--images 500] [--results results]

``cw``: on the digits baseline, CW-L2 settings (the PixelDP reference's, candidates for the
default, and the 6 x 500-step binary-search CW used as the yardstick), accuracy at every L2
epsilon of the pgd-l2 grid and wall time.
``pgd``: on the digits madry model at L-inf 0.1 and 0.2, PGD with several steps x restarts
against autoattack-linf (the ensemble), accuracy and time relative to PGD-20.
``rand``: on the digits pixeldp model (L=0.1), EOT PGD against AutoAttack's rand version at L2
0.5 and L-inf 0.1, every adversarial judged by the defense's own prediction rule.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)  # foolbox imports scipy.ndimage.filters
sys.path.insert(0, str(Path(__file__).parent))

from bench.attacks.autoattack import L2AutoAttack, LinfAutoAttack  # noqa: E402
from bench.attacks.eot import EOT  # noqa: E402
from bench.attacks.cw import CarliniWagnerL2, CWL2Params  # noqa: E402
from bench.attacks.pgd import L2PGD, LinfPGD, PGDParams  # noqa: E402
from digits_models import test_images, trained  # noqa: E402

L2_GRID = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)
CW_SETTINGS = {
    "yardstick 6x500 lr.01 c.1": CWL2Params(binary_search_steps=6, steps=500, learning_rate=0.01, initial_const=0.1),
    "6x100 lr.05 c.1": CWL2Params(binary_search_steps=6, steps=100, learning_rate=0.05, initial_const=0.1),
    "5x200 lr.05 c.1": CWL2Params(binary_search_steps=5, steps=200, learning_rate=0.05, initial_const=0.1),
    "pixeldp 9x100 lr.01 c.001": CWL2Params(binary_search_steps=9, steps=100, learning_rate=0.01, initial_const=0.001),
}
PGD_SETTINGS = [(20, 1), (50, 1), (100, 1), (50, 5), (100, 5)]


def accuracy(model, x_adv, y) -> float:
    with torch.no_grad():
        return 100 * float((model(x_adv).argmax(1) == y).float().mean())


def cw(args) -> None:
    model = trained("baseline", Path(args.results)).attack_model().eval()
    x, y = test_images(args.images)
    print("| settings | " + " | ".join(f"L2 {e:g}" for e in L2_GRID) + " | seconds |")
    print("|---|" + "---|" * (len(L2_GRID) + 1), flush=True)
    for name, params in CW_SETTINGS.items():
        started = time.perf_counter()
        adversarials = CarliniWagnerL2(params).run(model, x, y, L2_GRID)
        seconds = time.perf_counter() - started
        print(f"| {name} | " + " | ".join(f"{accuracy(model, a, y):.1f}" for a in adversarials)
              + f" | {seconds:.0f} |  load {os.getloadavg()[0]:.1f}", flush=True)


def pgd(args) -> None:
    model = trained("madry", Path(args.results)).attack_model().eval()
    x, y = test_images(args.images)
    epsilons = [0.1, 0.2]
    print("| attack | L-inf 0.1 | L-inf 0.2 | seconds | time / PGD-20 |")
    print("|---|---|---|---|---|", flush=True)
    unit = None
    runs = [(f"pgd {s} steps x {r} restarts", LinfPGD(PGDParams(steps=s, restarts=r))) for s, r in PGD_SETTINGS]
    runs.append(("autoattack-linf (standard)", LinfAutoAttack()))
    for name, attack in runs:
        torch.manual_seed(0)
        started = time.perf_counter()
        adversarials = attack.run(model, x, y, epsilons)
        seconds = time.perf_counter() - started
        unit = unit or seconds
        print(f"| {name} | " + " | ".join(f"{accuracy(model, a, y):.1f}" for a in adversarials)
              + f" | {seconds:.0f} | {seconds / unit:.1f}x |  load {os.getloadavg()[0]:.1f}", flush=True)


def rand(args) -> None:
    defense = trained("pixeldp", Path(args.results), {"L": 0.1})
    model = EOT(defense.attack_model(), 20)
    x, y = test_images(args.images)
    print("| attack (EOT 20 draws, judged by pixeldp's 300-draw prediction) | L2 0.5 | L-inf 0.1 | seconds |")
    print("|---|---|---|---|", flush=True)
    runs = [
        ("pgd 20 steps (before)", L2PGD(PGDParams(steps=20)), LinfPGD(PGDParams(steps=20))),
        ("pgd defaults", L2PGD(), LinfPGD()),
        ("pgd 50 steps", L2PGD(PGDParams(steps=50)), LinfPGD(PGDParams(steps=50))),
        ("autoattack rand (APGD-CE, APGD-DLR)", L2AutoAttack(), LinfAutoAttack()),
    ]
    for name, l2, linf in runs:
        cells, started = [], time.perf_counter()
        for attack, eps in ((l2, 0.5), (linf, 0.1)):
            torch.manual_seed(0)
            x_adv = attack.run(model, x, y, [eps], predict=defense.predict)[0]
            cells.append(100 * float((defense.predict(x_adv) == y).float().mean()))
        seconds = time.perf_counter() - started
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {seconds:.0f} |  load {os.getloadavg()[0]:.1f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["cw", "pgd", "rand"])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--results", default="results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.images} digits test images, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    {"cw": cw, "pgd": pgd, "rand": rand}[args.which](args)


if __name__ == "__main__":
    main()
