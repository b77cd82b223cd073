"""Classifiers on frozen features, for `lejepa probe` (probe.py) and label-free selection.

- linear probe (docs/method.md section 6.1): LayerNorm + linear heads, one per learning rate,
  trained together on the same mini-batches of cached features (AdamW, warmup + cosine), the best
  kept on a validation part carved from the train features (`fit_linear_probe`); top-1 / top-5;
- kNN: `evaluate.knn_classify`, keyed by the k asked for (`knn_top1`);
- few-shot: nearest class centroid on centred, unit-norm features (SimpleShot), mean and std
  over draws (`fewshot_accuracy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lejepa_cli.image.evaluate import knn_classify
from lejepa_cli.probes import centre, split_train_val

LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # AdamW grid on LayerNorm'd features
SHOTS: tuple[int, ...] = (1, 5, 10)


# ---- linear probe: a grid of learning rates trained together -----------------------------------------


class LinearHead(nn.Module):
    """LayerNorm + linear classifier (docs/method.md section 6.1)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def _grid_logits(heads: Sequence[LinearHead], x: torch.Tensor) -> torch.Tensor:
    """Logits (G, B, C) of every head for x (B, F), in one matmul.

    The LayerNorm statistics are shared; each head's affine folds into its linear layer:
    (xn * g + b) W^T + c = xn (W * g)^T + (W b + c).
    """
    xn = F.layer_norm(x, x.shape[-1:], eps=heads[0].norm.eps)  # (B, F)
    gamma = torch.stack([h.norm.weight for h in heads])  # (G, F)
    beta = torch.stack([h.norm.bias for h in heads])  # (G, F)
    w = torch.stack([h.linear.weight for h in heads])  # (G, C, F)
    bias = torch.einsum("gcf,gf->gc", w, beta) + torch.stack([h.linear.bias for h in heads])  # (G, C)
    return torch.einsum("bf,gcf->gbc", xn, w * gamma[:, None, :]) + bias[:, None, :]


@dataclass
class LinearResult:
    head: LinearHead  # the best head (on the CPU)
    best_lr: float
    val_top1: dict[float, float]  # per learning rate


def train_linear_grid(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int, *,
    lrs: Sequence[float] = LRS, epochs: int = 40, batch_size: int = 256, weight_decay: float = 1e-6,
    seed: int = 0, device: torch.device | str = "cpu",
) -> LinearResult:
    """Train one LayerNorm + linear head per learning rate on the same mini-batches (AdamW,
    linear warmup over the first epoch then cosine to 0) and keep the best on (val_x, val_y)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    dim = train_x.shape[1]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        heads = [LinearHead(dim, num_classes).to(device) for _ in lrs]
    opt = torch.optim.AdamW([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, lrs)],
                            weight_decay=weight_decay)
    x, y = train_x.to(device), train_y.to(device)
    n = len(x)
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    total = max(1, epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 10 + 1)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(steps_per_epoch):
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * scale
            idx = order[i * batch_size : (i + 1) * batch_size]
            logits = _grid_logits(heads, x[idx])  # (G, B, C)
            # Sum over heads of each head's mean loss: every head gets exactly its own gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(len(heads)), reduction="sum") / len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        accs = topk_accuracy(_batched_logits(heads, val_x.to(device)), val_y.to(device), k=1)  # (G,)
    best = int(torch.argmax(accs))
    return LinearResult(heads[best].cpu().eval(), float(lrs[best]), {float(lr): float(a) for lr, a in zip(lrs, accs)})


@torch.no_grad()
def _batched_logits(heads: Sequence[LinearHead], x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([_grid_logits(heads, x[i : i + chunk]) for i in range(0, len(x), chunk)], dim=1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Fraction of rows whose label is among the top-k logits; logits (..., B, C) -> (...)."""
    k = min(k, logits.shape[-1])
    hit = (logits.topk(k, dim=-1).indices == labels.unsqueeze(-1)).any(-1)
    return hit.float().mean(-1)


def fit_linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, val_fraction: float = 0.1,
    lrs: Sequence[float] = LRS, epochs: int = 40, seed: int = 0, device: torch.device | str = "cpu",
) -> tuple[LinearResult, int, int]:
    """The linear probe protocol on cached features: carve a validation part from the train
    features, train the learning-rate grid on the rest, keep the best head.
    Returns the result and the sizes of the fit and validation parts.

    Also usable as a periodic evaluation during training:
    `head_accuracy(fit_linear_probe(tf, ty, c, epochs=10)[0].head, vf, vy)[0]`.
    """
    fit, val = split_train_val(len(train_x), val_fraction, seed)
    result = train_linear_grid(train_x[fit], train_y[fit], train_x[val], train_y[val], num_classes,
                               lrs=lrs, epochs=epochs, seed=seed, device=device)
    return result, len(fit), len(val)


@torch.no_grad()
def head_accuracy(head: LinearHead, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of a trained head."""
    logits = torch.cat([head(x[i : i + 8192]) for i in range(0, len(x), 8192)])
    return float(topk_accuracy(logits, y, 1)), float(topk_accuracy(logits, y, 5))


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
             ks: Sequence[int], num_classes: int) -> dict[int, float]:
    """`evaluate.knn_classify`, keyed by the k asked for even where k exceeds the train set
    (knn_classify then uses every train point and keys the result by that count)."""
    got = knn_classify(train_x, train_y, test_x, test_y, ks=ks, num_classes=num_classes)
    return {k: got[min(k, len(train_x))] for k in ks}


# ---- few-shot --------------------------------------------------------------------------------------


@torch.no_grad()
def fewshot_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int, *,
    shots: Sequence[int] = SHOTS, draws: int = 10, seed: int = 0,
) -> dict[str, Any]:
    """Nearest-class-centroid accuracy from `shots` labelled examples per class (SimpleShot:
    features centred by the train mean and L2-normalised), mean and std over `draws` draws."""
    tr, te = (F.normalize(x, dim=1) for x in centre(train_x, test_x))
    by_class = [torch.nonzero(train_y == c).flatten().numpy() for c in range(num_classes)]
    present = [c for c in range(num_classes) if len(by_class[c])]
    rng = np.random.default_rng(seed)
    top1, std = {}, {}
    for k in shots:
        accs = []
        for _ in range(draws):
            centroids = torch.stack([
                tr[rng.choice(by_class[c], size=min(k, len(by_class[c])), replace=False)].mean(0) for c in present
            ])  # (C', F)
            pred = torch.tensor(present)[(te @ F.normalize(centroids, dim=1).T).argmax(1)]
            accs.append(float((pred == test_y).float().mean()))
        top1[str(k)], std[str(k)] = float(np.mean(accs)), float(np.std(accs))
    return {"method": "nearest-centroid", "draws": draws, "top1": top1, "std": std}
