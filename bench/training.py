"""The one training loop every defense uses (SGD with momentum, cosine schedule, seeded shuffles),
the table of training defaults per defense and dataset, and the checks that training worked: the
divergence check (NaN/inf loss or weights) and the chance check (a model that learned nothing)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bench.confidence import CHANCE_ALPHA, at_chance, chance_level, most_right_by_guessing
from bench.errors import TrainingFailed
from bench.log import LOGGER
from bench.progress import Progress
from bench.provenance import seed_everything
from bench.registry import defense_name


# Run defaults per (defense, dataset); "*" matches any. A (defense, dataset) row overrides
# (defense, "*"), which overrides ("*", dataset), which overrides ("*", "*"). "params" are defense
# parameters, under whatever --param gives; test_size None is the whole test split. The runner
# stores the resolved values in the run's spec, so they are part of its training hash.
# Why the rows (docs/comparison-defenses.md has the runs):
# - robustopt at lr 0.05 collapses while its epsilon ramps up (most predictions one class); 0.01
#   trains on digits and MNIST. Its ramp must end inside MNIST's 8 epochs (Wong & Kolter ramp over
#   the first half), with their 50 projections.
# - madry (every example adversarial) at lr 0.05 stays at chance on MNIST; 0.02 trains. Its
#   training epsilon is the class's CIFAR-10 recipe (L-inf 8/255) unless a row sets one: 0.1 on
#   digits, MNIST and Fashion-MNIST, inside their attack grids (to 0.3); Madry et al.'s MNIST 0.3
#   needs 40 steps of 0.01 and a far longer schedule than 8 CPU epochs.
# - digits is the quick look: 200 of its 500 test images (95% intervals +-3 points; pass
#   --test-size 500 for all) keep the README's first command short.
# Digits rows are checked on seeds 0, 1, 2 by benchmarks/bench_defaults.py.
TRAINING_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("*", "*"):                     {"lr": 0.05, "epochs": 30, "test_size": None},
    ("*", "digits"):                {"test_size": 200},
    ("*", "mnist"):                 {"epochs": 8},
    ("*", "fashion-mnist"):         {"epochs": 8},
    ("madry", "digits"):            {"params": {"epsilon": 0.1}},
    ("madry", "mnist"):             {"lr": 0.02, "params": {"epsilon": 0.1}},
    ("madry", "fashion-mnist"):     {"lr": 0.02, "params": {"epsilon": 0.1}},
    ("robustopt", "*"):             {"lr": 0.01},
    ("robustopt", "mnist"):         {"params": {"ramp_epochs": 4.0, "proj": 50}},
    ("robustopt", "fashion-mnist"): {"params": {"ramp_epochs": 4.0, "proj": 50}},
}


def training_defaults(defense: str, dataset: str) -> dict[str, Any]:
    """The resolved ``lr``, ``epochs``, ``test_size`` and defense ``params`` defaults of ``defense`` on ``dataset``."""
    resolved: dict[str, Any] = {"params": {}}
    for key in (("*", "*"), ("*", dataset), (defense, "*"), (defense, dataset)):
        row = TRAINING_DEFAULTS.get(key, {})
        resolved.update({k: v for k, v in row.items() if k != "params"})
        resolved["params"].update(row.get("params", {}))
    return resolved


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"


def batches(count: int, batch_size: int, generator: torch.Generator | None = None) -> Iterable[torch.Tensor]:
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return order.split(batch_size)


def train_classifier(
    parameters: Iterable[nn.Parameter],
    modules: list[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    after_step: Callable[[], None] | None = None,
    desc: str = "train",
) -> list[float]:
    """Minimise ``loss_fn(x_batch, y_batch)`` over ``parameters``; returns the mean loss per epoch.

    The learning rate warms up linearly over the first epoch's first 10% of steps, then follows a
    cosine decay to zero, the schedule most robustness papers train with.
    """
    parameters = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.SGD(
        parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )
    steps_per_epoch = math.ceil(len(x) / config.batch_size)
    total = max(1, config.epochs * steps_per_epoch)
    warmup = max(1, steps_per_epoch // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(config.seed)
    for module in modules:
        module.train()
    history = []
    with Progress(config.epochs, f"{desc} training", unit="epoch") as bar:
        for epoch in range(config.epochs):
            running, seen = 0.0, 0
            # Each epoch's batches are a loop of their own: a long epoch reports inside itself.
            with Progress(steps_per_epoch, f"{desc} epoch {epoch + 1}/{config.epochs}", unit="batch", debug=False) as inner:
                for step, index in enumerate(batches(len(x), config.batch_size, generator), 1):
                    x_batch = x[index].to(config.device, non_blocking=True)
                    y_batch = y[index].to(config.device, non_blocking=True)
                    loss = loss_fn(x_batch, y_batch)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingFailed(
                            f"{desc}: training diverged, the loss became {value} at epoch {epoch + 1}, step {step} "
                            f"(lr {config.lr:g}); try a lower --lr"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    if after_step is not None:
                        after_step()
                    running += value * len(index)
                    seen += len(index)
                    inner.update(loss=running / seen)
            history.append(running / max(1, seen))
            bar.update(loss=history[-1])
    for module in modules:
        module.eval()
    if not all(bool(torch.isfinite(p).all()) for p in parameters):
        raise TrainingFailed(f"{desc}: training diverged, the last step left non-finite weights (lr {config.lr:g}); try a lower --lr")
    return history


# The chance check (the rule: bench.confidence.at_chance) runs on the model's accuracy on its own
# training images: that is what training maximised, so a model that is at chance even there
# learned nothing. (Test accuracy at chance with training accuracy above it is memorising, e.g.
# shuffled labels: the clean table shows it, with a sanity warning from bench.metrics.) Holding
# images out instead would change what every run trains on. CHANCE_SAMPLE seeded training images
# keep the check at a fraction of an epoch on large training sets, with power to spare.
# No option turns the check off: a model at chance has no robustness to measure, and a user who
# wants an untrained model's numbers passes it to bench.evaluate untrained.
CHANCE_SAMPLE = 2000


@torch.no_grad()
def check_learned(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, desc: str = "train", seed: int = 0,
                  batch_size: int = 256, device: str = "cpu") -> float:
    """Raise ``TrainingFailed`` when ``model`` (images -> logits) ended training at chance on its
    training images ``x``, ``y``; returns the accuracy it measured.

    Measured on up to ``CHANCE_SAMPLE`` of the images (a seeded sample), in eval mode, with the
    global random state left as it was (a randomized model draws its noise from it). Too few images
    to tell a perfect model from chance (3 or fewer with 10 classes) are not checked, with a warning.
    """
    if len(y) == 0:
        return float("nan")
    index = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:CHANCE_SAMPLE]
    target = torch.device(device)
    forked = [target.index or 0] if target.type != "cpu" else []  # the CPU's state is always forked
    model.eval()
    correct, num_classes = 0, 0
    with torch.random.fork_rng(devices=forked, device_type=target.type if forked else None):
        for part in index.split(batch_size):
            logits = model(x[part].to(device))
            correct += int((logits.argmax(1).cpu() == y[part].cpu()).sum())
            num_classes = logits.shape[1]
    n = len(index)
    chance = chance_level(y.cpu(), num_classes)
    if most_right_by_guessing(n, chance, CHANCE_ALPHA) is None:
        LOGGER.warning(f"{desc}: {n} training images are too few to tell a model that learned from chance; not checked")
        return correct / n
    finding = at_chance(correct, n, chance, num_classes, "training images")
    if finding is not None:
        raise TrainingFailed(
            f"{desc}: training ended at chance: train {finding}; the model learned nothing: try more --epochs or another --lr"
        )
    return correct / n


def fit_and_check(defense: Any, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
    """Seed, train ``defense`` on ``x``, ``y``, and check that training worked: raises
    ``TrainingFailed`` when it diverged (NaN/inf loss or weights) or ended at chance
    (``bench.training.check_learned``). Every training of the harness goes through here."""
    seed_everything(config.seed)
    defense.fit(x, y, config)
    check_learned(defense.attack_model(), x, y, desc=defense_name(defense), seed=config.seed,
                  device=config.device)
