"""The model zoo. Every model takes [0, 1] images, normalises inside, and is split into
``stem`` (its first layer, which ends where PixelDP puts its noise) and ``body``."""
from __future__ import annotations

import re

import torch
from torch import nn

from bench.errors import BenchError


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ZooModel(nn.Module):
    """``normalize -> stem -> body``; ``pre_noise(x)`` is the output of the first layer."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], stem: nn.Module, body: nn.Module):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = stem
        self.body = body

    def pre_noise(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre_noise(x))


def digits_cnn(in_channels: int, size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """A small CNN for 8x8 digits: conv3x3-32 | ReLU, conv3x3-64/2, FC128, FC."""
    stem = nn.Conv2d(in_channels, 32, 3, padding=1)
    side = (size + 1) // 2
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
    return stem, body


def mnist_cnn(in_channels: int, size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """The PixelDP paper's MNIST CNN: conv5x5-32/2 | ReLU, conv5x5-64/2, FC1024, FC10."""
    stem = nn.Conv2d(in_channels, 32, 5, stride=2, padding=2)
    side = ((size + 1) // 2 + 1) // 2
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(32, 64, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * side * side, 1024),
        nn.ReLU(),
        nn.Linear(1024, num_classes),
    )
    return stem, body


def wk_small(in_channels: int, size: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """Wong & Kolter's (2018) small MNIST net: conv4x4-16/2 | ReLU, conv4x4-32/2, FC100, FC10."""
    stem = nn.Conv2d(in_channels, 16, 4, stride=2, padding=1)
    side = size // 2 // 2
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * side * side, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )
    return stem, body


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block (Zagoruyko & Komodakis)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            if stride != 1 or in_planes != planes
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


def wide_resnet(depth: int, width: int, in_channels: int, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """WRN-depth-width with a 3x3x16 stem conv (the paper's CIFAR/SVHN model is WRN-28-10)."""
    if (depth - 4) % 6 != 0 or depth < 10:
        raise BenchError(f"wide ResNet depth must be 6n+4 and at least 10 (10, 16, 22, 28, ...), got {depth}")
    blocks = (depth - 4) // 6
    stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
    layers: list[nn.Module] = []
    in_planes = 16
    for stage, planes in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            layers.append(WideBlock(in_planes, planes, 2 if stage > 0 and block == 0 else 1))
            in_planes = planes
    body = nn.Sequential(
        *layers,
        nn.BatchNorm2d(in_planes),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(in_planes, num_classes),
    )
    return stem, body


def torchvision_resnet(name: str, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """A torchvision ResNet split after ``conv1`` (randomly initialised: no weights are fetched)."""
    try:
        import torchvision
    except ImportError:
        raise BenchError(f"model {name} needs torchvision; pip install 'robustness-bench[imagenet]'") from None
    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    body = nn.Sequential(
        net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4,
        net.avgpool, nn.Flatten(), net.fc,
    )
    return net.conv1, body


MODEL_NAMES = ("digits-cnn", "mnist-cnn", "wk-small", "wrn-DEPTH-WIDTH", "resnet18", "resnet50")


def default_model(dataset: str, shape: tuple[int, int, int]) -> str:
    """The zoo's default per dataset; CIFAR/SVHN get a CPU-sized wide ResNet (the paper: wrn-28-10)."""
    channels, height, _ = shape
    if height <= 12:
        return "digits-cnn"
    if channels == 1:
        return "mnist-cnn"
    if height <= 64:
        return "wrn-16-2"
    return "resnet18"


def build_model(
    name: str, shape: tuple[int, int, int], num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> ZooModel:
    channels, height, width = shape
    wide = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if name == "digits-cnn":
        stem, body = digits_cnn(channels, height, num_classes)
    elif name == "mnist-cnn":
        stem, body = mnist_cnn(channels, height, num_classes)
    elif name == "wk-small":
        stem, body = wk_small(channels, height, num_classes)
    elif wide:
        stem, body = wide_resnet(int(wide.group(1)), int(wide.group(2)), channels, num_classes)
    elif name in ("resnet18", "resnet34", "resnet50"):
        stem, body = torchvision_resnet(name, num_classes)
    else:
        raise BenchError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    return ZooModel(mean, std, stem, body)
