"""The one training loop every defense uses: SGD with momentum, cosine schedule, seeded shuffles."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from bench.progress import Progress


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
        for _ in range(config.epochs):
            running, seen = 0.0, 0
            for index in batches(len(x), config.batch_size, generator):
                x_batch = x[index].to(config.device, non_blocking=True)
                y_batch = y[index].to(config.device, non_blocking=True)
                loss = loss_fn(x_batch, y_batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if after_step is not None:
                    after_step()
                running += float(loss.detach()) * len(index)
                seen += len(index)
            history.append(running / max(1, seen))
            bar.update(loss=history[-1])
    for module in modules:
        module.eval()
    return history
