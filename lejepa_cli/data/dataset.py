"""The in-memory (or memory-mapped) image dataset every data source produces.

Sources (built-in, IDX, .npz, prepared shards) all return an `ImageDataset`; the loader, the
trainer and the probe only ever see this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np


class ImageArray(Protocol):
    """uint8 images (N, H, W, C): a numpy array, a memmap, or a sharded reader.

    Indexing with a 1-D integer array returns a (B, H, W, C) uint8 numpy array.
    """

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: np.ndarray) -> np.ndarray: ...


@dataclass
class ImageDataset:
    images: ImageArray  # (N, H, W, C) uint8
    labels: np.ndarray | None = None  # (N,) int64, or None when unlabelled
    class_names: list[str] | None = None
    mean: Sequence[float] = (0.5,)  # per channel, images scaled to [0, 1]
    std: Sequence[float] = (0.25,)
    fingerprint: str = ""  # identifies the source content; keys caches and checkpoints
    name: str = ""
    ids: list[str] | None = field(default=None, repr=False)  # per-image ids (source paths)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        if self.class_names:
            return len(self.class_names)
        return int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Images (B, H, W, C) uint8 and labels (B,) for the given indices."""
        index = np.asarray(index, dtype=np.int64)
        labels = None if self.labels is None else self.labels[index]
        return self.images[index], labels


def channel_stats(images: np.ndarray, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units, from an evenly spaced subset of images."""
    index = np.arange(0, len(images), max(1, len(images) // max_images))
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(index), 256):  # chunked: 10k images at 256 px would be 16 GB as float64
        chunk = np.asarray(images[index[start : start + 256]], dtype=np.float64) / 255.0
        flat = chunk.reshape(-1, chunk.shape[-1])
        total = total + flat.sum(0)
        total_sq = total_sq + (flat * flat).sum(0)
        count += len(flat)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
    return mean.tolist(), np.maximum(std, 1e-3).tolist()
