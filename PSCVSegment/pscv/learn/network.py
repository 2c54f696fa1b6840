"""The 2D U-Net of the usual weakly-supervised ACDC recipe (WSL4MIS): widths 16-32-64-128-256."""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_WIDTHS = (16, 32, 64, 128, 256)
DEFAULT_DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)


class ConvBlock(nn.Sequential):
    def __init__(self, inputs: int, outputs: int, dropout: float):
        super().__init__(
            nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(outputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.LeakyReLU(),
        )


class UpBlock(nn.Module):
    def __init__(self, inputs: int, skip: int, outputs: int):
        super().__init__()
        self.reduce = nn.Conv2d(inputs, skip, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = ConvBlock(2 * skip, outputs, 0.0)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(self.reduce(x))], dim=1))


class UNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, widths=DEFAULT_WIDTHS, dropout=DEFAULT_DROPOUT):
        super().__init__()
        widths = list(widths)
        self.encoder = nn.ModuleList([ConvBlock(in_channels, widths[0], dropout[0])])
        for level in range(1, len(widths)):
            self.encoder.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[level - 1], widths[level],
                                                                           dropout[level])))
        self.decoder = nn.ModuleList(
            [UpBlock(widths[level], widths[level - 1], widths[level - 1]) for level in range(len(widths) - 1, 0, -1)]
        )
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    def forward(self, x):
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in self.decoder:
            x = block(x, skips.pop())
        return self.head(x)
