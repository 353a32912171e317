"""The demo's network: a small U-Net with a foreground, an embedding and a seediness head."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StickNet"]


class _ConvBlock(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class StickNet(nn.Module):
    """A small U-Net with a foreground head, an embedding head and a seediness head.

    Input: (B, 3, H, W) images, H and W divisible by 2**(len(widths) - 1).
    Two pixel-coordinate channels are appended inside, so that the embedding
    can depend on where a pixel is (two sticks of the same colour differ only
    by position). Returns (foreground logits (B, H, W), embeddings
    (B, E, H, W), seediness logits (B, H, W)); see ``seediness_loss``.
    """

    def __init__(self, embedding_dim: int = 8, widths: Sequence[int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.widths = tuple(widths)
        self.encoders = nn.ModuleList()
        in_channels = 3 + 2
        for width in self.widths:
            self.encoders.append(_ConvBlock(in_channels, width))
            in_channels = width
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(self.widths[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(in_channels, width, 2, stride=2))
            self.decoders.append(_ConvBlock(2 * width, width))
            in_channels = width
        self.foreground_head = nn.Conv2d(in_channels, 1, 1)
        self.embedding_head = nn.Conv2d(in_channels, embedding_dim, 1)
        # Seediness is about how far a pixel's embedding (linear in the
        # features) lies from its instance's mean: not a linear function of
        # the features, so this head has a hidden layer, and a 3x3 context
        # to see crossings and edges (Fathi et al. also give it its own
        # convolutions).
        self.seediness_head = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, 1, 1),
        )

    def forward(self, images: torch.Tensor):
        batch, _, height, width = images.shape
        factor = 2 ** (len(self.widths) - 1)
        if height % factor or width % factor:
            raise ValueError(f"images: height and width must be divisible by {factor}, got {height}x{width}")
        rows = torch.linspace(-1.0, 1.0, height, device=images.device, dtype=images.dtype)
        cols = torch.linspace(-1.0, 1.0, width, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")).expand(batch, -1, -1, -1)
        x = torch.cat([images, grid], dim=1)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = encoder(x)
            skips.append(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        return self.foreground_head(x).squeeze(1), self.embedding_head(x), self.seediness_head(x).squeeze(1)

