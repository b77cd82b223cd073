"""Sensor-like corruptions as training views: noise, exposure shifts and compression artefacts.

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
"""

from __future__ import annotations

import functools
import math

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
