"""Batches for training: a sampler that is a pure function of the step, and a prefetching loader;
the deterministic evaluation transform (uint8 batch -> resized, normalised float) beside them.

The order of images depends only on (seed, step): epoch e is a permutation drawn from
seed + e, and optimizer step s takes the s-th `batch_size` slice of it (the last partial
batch is dropped so every rank always gets the same N). Each process takes a disjoint,
equal slice of that global batch. A resumed run therefore continues mid-epoch with the same
order without any sampler state, even on a different number of processes.

Batches cross to the device as uint8 (pinned + non-blocking on CUDA); augmentation happens
there, on the whole batch at once (see `views.py`). A background thread gathers the next
batches while the accelerator works on the current one.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.errors import UserError


class StepSampler:
    """Global-batch indices for optimizer step `step`, sharded by rank and micro-batch."""

    def __init__(self, num_images: int, batch_size: int, seed: int):
        if num_images < batch_size:
            raise UserError(
                f"the dataset has {num_images} images, fewer than train.batch_size = {batch_size}; "
                f"lower train.batch_size"
            )
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = num_images // batch_size
        self._epoch = -1
        self._perm = np.empty(0, np.int64)

    def position(self, step: int) -> dict[str, int]:
        return {"epoch": step // self.steps_per_epoch, "batch_in_epoch": step % self.steps_per_epoch}

    def global_batch(self, step: int) -> np.ndarray:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_images)
            self._epoch = epoch
        return self._perm[b * self.batch_size : (b + 1) * self.batch_size]

    def local_batch(self, step: int, rank: int, world: int, micro: int, num_micro: int) -> np.ndarray:
        """This process's slice: the global batch split into world x num_micro equal parts."""
        parts = world * num_micro
        size = self.batch_size // parts
        k = rank * num_micro + micro
        return self.global_batch(step)[k * size : (k + 1) * size]


def pins_memory(device: torch.device) -> bool:
    """Whether host batches bound for `device` go through pinned memory (so the copy can overlap compute)."""
    return device.type == "cuda"


@dataclass
class Batch:
    # What the objective reads, uint8 on the device: an image batch (B, C, H, W), or a world's
    # windows of frames (B, T, C, H, W).
    inputs: torch.Tensor
    # What goes with them, on the device: an image batch's class labels (B,) int64 (None for
    # unlabelled data), or a world's action blocks (B, T, A) float32.
    targets: torch.Tensor | None
    wait_s: float  # time the training loop spent blocked waiting for this batch


class BatchLoader:
    """Iterates micro-batches of steps [start, stop) for one process, prefetching in a thread."""

    def __init__(
        self, dataset: ImageDataset, sampler: StepSampler, device: torch.device, *,
        rank: int = 0, world: int = 1, num_micro: int = 1, prefetch: int = 4,
    ):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.rank, self.world, self.num_micro = rank, world, num_micro
        self.prefetch = prefetch
        self.pin = pins_memory(device)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lejepa-loader")

    def _load(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs, targets = self.dataset.batch(index)
        # (B, H, W, C) -> (B, C, H, W), or a world's windows (B, T, H, W, C) -> (B, T, C, H, W); uint8 views
        x = torch.from_numpy(np.ascontiguousarray(inputs)).movedim(-1, -3)
        # Class labels as int64; a world's action blocks (B, T, A) stay float32.
        kind = np.float32 if targets is not None and np.asarray(targets).dtype.kind == "f" else np.int64
        y = None if targets is None else torch.from_numpy(np.ascontiguousarray(targets, kind))
        if self.pin:
            x = x.contiguous().pin_memory()
            y = None if y is None else y.pin_memory()
        return x, y

    def iterate(self, start: int, stop: int):
        """Yields (step, micro, Batch) in order."""
        jobs = ((s, m) for s in range(start, stop) for m in range(self.num_micro))
        queue: deque[tuple[int, int, Future]] = deque()

        def submit() -> None:
            job = next(jobs, None)
            if job is not None:
                s, m = job
                index = self.sampler.local_batch(s, self.rank, self.world, m, self.num_micro)
                queue.append((s, m, self._pool.submit(self._load, index)))

        for _ in range(self.prefetch):
            submit()
        while queue:
            s, m, future = queue.popleft()
            t0 = time.perf_counter()
            x, y = future.result()
            wait = time.perf_counter() - t0
            submit()
            x = x.to(self.device, non_blocking=True)
            y = None if y is None else y.to(self.device, non_blocking=True)
            yield s, m, Batch(x, y, wait)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def eval_transform(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, C, size, size) float32, normalised."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
