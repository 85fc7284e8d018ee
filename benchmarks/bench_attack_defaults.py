"""How strong the default CW and PGD settings are, and what they cost (not a test).

    OMP_NUM_THREADS=1 python benchmarks/bench_attack_defaults.py cw  [--images 500] [--results results]
    OMP_NUM_THREADS=1 python benchmarks/bench_attack_defaults.py pgd [--images 500] [--results results]
        [--models madry,baseline] [--threats linf:0.2,linf:0.1,l2:0.5,l2:1] [--repeats 3] [--autoattack-models madry]
    OMP_NUM_THREADS=1 python benchmarks/bench_attack_defaults.py rand [--images 500] [--results results]

``cw``: on the digits baseline, CW-L2 settings (the PixelDP reference's, candidates for the
default, and the 6 x 500-step binary-search CW used as the yardstick), accuracy at every L2
epsilon of the pgd-l2 grid and wall time.
``pgd``: on the digits madry and baseline models at L-inf 0.2 / 0.1 and L2 0.5 / 1.0, PGD with
several steps x restarts (restarts only on the points still robust), accuracy, time relative to
PGD-20 (best of ``--repeats`` interleaved rounds) and rows through the model relative to PGD-20's
(the same cost without the load's noise); then autoattack-linf (the reference) on madry at the
L-inf threats.
``rand``: on the digits pixeldp model (L=0.1), EOT PGD against AutoAttack's rand version at L2
0.5 and L-inf 0.1, every adversarial judged by the defense's own prediction rule; the yardstick
is the issue's independent attack, written here in plain torch: 50-step EOT PGD walks on the
cross-entropy and on the CW margin loss, 2 random starts each, per-sample worst case.
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

from bench.provenance import seed_everything  # noqa: E402
from bench.attacks.autoattack import L2AutoAttack, LinfAutoAttack  # noqa: E402
from bench.attacks.base import frozen_parameters, project  # noqa: E402
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
# steps x restarts; restarts run only on the points earlier walks left robust (bench.attacks.pgd).
PGD_SETTINGS = [(20, 1), (50, 1), (100, 1), (50, 2), (50, 5), (100, 2), (10, 10), (20, 5), (20, 10), (20, 20),
                (50, 10)]
PGD_THREATS = [("linf", 0.2), ("linf", 0.1), ("l2", 0.5), ("l2", 1.0)]


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


class RowCounter(torch.nn.Module):
    """The model, counting the rows of every forward pass: a cost measure that load cannot skew."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += len(x)
        return self.model(x)


def pgd(args) -> None:
    x, y = test_images(args.images)
    threats = [(norm, float(eps)) for norm, eps in (t.split(":") for t in args.threats.split(","))]
    for model_name in args.models.split(","):
        model = RowCounter(trained(model_name, Path(args.results)).attack_model()).eval()
        LinfPGD(PGDParams(steps=2, restarts=1)).run(model, x[:64], y[:64], [0.1])  # warm-up: imports, first calls
        settings = [tuple(int(n) for n in t.split("x")) for t in args.settings.split(",")]
        runs = [(f"pgd {s} x {r}", s, r) for s, r in settings]
        print(f"\n{model_name}: accuracy %, time / PGD-20 (best of {args.repeats} interleaved rounds), "
              "rows through the model / PGD-20's")
        print("| attack | " + " | ".join(f"{n} {e:g} | time | rows" for n, e in threats) + " |")
        print("|---|" + "---|---|---|" * len(threats), flush=True)
        cells: dict[str, list[str]] = {name: [] for name, _, _ in runs}
        for norm, eps in threats:
            attack_class = LinfPGD if norm == "linf" else L2PGD
            seconds: dict[str, float] = {}
            found: dict[str, tuple[float, int]] = {}
            for _ in range(args.repeats):  # rounds interleave the settings, so load hits them alike
                for name, steps, restarts in runs:
                    seed_everything(0)
                    model.rows, started = 0, time.perf_counter()
                    x_adv = attack_class(PGDParams(steps=steps, restarts=restarts)).run(model, x, y, [eps])[0]
                    seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - started)
                    found[name] = (accuracy(model.model, x_adv, y), model.rows)  # seeded: same every round
            unit = runs[0][0]
            for name, _, _ in runs:
                acc, rows = found[name]
                cells[name] += [f"{acc:.1f}", f"{seconds[name] / seconds[unit]:.1f}x", f"{rows / found[unit][1]:.1f}x"]
        for name, _, _ in runs:
            print(f"| {name} | " + " | ".join(cells[name]) + " |")
        print(f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        if model_name in args.autoattack_models.split(","):
            for threat in args.autoattack_threats.split(","):
                norm, eps = threat.split(":")
                autoattack(model, x, y, norm, float(eps))


def autoattack(model: RowCounter, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float) -> None:
    """``autoattack-*`` (the reference), once, beside a PGD-20 timed just before it."""
    pgd_class, autoattack_class = (LinfPGD, LinfAutoAttack) if norm == "linf" else (L2PGD, L2AutoAttack)
    timings = {}
    for name, attack in (("pgd 20 x 1", pgd_class(PGDParams(steps=20, restarts=1))), ("autoattack", autoattack_class())):
        seed_everything(0)
        model.rows, started = 0, time.perf_counter()
        x_adv = attack.run(model, x, y, [eps])[0]
        timings[name] = (time.perf_counter() - started, model.rows, accuracy(model.model, x_adv, y))
    (unit_s, unit_rows, _), (aa_s, aa_rows, aa_acc) = timings.values()
    print(f"autoattack-{norm} at {norm} {eps:g}: {aa_acc:.1f}%, time {aa_s / unit_s:.1f}x PGD-20, "
          f"rows {aa_rows / unit_rows:.1f}x (Square's rows are forward-only)  load {os.getloadavg()[0]:.1f}", flush=True)


def eot_pgd(model, x, y, eps, norm, loss, steps=50):
    """One EOT PGD walk in plain torch (the yardstick, independent of foolbox and pyautoattack):
    ``model`` is the EOT wrapper (log of the mean softmax over its draws), ``loss`` "ce" or
    "margin" (the CW margin of the expected log-probabilities); step 2.5 * eps / steps."""
    step = 2.5 * eps / steps
    noise = torch.empty_like(x).uniform_(-eps, eps) if norm == "linf" else torch.randn_like(x)
    if norm == "l2":
        noise = noise * eps / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * torch.rand(len(x), 1, 1, 1)
    x_adv = project(x, x + noise, eps, norm)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        scores = model(x_adv)
        if loss == "ce":
            objective = torch.nn.functional.cross_entropy(scores, y, reduction="sum")
        else:
            true = scores.gather(1, y[:, None])[:, 0]
            other = scores.masked_fill(torch.nn.functional.one_hot(y, scores.shape[1]).bool(), -float("inf")).amax(1)
            objective = (other - true).sum()
        (grad,) = torch.autograd.grad(objective, x_adv)
        if norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x_adv = project(x, x_adv.detach() + step * direction, eps, norm)
    return x_adv


def yardstick(model, predict, x, y, eps, norm, restarts=2):
    """The per-sample worst case of ``restarts`` CE walks and ``restarts`` margin walks."""
    worst = x.clone()
    robust = torch.ones(len(x), dtype=torch.bool)
    for loss in ("ce", "margin"):
        for _ in range(restarts):
            with frozen_parameters(model):
                x_adv = eot_pgd(model, x, y, eps, norm, loss)
            broken = robust & (predict(x_adv) != y)
            worst[broken] = x_adv[broken]
            robust &= ~broken
    return worst


def rand(args) -> None:
    defense = trained("pixeldp", Path(args.results), {"L": 0.1})
    model = EOT(defense.attack_model(), 20)
    x, y = test_images(args.images)
    columns = [label for label, n in (("L2 0.5", "l2"), ("L-inf 0.1", "linf")) if n in args.rand_threats.split(",")]
    print(f"| attack (EOT 20 draws, judged by pixeldp's 300-draw prediction, mean of {args.evaluations} call(s)) | "
          + " | ".join(columns) + " | seconds |")
    print("|---|" + "---|" * (len(columns) + 1), flush=True)
    runs = [
        ("pgd 20 x 1 (before)", L2PGD(PGDParams(steps=20, restarts=1)), LinfPGD(PGDParams(steps=20, restarts=1))),
        ("pgd defaults", L2PGD(), LinfPGD()),
        ("pgd 50 x 1", L2PGD(PGDParams(steps=50, restarts=1)), LinfPGD(PGDParams(steps=50, restarts=1))),
        ("autoattack rand (APGD-CE, APGD-DLR, margin walk)", L2AutoAttack(), LinfAutoAttack()),
        ("yardstick: 50-step EOT PGD, CE + margin, 2 starts each", "l2", "linf"),
    ]
    for name, l2, linf in runs:
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        cells, started = [], time.perf_counter()
        for attack, eps in [(a, e) for a, e, n in ((l2, 0.5, "l2"), (linf, 0.1, "linf")) if n in args.rand_threats.split(",")]:
            torch.manual_seed(0)
            if isinstance(attack, str):
                x_adv = yardstick(model, defense.predict, x, y, eps, attack)
            else:
                x_adv = attack.run(model, x, y, [eps], predict=defense.predict)[0]
            # PixelDP's rule is random: the mean over --evaluations calls estimates the accuracy
            # expected over the defense's noise (one call varies by 1-2 points on 500 images).
            calls = [float((defense.predict(x_adv) == y).float().mean()) for _ in range(args.evaluations)]
            cells.append(100 * sum(calls) / len(calls))
        seconds = time.perf_counter() - started
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {seconds:.0f} |  load {os.getloadavg()[0]:.1f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["cw", "pgd", "rand"])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--results", default="results")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="madry,baseline", help="pgd: digits models to attack")
    parser.add_argument("--threats", default=",".join(f"{n}:{e:g}" for n, e in PGD_THREATS),
                        help="pgd: comma-separated NORM:EPSILON pairs")
    parser.add_argument("--settings", default=",".join(f"{s}x{r}" for s, r in PGD_SETTINGS),
                        help="pgd: comma-separated STEPSxRESTARTS, the first is the time unit (default: 20x1 first)")
    parser.add_argument("--repeats", type=int, default=3, help="pgd: timing rounds (the best counts)")
    parser.add_argument("--autoattack-models", default="madry", help="pgd: models on which autoattack runs (the reference)")
    parser.add_argument("--autoattack-threats", default="linf:0.2", help="pgd: NORM:EPSILON pairs autoattack runs at")
    parser.add_argument("--only", default="", help="rand: only the rows whose name contains one of these (comma-separated)")
    parser.add_argument("--evaluations", type=int, default=1, help="rand: calls of the defense's rule averaged per cell")
    parser.add_argument("--rand-threats", default="l2,linf", help="rand: which of L2 0.5 and L-inf 0.1 to run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {args.images} digits test images, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    {"cw": cw, "pgd": pgd, "rand": rand}[args.which](args)


if __name__ == "__main__":
    main()
