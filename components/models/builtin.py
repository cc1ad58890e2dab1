"""The built-in models: `mlp` (any fixed-shape input, flattened), `cnn` (a small conv net) and
`resnet` (a residual CNN: BasicBlocks, BatchNorm, global pooling), written here because
torchvision's PyPI wheel needs a CUDA torch. Each takes its input shape from the contract."""

from __future__ import annotations

import math

import torch
from torch import nn

from torchship.components.errors import UserInputError

__all__ = ["CNN", "MLP", "ResNet"]


class MLP(nn.Module):
    """A few Linear+ReLU layers over the flat feature vector (an image is flattened first)."""

    def __init__(
        self, n_features: int, n_classes: int, hidden: int = 1024, depth: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1) if x.dim() > 2 else x)


def image_shape(n_features_or_shape: int | tuple[int, ...], model: str) -> tuple[int, int, int]:
    """[C, H, W] of an image input; a square number of table features is one grey channel."""
    if isinstance(n_features_or_shape, tuple) and len(n_features_or_shape) == 3:
        return n_features_or_shape  # type: ignore[return-value]
    n = n_features_or_shape if isinstance(n_features_or_shape, int) else math.prod(
        n_features_or_shape)
    side = math.isqrt(n)
    if side * side != n:
        raise UserInputError(
            f"model '{model}' needs images [C, H, W] or a square number of features to see as "
            f"one, got {n}; pass an image folder, digits-images, --model mlp or a "
            "module:factory of your own"
        )
    return 1, side, side


class CNN(nn.Module):
    """A small conv net; a table of 64 features is seen as a 1 x 8 x 8 image."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int,
                 channels: int = 16) -> None:
        super().__init__()
        self.in_shape = tuple(in_shape)
        c, h, w = self.in_shape
        pool = h >= 2 and w >= 2
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2) if pool else nn.Identity(),
        )
        pooled = (h // 2) * (w // 2) if pool else h * w
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * pooled, 128),
            nn.ReLU(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # -1 rather than x.shape[0] keeps the exported ONNX Reshape free of shape arithmetic
        # while leaving the batch dimension dynamic (a table's rows become images here).
        return self.classifier(self.features(x.reshape(-1, *self.in_shape)))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm layers and a shortcut (a 1x1 conv where the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A residual CNN for images [C, H, W]: a 3x3 stem, stages of BasicBlocks (the first block
    of each later stage halves the resolution and doubles the width), global average pooling
    and a linear head. `width` is the stem's channels, `blocks` the blocks per stage."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int, width: int = 16,
                 blocks: tuple[int, ...] | list[int] = (2, 2, 2)) -> None:
        super().__init__()
        if not blocks or any(int(b) < 1 for b in blocks) or int(width) < 1:
            raise UserInputError(
                f"model 'resnet': width {width} and blocks {list(blocks)} must be positive; "
                "pass e.g. width=16, blocks=[2, 2, 2]")
        self.in_shape = tuple(in_shape)
        c = self.in_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        stages, channels = [], width
        for index, count in enumerate(blocks):
            out = width * 2 ** index
            layers = [BasicBlock(channels, out, stride=1 if index == 0 else 2)]
            layers += [BasicBlock(out, out) for _ in range(int(count) - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x.reshape(-1, *self.in_shape)))
        return self.head(torch.flatten(self.pool(x), 1))
