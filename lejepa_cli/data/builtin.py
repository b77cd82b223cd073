"""The built-in procedural dataset: coloured shapes on plain backgrounds, 10 classes.

It needs no download, so the `demo` preset and the tests run anywhere. Shape, not colour or
position, carries the label. What else varies is chosen so that the augmentations of LeJEPA's
views remove it: hue (the views rotate hue fully) and position and size (random crops).
Luminance is fixed (a dark background, a light shape): a per-image brightness that every view
shares would be the easiest thing for a self-supervised encoder to encode, and the label does
not depend on it (v1 of this set had random luminance, rotation and a background ramp, and a
small ViT learned those nuisances instead of shape: kNN 0.18 after the demo's budget).
Random position and hue keep a linear classifier on raw pixels and a random encoder low.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lejepa_cli.data.dataset import ImageDataset, channel_stats

CLASS_NAMES = [
    "disk", "square", "triangle", "ring", "plus",
    "stripes", "checker", "two-dots", "half-disk", "ellipse",
]


def _colour(luma: np.ndarray, hue: np.ndarray, chroma: float) -> np.ndarray:
    """(b, 3) RGB in [0, 1] from YIQ luma and a chroma vector of angle `hue` (the views' hue axis)."""
    i, q = chroma * np.cos(hue), chroma * np.sin(hue)
    rgb = np.stack([luma + 0.956 * i + 0.621 * q, luma - 0.272 * i - 0.647 * q, luma - 1.106 * i + 1.703 * q], 1)
    return np.clip(rgb, 0, 1)


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of class `label` in shape-centred, unit-radius coordinates."""
    r = np.sqrt(u * u + v * v)
    if label == 0:
        return r < 0.9
    if label == 1:
        return np.maximum(np.abs(u), np.abs(v)) < 0.7
    if label == 2:
        return (v < 0.6) & (np.abs(u) < (v + 0.9) * 0.62)
    if label == 3:
        return (r > 0.5) & (r < 0.95)
    if label == 4:
        return ((np.abs(u) < 0.28) & (np.abs(v) < 0.95)) | ((np.abs(v) < 0.28) & (np.abs(u) < 0.95))
    if label == 5:
        return (r < 0.95) & (np.sin(u * 3.2 * np.pi) > 0)
    if label == 6:
        inside = np.maximum(np.abs(u), np.abs(v)) < 0.8
        return inside & ((np.floor((u + 0.8) * 1.9) + np.floor((v + 0.8) * 1.9)) % 2 == 0)
    if label == 7:
        return (np.hypot(u - 0.5, v) < 0.38) | (np.hypot(u + 0.5, v) < 0.38)
    if label == 8:
        return (r < 0.95) & (u > 0)
    if label == 9:
        return (u / 0.98) ** 2 + (v / 0.38) ** 2 < 1
    raise ValueError(label)


def generate(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, size, size, 3) uint8 and balanced labels (n,), fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.empty((n, size, size, 3), np.uint8)
    chunk = 512  # bounds the float32 working set
    for start in range(0, n, chunk):
        idx = np.arange(start, min(n, start + chunk))
        b = len(idx)
        radius = rng.uniform(0.2, 0.35, b) * size
        cx = rng.uniform(radius, size - radius)
        cy = rng.uniform(radius, size - radius)
        u = (xs[None] - cx[:, None, None]) / radius[:, None, None]  # (b, S, S), shape-centred, unit radius
        v = (ys[None] - cy[:, None, None]) / radius[:, None, None]
        mask = np.zeros((b, size, size), bool)
        for label in range(len(CLASS_NAMES)):
            sel = labels[idx] == label
            if sel.any():
                mask[sel] = _shape_mask(label, u[sel], v[sel])
        # Colours: random hue, fixed luminance bands (dark background, light shape).
        bg = _colour(rng.uniform(0.15, 0.3, b), rng.uniform(0, 2 * np.pi, b), chroma=0.25)
        fg = _colour(rng.uniform(0.65, 0.8, b), rng.uniform(0, 2 * np.pi, b), chroma=0.25)
        img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
        img += rng.normal(0, 0.04, img.shape)
        images[idx] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def builtin_dataset(split: str = "train", n: int = 4096, size: int = 32, seed: int = 0) -> ImageDataset:
    """The built-in dataset; `train` and `val` draw from disjoint seeds."""
    if split not in ("train", "val", "test"):
        from lejepa_cli.errors import UserError

        raise UserError(f"the built-in dataset has splits 'train' and 'val', not '{split}'")
    split_seed = {"train": 0, "val": 1, "test": 1}[split] + 1000 * seed
    images, labels = generate(n, size, split_seed)
    mean, std = channel_stats(images)
    tag = f"builtin-shapes-v2:{split}:{n}:{size}:{seed}"
    return ImageDataset(
        images=images, labels=labels, class_names=list(CLASS_NAMES), mean=mean, std=std,
        fingerprint=hashlib.sha256(tag.encode()).hexdigest()[:16], name="builtin",
        ids=[f"builtin/{split}/{i}" for i in range(n)],
    )
