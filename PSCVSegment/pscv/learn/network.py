"""The 2D U-Net of the usual weakly-supervised ACDC recipe (WSL4MIS): widths 16-32-64-128-256.

With `auxiliary_decoder`, a second decoder (DMPLS, Luo et al. 2022; WSL4MIS's UNet_CCT) reads the encoder's
features through channel dropout (`auxiliary_dropout`); it exists for training only: `forward(x)` is the
main decoder's output, `forward(x, auxiliary=True)` returns both, and a saved model leaves it out.
"""

from __future__ import annotations

import torch
from torch import nn

from .settings import DEFAULT_DROPOUT, DEFAULT_WIDTHS


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


def decoder(widths) -> nn.ModuleList:
    return nn.ModuleList([UpBlock(widths[level], widths[level - 1], widths[level - 1])
                          for level in range(len(widths) - 1, 0, -1)])


class UNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 1, widths=DEFAULT_WIDTHS, dropout=DEFAULT_DROPOUT,
                 auxiliary_decoder: bool = False, auxiliary_dropout: float = 0.5):
        super().__init__()
        widths = list(widths)
        self.encoder = nn.ModuleList([ConvBlock(in_channels, widths[0], dropout[0])])
        for level in range(1, len(widths)):
            self.encoder.append(nn.Sequential(nn.MaxPool2d(2), ConvBlock(widths[level - 1], widths[level],
                                                                           dropout[level])))
        self.decoder = decoder(widths)
        self.head = nn.Conv2d(widths[0], num_classes, 3, padding=1)
        self.auxiliary_dropout = auxiliary_dropout
        if auxiliary_decoder:
            self.aux_decoder = decoder(widths)
            self.aux_head = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    @staticmethod
    def decode(skips: list, blocks: nn.ModuleList, head: nn.Module):
        skips = list(skips)
        x = skips.pop()
        for block in blocks:
            x = block(x, skips.pop())
        return head(x)

    def forward(self, x, auxiliary: bool = False):
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        main = self.decode(skips, self.decoder, self.head)
        if not auxiliary:
            return main
        perturbed = [nn.functional.dropout2d(s, self.auxiliary_dropout, training=True) for s in skips]
        return main, self.decode(perturbed, self.aux_decoder, self.aux_head)
