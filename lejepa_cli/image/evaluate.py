"""Frozen-encoder evaluation shared by training (end-of-run / periodic kNN) and `lejepa probe`.

The evaluation transform (`data.loader.eval_transform`) is deterministic: resize the whole image
to the global view size and normalise with the dataset's mean/std.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.data.loader import eval_transform

# Training's kNN (end of run, eval_every) uses at most this many train images, evenly spaced: a
# quick monitor. `lejepa probe` uses every train image and the probe features, so for a ViT its
# kNN of the same checkpoint differs; `knn_protocol` says so in the training summary.
TRAIN_KNN_MAX_IMAGES = 10_000
TRAIN_KNN_K = 20


def knn_protocol(backbone: torch.nn.Module, train_images: int) -> str:
    """How training's knn_top1 is measured, beside what `lejepa probe` measures for the same checkpoint."""
    used = min(train_images, TRAIN_KNN_MAX_IMAGES)
    same = backbone.feature_dim == backbone.embed_dim  # ResNets: probe features are the embedding
    features = "embedding h (= the probe's features)" if same else "embedding h (the probe reads the last two blocks' CLS)"
    return (f"k={TRAIN_KNN_K} on the {features}, {used} of {train_images} train images; "
            f"lejepa probe: k=10/20/200 on probe features, every train image")


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: ImageDataset,
    *,
    size: int,
    device: torch.device,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 256,
    max_images: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (N, F) float32 on the CPU of `fn` (e.g. backbone.probe_features) and labels (N,).

    `transform`, if given, acts on the uint8 batch before the eval transform (used for shift tests).
    """
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    index = np.arange(n) if n == len(dataset) else np.linspace(0, len(dataset) - 1, n).astype(np.int64)
    mean = dataset.mean if mean is None else mean
    std = dataset.std if std is None else std
    feats, labels = [], []
    for start in range(0, n, batch_size):
        images, y = dataset.batch(index[start : start + batch_size])
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)
        if transform is not None:
            x = transform(x)
        x = eval_transform(x, size, mean, std)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            f = fn(x)
        feats.append(f.float().cpu())
        if y is not None:
            labels.append(torch.from_numpy(np.asarray(y, np.int64)))
        if on_batch is not None:
            on_batch(len(x))
    return torch.cat(feats), (torch.cat(labels) if labels else None)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    *, ks: Sequence[int] = (10, 20, 200), temperature: float = 0.07, num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy of a cosine-similarity, temperature-weighted kNN vote (DINO's protocol)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    ks = [min(k, len(train)) for k in ks]
    kmax = max(ks)
    correct = {k: 0 for k in ks}
    for start in range(0, len(test), chunk):
        sim = test[start : start + chunk] @ train.T  # (b, N_train)
        top_sim, top_idx = sim.topk(kmax, dim=1)
        weights = (top_sim / temperature).exp()
        votes_for = F.one_hot(train_labels[top_idx], num_classes).float()  # (b, kmax, C)
        truth = test_labels[start : start + chunk]
        for k in ks:
            scores = (votes_for[:, :k] * weights[:, :k, None]).sum(1)
            correct[k] += int((scores.argmax(1) == truth).sum())
    return {k: correct[k] / len(test) for k in ks}
