"""Image corruptions for robustness under distribution shift (`lejepa probe` shift table).

Five corruptions in the spirit of ImageNet-C / CIFAR-10-C, each at three severities, acting on
uint8 batches (B, C, H, W) before the evaluation transform. Sizes (blur width, pixel block) are
fractions of the image side, so a severity means the same thing at 28 px and at 224 px.

    corrupt = make_corruption("gaussian_noise", severity=2)
    feats, labels = extract_features(encoder.probe_features, data, ..., transform=corrupt)

Every corruption is deterministic: the noise comes from a generator seeded at construction, so
features of a corrupted split can be cached like clean ones.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SEVERITIES = (1, 2, 3)

# Per-corruption parameters for severities 1, 2, 3 (the milder half of ImageNet-C's 1..5 range).
_PARAMS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.08, 0.18, 0.38),  # noise std, image in [0, 1]
    "blur": (0.012, 0.024, 0.04),  # Gaussian sigma as a fraction of the image side
    "contrast": (0.5, 0.3, 0.15),  # factor towards each image's mean grey
    "brightness": (0.15, 0.3, 0.45),  # added to every pixel, image in [0, 1]
    "pixelate": (0.6, 0.4, 0.25),  # side of the down-sampled image, as a fraction
}
CORRUPTIONS: tuple[str, ...] = tuple(_PARAMS)


def _gaussian_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
    return x + std * noise


def _blur(x: torch.Tensor, rel_sigma: float) -> torch.Tensor:
    sigma = max(rel_sigma * max(x.shape[-2:]), 0.3)
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    # Separable: one horizontal and one vertical depth-wise pass, reflect-padded edges.
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    k = k[radius - pad : radius + pad + 1]
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    grey = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    return grey + factor * (x - grey)


def _pixelate(x: torch.Tensor, frac: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * frac)), max(1, round(w * frac))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def make_corruption(name: str, severity: int, seed: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function uint8 (B, C, H, W) -> uint8 (B, C, H, W) applying `name` at `severity` (1..3)."""
    if name not in _PARAMS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    value = _PARAMS[name][severity - 1]
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same noise on every device

    def corrupt(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if name == "gaussian_noise":
            x = _gaussian_noise(x, value, gen)
        elif name == "blur":
            x = _blur(x, value)
        elif name == "contrast":
            x = _contrast(x, value)
        elif name == "brightness":
            x = x + value
        else:
            x = _pixelate(x, value)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8)

    corrupt.__name__ = f"{name}_{severity}"
    return corrupt


def describe(name: str, severity: int) -> str:
    """Stable text naming a corruption and its parameter (part of the feature-cache key)."""
    return f"{name}:{severity}:{_PARAMS[name][severity - 1]}"
