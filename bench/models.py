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


def small_cnn(
    in_channels: int, size: int, num_classes: int, channels: tuple[int, int], kernel: int,
    strides: tuple[int, int], padding: int, hidden: int,
) -> tuple[nn.Module, nn.Module]:
    """conv(kernel, channels[0], strides[0]) | ReLU, conv(kernel, channels[1], strides[1]), ReLU,
    FC hidden, ReLU, FC num_classes; ``|`` marks the end of the stem."""
    stem = nn.Conv2d(in_channels, channels[0], kernel, stride=strides[0], padding=padding)
    side = size
    for stride in strides:
        side = (side + 2 * padding - kernel) // stride + 1
    body = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(channels[0], channels[1], kernel, stride=strides[1], padding=padding),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels[1] * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    return stem, body


SMALL_CNNS = {
    # A small CNN for 8x8 digits.
    "digits-cnn": dict(channels=(32, 64), kernel=3, strides=(1, 2), padding=1, hidden=128),
    # The PixelDP paper's MNIST CNN: conv5x5-32/2 | conv5x5-64/2, FC1024, FC10.
    "mnist-cnn": dict(channels=(32, 64), kernel=5, strides=(2, 2), padding=2, hidden=1024),
    # Wong & Kolter's (2018) small MNIST net: conv4x4-16/2 | conv4x4-32/2, FC100, FC10.
    "wk-small": dict(channels=(16, 32), kernel=4, strides=(2, 2), padding=1, hidden=100),
}


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
        raise BenchError(f"model {name} needs torchvision; pip install -e '.[imagenet]' in the harness's clone") from None
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
    if name in SMALL_CNNS:
        stem, body = small_cnn(channels, height, num_classes, **SMALL_CNNS[name])
    elif wide:
        stem, body = wide_resnet(int(wide.group(1)), int(wide.group(2)), channels, num_classes)
    elif name in ("resnet18", "resnet34", "resnet50"):
        stem, body = torchvision_resnet(name, num_classes)
    else:
        raise BenchError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    return ZooModel(mean, std, stem, body)
