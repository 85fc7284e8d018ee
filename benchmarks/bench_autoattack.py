"""AutoAttack against the harness's PGD and a second implementation, side by side (not a test).

    OMP_NUM_THREADS=1 python benchmarks/bench_autoattack.py [--images 500] [--models madry,baseline]
        [--results results] [--threads 1] [--skip-art] [--threats linf:0.1,l2:0.5]

On the digits baseline and madry models (reused from ``--results``' checkpoints, else trained as
``bench run --dataset digits`` trains them), on the same images, at L-inf 0.05/0.1/0.2 and L2
0.25/0.5/1.0, runs
- ``pgd-20``: the harness's PGD with 20 steps (the time unit);
- ``pgd``: ``pgd-linf`` / ``pgd-l2`` with their current defaults;
- ``autoattack``: ``autoattack-linf`` / ``autoattack-l2`` (standard version, the reference's attacks);
- ``art``: the same cascade built from ART 1.20's own APGD-CE, APGD-T (its targeted DLR loss, 9
  target classes) and Square (5,000 queries), one restart each: the standard version less FAB-T,
  which ART lacks (ART's own ``AutoAttack`` class runs untargeted DLR, DeepFool and 5 restarts by
  default, and in targeted mode every attack against every class, Square included);
and prints accuracy per attack, autoattack's difference to each, the per-sample worst case of
all, and each attack's time relative to PGD-20. Rows print as they finish.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)  # foolbox imports scipy.ndimage.filters
sys.path.insert(0, str(Path(__file__).parent))

from bench.attacks.adapters import art_classifier, to_numpy  # noqa: E402
from bench.attacks.autoattack import L2AutoAttack, LinfAutoAttack  # noqa: E402
from bench.attacks.base import frozen_parameters, project  # noqa: E402
from bench.attacks.pgd import L2PGD, LinfPGD, PGDParams  # noqa: E402
from digits_models import test_images, trained  # noqa: E402

THREATS = [("linf", 0.05), ("linf", 0.1), ("linf", 0.2), ("l2", 0.25), ("l2", 0.5), ("l2", 1.0)]


def art_autoattack(model, x, y, eps, norm, targets=9, queries=5000, batch=256):
    """The standard cascade as far as ART 1.20 has it: APGD-CE, APGD-T (ART's targeted DLR loss,
    one run per target class, ``targets`` classes other than the true one, highest logits
    first as in the reference) and Square (``queries``), each only on the points still robust,
    one restart each. ART has no FAB, so FAB-T is the one stage missing."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack

    classifier = art_classifier(model, x, int(model(x[:1]).shape[1]))
    art_norm = np.inf if norm == "linf" else 2
    step = 2 * eps  # APGD's initial step (the reference's 2 * eps); ART adapts it from there

    def apgd(loss, targeted):
        return AutoProjectedGradientDescent(classifier, norm=art_norm, eps=eps, eps_step=step, max_iter=100,
                                            targeted=targeted, nb_random_init=1, batch_size=batch,
                                            loss_type=loss, verbose=False)

    x_np, y_np = to_numpy(x), y.numpy()
    with torch.no_grad():
        ranked = model(x).argsort(1, descending=True).numpy()
    target_lists = np.stack([row[row != label][:targets] for row, label in zip(ranked, y_np)])
    stages = [(apgd("cross_entropy", False), None)]
    stages += [(apgd("difference_logits_ratio", True), target_lists[:, k]) for k in range(targets)]
    stages.append((SquareAttack(classifier, norm=art_norm, eps=eps, max_iter=queries, p_init=0.8, nb_restarts=1,
                                batch_size=batch, verbose=False), None))
    x_adv = x_np.copy()
    for attack, target in stages:
        robust = np.flatnonzero(classifier.predict(x_adv, batch_size=batch).argmax(1) == y_np)
        if len(robust) == 0:
            break
        labels = y_np[robust] if target is None else target[robust]
        candidate = attack.generate(x_np[robust], labels)
        broken = classifier.predict(candidate, batch_size=batch).argmax(1) != y_np[robust]
        x_adv[robust[broken]] = candidate[broken]
    return project(x, torch.from_numpy(x_adv), eps, norm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--models", default="madry,baseline")
    parser.add_argument("--results", default="results", help="results directory whose checkpoints are reused")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-art", action="store_true")
    parser.add_argument("--threats", default=",".join(f"{n}:{e:g}" for n, e in THREATS),
                        help="comma-separated NORM:EPSILON pairs (default: all six)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = test_images(args.images)
    load = os.getloadavg()[0]
    print(f"# {len(x)} digits test images, torch threads {args.threads}, load average at start {load:.1f}")
    header = ["model", "threat", "pgd-20", "pgd", "autoattack", "art", "worst", "aa-pgd", "aa-art",
              "t pgd", "t aa", "t art", "aa/art"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    for model_name in args.models.split(","):
        defense = trained(model_name, Path(args.results))
        model = defense.attack_model().eval()
        LinfPGD(PGDParams(steps=2, restarts=1)).run(model, x[:64], y[:64], [0.1])  # warm-up: imports, first-call costs
        for norm, eps in [(t.split(":")[0], float(t.split(":")[1])) for t in args.threats.split(",")]:
            pgd_class, aa_class = (LinfPGD, LinfAutoAttack) if norm == "linf" else (L2PGD, L2AutoAttack)
            runs = {
                "pgd-20": lambda: pgd_class(PGDParams(steps=20, restarts=1)).run(model, x, y, [eps])[0],
                "pgd": lambda: pgd_class().run(model, x, y, [eps])[0],
                "autoattack": lambda: aa_class().run(model, x, y, [eps])[0],
            }
            if not args.skip_art:
                def art_run():
                    with frozen_parameters(model):
                        return art_autoattack(model, x, y, eps, norm)
                runs["art"] = art_run
            correct, seconds = {}, {}
            for name, run in runs.items():
                torch.manual_seed(0)
                started = time.perf_counter()
                x_adv = run()
                seconds[name] = time.perf_counter() - started
                with torch.no_grad():
                    correct[name] = model(x_adv).argmax(1) == y
            accuracy = {name: 100 * float(c.float().mean()) for name, c in correct.items()}
            worst = 100 * float(torch.stack(list(correct.values())).all(0).float().mean())
            art = accuracy.get("art", float("nan"))
            t_art = seconds.get("art", float("nan"))
            row = [model_name, f"{norm} {eps:g}", *(f"{accuracy.get(k, float('nan')):.1f}" for k in ("pgd-20", "pgd", "autoattack", "art")),
                   f"{worst:.1f}", f"{accuracy['autoattack'] - accuracy['pgd']:+.1f}", f"{accuracy['autoattack'] - art:+.1f}",
                   *(f"{seconds.get(k, float('nan')) / seconds['pgd-20']:.1f}x" for k in ("pgd", "autoattack", "art")),
                   f"{seconds['autoattack'] / t_art:.2f}x"]
            print("| " + " | ".join(row) + " |", flush=True)
            print("#   seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
                  + f"; load average {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
