"""Per-step training cost of PixelDP against the undefended baseline, side by side in one run.

Same model (the paper's MNIST CNN), same batch, same optimiser; blocks of steps alternate between
the two so that a busy machine slows both alike. Prints the median per-step times and the ratio.

    python benchmarks/bench_pixeldp.py [--steps 30] [--rounds 5] [--batch-size 64] [--mechanism gaussian]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.models import build_model
from bench.registry import build_params
from bench.defenses.baseline import Baseline
from bench.defenses.pixeldp import PixelDP


def make_step(defense, x: torch.Tensor, y: torch.Tensor):
    """One optimiser step of ``defense``'s training loss, as the shared training loop takes it."""
    optimizer = torch.optim.SGD(defense.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        loss = defense.training_loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        defense.after_step()

    return step


def timed(step, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mechanism", choices=["gaussian", "laplace"], default="gaussian")
    parser.add_argument("--noise-at", choices=["conv1", "input"], default="conv1")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape, mean, std = (1, 28, 28), (0.1307,), (0.3081,)
    x = torch.rand(args.batch_size, *shape)
    y = torch.randint(0, 10, (args.batch_size,))
    baseline = Baseline(build_model("mnist-cnn", shape, 10, mean, std))
    params = build_params(PixelDP.Params, {"mechanism": args.mechanism, "noise_at": args.noise_at}, "pixeldp")
    pixeldp = PixelDP(build_model("mnist-cnn", shape, 10, mean, std), params)
    pixeldp._build(shape)
    baseline.model.train()
    pixeldp.model.train()
    steps = {"baseline": make_step(baseline, x, y), "pixeldp": make_step(pixeldp, x, y)}
    for step in steps.values():  # warm-up
        timed(step, 3)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(steps)[::-1]  # ABBA: no order bias
        for name in order:
            times[name].append(timed(steps[name], args.steps))
    base, dp = statistics.median(times["baseline"]), statistics.median(times["pixeldp"])
    ratios = [d / b for d, b in zip(times["pixeldp"], times["baseline"])]
    projection = timed(pixeldp.after_step, 200)
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps")
    print(f"baseline step  {base * 1e3:8.2f} ms (median)")
    print(f"pixeldp step   {dp * 1e3:8.2f} ms (median; {args.mechanism}, noise at {args.noise_at})")
    print(f"  of which the sensitivity projection {projection * 1e3:.3f} ms")
    print(f"ratio pixeldp/baseline {dp / base:.3f} (medians); per round: {', '.join(f'{r:.3f}' for r in ratios)}")


if __name__ == "__main__":
    main()
