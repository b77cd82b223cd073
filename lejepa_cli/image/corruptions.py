"""Image corruptions, in two roles: sensor-like training views and the probe's shift table.

## Training views (`views.make_views`)

Sensor-like corruptions as training views: noise, exposure shifts and compression artefacts.

Each op maps a (B, C, S, S) float32 batch in [0, 1] to one of the same shape, clamped to [0, 1],
with one strength per sample. `views.make_views` applies them after the colour ops and before
normalising, each with its own probability and strength range from `ViewsConfig`:

    noise_p, noise_std                    Gaussian noise, std in [0, 1] pixel units
    shot_noise_p, shot_noise_std          signal-dependent (Poisson-like) noise: std = s * sqrt(x),
                                          s the std at white, so dark pixels get less noise
    brightness_shift_p, brightness_shift  additive offset (signed range), beyond the jitter's x * f
    contrast_shift_p, contrast_shift      blend towards each image's mean grey; factor 0 is flat
                                          grey, 1 unchanged (the jitter's range is 0.6..1.4 at 0.4)
    jpeg_p, jpeg_quality                  JPEG-like 8x8 block DCT quantisation at a libjpeg quality
    dead_pixel_p, dead_pixel_fraction     a fraction of sensor pixels stuck dark (0) or hot (1)

With a strength at its identity value (std 0, offset 0, factor 1, fraction 0) every op except the
JPEG one returns its input bit for bit, which is how `views` leaves the samples whose gate did not
fire unchanged without selecting them. All randomness comes from tensors the caller draws.

## The shift table (`lejepa probe`)

Image corruptions for robustness under distribution shift (`lejepa probe` shift table).

Five corruptions in the spirit of ImageNet-C / CIFAR-10-C, each at three severities, acting on
uint8 batches (B, C, H, W) before the evaluation transform. Sizes (blur width, pixel block) are
fractions of the image side, so a severity means the same thing at 28 px and at 224 px.

    corrupt = make_corruption("gaussian_noise", severity=2)
    feats, labels = extract_features(encoder.probe_features, data, ..., transform=corrupt)

Every corruption is deterministic: the noise comes from a generator seeded at construction, so
features of a corrupted split can be cached like clean ones.
"""


from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# name -> (probability key, strength key) in ViewsConfig, in the order the ops are applied:
# exposure first, then sensor noise, then stuck pixels, then compression, as in a camera.
OPS: dict[str, tuple[str, str]] = {
    "brightness_shift": ("brightness_shift_p", "brightness_shift"),
    "contrast_shift": ("contrast_shift_p", "contrast_shift"),
    "noise": ("noise_p", "noise_std"),
    "shot_noise": ("shot_noise_p", "shot_noise_std"),
    "dead_pixels": ("dead_pixel_p", "dead_pixel_fraction"),
    "jpeg": ("jpeg_p", "jpeg_quality"),
}

# The JPEG standard's (Annex K) quantisation tables at quality 50, row-major 8x8.
_JPEG_LUMA = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
_JPEG_CHROMA = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
) + (99,) * 32
# JFIF's full-range RGB -> YCbCr (offsets of 128 for Cb, Cr are added separately).
_YCBCR64 = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                        dtype=torch.float64)
_YCBCR = tuple(_YCBCR64.flatten().tolist())
_YCBCR_INV = tuple(torch.linalg.inv(_YCBCR64).flatten().tolist())


def active(cfg) -> list[str]:
    """The ops whose probability is above 0 in a ViewsConfig, in application order."""
    return [name for name, (p_key, _) in OPS.items() if getattr(cfg, p_key) > 0]


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def gaussian_noise(x: Tensor, std: Tensor, noise: Tensor) -> Tensor:
    """x + std * noise, clamped; std (B,), noise (B, C, S, S) standard normal."""
    return x.addcmul_(noise, _per_sample(std).expand_as(x)).clamp_(0, 1)


def shot_noise(x: Tensor, std_at_white: Tensor, noise: Tensor) -> Tensor:
    """Signal-dependent noise: std s * sqrt(x) per pixel, the Gaussian limit of photon counting
    (variance proportional to the signal); s (B,) is the std of a white pixel."""
    return x.addcmul_(noise, x.sqrt() * _per_sample(std_at_white)).clamp_(0, 1)


def brightness_shift(x: Tensor, offset: Tensor) -> Tensor:
    """x + offset (B,), clamped: the probe's brightness corruption, where the jitter multiplies."""
    return x.add_(_per_sample(offset)).clamp_(0, 1)


def contrast_shift(x: Tensor, factor: Tensor) -> Tensor:
    """Blend towards each image's mean over channels and pixels: mean + factor * (x - mean)."""
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)  # (B, 1, 1, 1)
    # lerp with weight 0 returns x exactly: factor 1 is an identity.
    return x.lerp_(mean.expand_as(x), _per_sample(1 - factor)).clamp_(0, 1)


def dead_pixels(x: Tensor, fraction: Tensor, u: Tensor) -> Tensor:
    """Pixels with u < fraction / 2 stuck at 0, with u > 1 - fraction / 2 at 1; u (B, 1, S, S)
    uniform in [0, 1), one value per sensor site, so a stuck pixel is stuck in every channel."""
    half = _per_sample(fraction) / 2
    x = torch.where(u < half, 0.0, x)
    return torch.where(u > 1 - half, 1.0, x)


def jpeg_tables(quality: Tensor) -> Tensor:
    """libjpeg's quality scaling of the standard tables: (B,) quality in [1, 100] -> (B, 2, 8, 8),
    luma then chroma, entries in [1, 255]."""
    q = quality.clamp(1, 100)
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)  # (B,) percent
    base = _constant(quality.device, _JPEG_LUMA + _JPEG_CHROMA).view(1, 2, 8, 8)
    return torch.floor((base * scale.view(-1, 1, 1, 1) + 50) / 100).clamp_(1, 255)


def jpeg_blocks(x: Tensor, quality: Tensor) -> Tensor:
    """JPEG-like compression of (B, C, S, S): 8x8 block DCT, quantised with the quality-scaled
    tables (B,), and back. RGB goes through YCbCr (chroma quantised with the chroma table, not
    subsampled); one channel uses the luma table. Sides that are not multiples of 8 are padded by
    replication and cropped back, as an encoder does."""
    b, c, h, w = x.shape
    y = x * 255
    if c == 3:
        y = torch.einsum("ij,bjhw->bihw", _constant(x.device, _YCBCR).view(3, 3), y)
        y[:, 1:] += 128
    y = y - 128  # level shift of the standard
    ph, pw = (-h) % 8, (-w) % 8
    if ph or pw:
        y = F.pad(y, (0, pw, 0, ph), mode="replicate")
    hh, ww = y.shape[-2:]
    blocks = y.view(b, c, hh // 8, 8, ww // 8, 8).transpose(3, 4)  # (B, C, H/8, W/8, 8, 8)
    d = _dct_matrix(x.device)  # (8, 8) orthonormal: the standard's DCT-II scaling
    coef = d @ blocks @ d.T
    tables = jpeg_tables(quality)  # (B, 2, 8, 8)
    table = (tables[:, :1] if c == 1 else tables[:, [0, 1, 1]])[:, :, None, None]  # (B, C, 1, 1, 8, 8)
    coef = torch.round(coef / table) * table
    y = (d.T @ coef @ d).transpose(3, 4).reshape(b, c, hh, ww)[..., :h, :w] + 128
    if c == 3:
        y[:, 1:] -= 128
        y = torch.einsum("ij,bjhw->bihw", _constant(x.device, _YCBCR_INV).view(3, 3), y)
    return y.div_(255).clamp_(0, 1)


@functools.lru_cache(maxsize=8)
def _dct_matrix(device: torch.device) -> Tensor:
    """The orthonormal 8-point DCT-II matrix D (8, 8): coefficients of a block X are D X D^T."""
    k = torch.arange(8, dtype=torch.float64)[:, None]
    n = torch.arange(8, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.float().to(device)


@functools.lru_cache(maxsize=16)
def _constant(device: torch.device, values: tuple[float, ...]) -> Tensor:
    """A small float32 constant on `device`, copied there once (no host-device copy per call)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


# ---- The shift table: deterministic corruptions of uint8 evaluation batches ----

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
