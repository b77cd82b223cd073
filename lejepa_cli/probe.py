"""Frozen-encoder evaluation: `lejepa probe CKPT` and the functions behind it.

    lejepa probe runs/demo/checkpoints/step-000000300.safetensors --json probe.json
    lejepa probe exports/demo --data /usr/share/datasets/fashion-mnist --plots plots/

    from lejepa_cli.probe import ProbeOptions, run_probe
    report = run_probe("runs/demo", ProbeOptions(shift=False))
    report["linear_top1"], report["knn_top1"][20], report["conditions"]["verdict"]

What it measures, on labelled train and evaluation splits (by default the data the checkpoint
was trained on: its train split and its held-out "val" split):
- linear probe (METHOD.md section 6): LayerNorm + linear on `backbone.probe_features` (the
  concatenated CLS tokens of the last two blocks for a ViT, pooled features for a CNN); a grid
  of learning rates trained together on cached features, the best chosen on a validation part
  carved from the train split; top-1 / top-5 on the evaluation split;
- kNN: cosine similarity, temperature 0.07, k in {10, 20, 200} (`evaluate.knn_classify`);
- few-shot: 1 / 5 / 10 labelled images per class, nearest class centroid on centred, unit-norm
  features (SimpleShot), mean and std over draws;
- robustness under shift (`shift.py`): the same linear head and kNN on corrupted evaluation
  images, accuracy and its drop per corruption and severity; with `adapt`, also after label-free
  adaptation (`adapt.py`: BatchNorm statistics re-estimated on each row's corrupted images);
- conditions (`conditions.py`): is the embedding h a near isotropic Gaussian, or which of
  collapse / anisotropy / heavy tails fails; for a training checkpoint also the projector
  output z, the space SIGReg acts on; a reading of both verdicts next to the linear probe.

Features are cached under $LEJEPA_CACHE_DIR/features (default ~/.cache/lejepa/features) as
safetensors + a JSON description, keyed by a digest of the encoder's weights, the data
fingerprint and the transform, so probing the same encoder and data again skips extraction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch import nn

from lejepa_cli import __version__
from lejepa_cli.checkpoint import tensor_digest
from lejepa_cli.conditions import diagnose, explain
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.errors import UserError
from lejepa_cli.evaluate import extract_features, knn_classify
from lejepa_cli.lejepa import load_projector
from lejepa_cli.shift import CORRUPTIONS, SEVERITIES, describe, make_corruption

if TYPE_CHECKING:
    from lejepa_cli.config import DataConfig

LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)  # AdamW grid on LayerNorm'd features
KNN_KS: tuple[int, ...] = (10, 20, 200)
SHOTS: tuple[int, ...] = (1, 5, 10)
SHIFT_KNN_K = 20


@dataclass
class ProbeOptions:
    data: str | None = None  # data source (None: the checkpoint's own training data)
    train_split: str = "train"
    eval_split: str = "val"
    device: str = "auto"
    batch_size: int = 256  # extraction batch
    max_train: int | None = None  # cap on train images (evenly spaced), None: all
    max_eval: int | None = None
    val_fraction: float = 0.1  # of the train split, for choosing the learning rate
    epochs: int = 40  # linear probe epochs over the cached features
    lrs: Sequence[float] = LRS
    knn_ks: Sequence[int] = KNN_KS
    shots: Sequence[int] = SHOTS
    fewshot_draws: int = 10
    shift: bool = True
    shift_images: int = 2000  # evaluation images corrupted per corruption and severity
    conditions: bool = True
    conditions_samples: int = 2048  # held-out embeddings tested for normality
    random_init: bool = False  # probe a freshly initialised encoder of the same architecture
    adapt: bool = False  # also the shift table after label-free adaptation (BatchNorm statistics) per row
    cache: bool = True
    progress: bool = True
    plots: Path | None = None  # folder for PNG plots (training curves, spectrum, shift, PCA maps)
    seed: int = 0


# ---- loading -------------------------------------------------------------------------------------


def select_device(name: str) -> torch.device:
    from lejepa_cli.train import select_device as pick

    return pick(name)


def load_probe_encoder(source: str | Path, *, device: torch.device, random_init: bool = False, seed: int = 0) -> nn.Module:
    """The encoder to probe (eval mode, `lejepa_info` attached); with `random_init`, fresh weights
    of the same architecture (seeded), for the baseline a trained encoder must beat."""
    from lejepa_cli.export import load_encoder
    from lejepa_cli.models import build_backbone

    encoder = load_encoder(source, device=device)
    if random_init:
        info = {**encoder.lejepa_info, "step": None, "random_init": True}
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
            torch.manual_seed(seed)
            encoder = build_backbone(**info["arch_config"])
        encoder = encoder.to(device).eval()
        encoder.lejepa_info = info
    return encoder


def encoder_digest(encoder: nn.Module) -> str:
    """Identifies the encoder's weights and architecture (part of every feature-cache key)."""
    arch = json.dumps(encoder.arch_config(), sort_keys=True)
    return hashlib.sha256((arch + tensor_digest(encoder.state_dict())).encode()).hexdigest()[:24]


def probe_data_config(info: dict[str, Any], data: str | None) -> "DataConfig":
    """The data config to probe on: the encoder's training data, with `data` as its source if given."""
    from lejepa_cli.config import DataConfig, config_from_dict

    config = info.get("config")
    cfg = config_from_dict(config).data if isinstance(config, dict) else DataConfig()
    if data is not None:
        cfg.source = data
    elif not isinstance(config, dict):
        raise UserError("this encoder does not say what data it was trained on: give labelled data with --data")
    return cfg


def probe_datasets(info: dict[str, Any], opts: ProbeOptions) -> tuple[ImageDataset, ImageDataset]:
    """Labelled train and evaluation splits: `opts.data`, or the data the encoder was trained on."""
    from lejepa_cli.data.sources import load_dataset

    cfg = probe_data_config(info, opts.data)
    train = load_dataset(cfg, opts.train_split)
    evaluation = load_dataset(cfg, opts.eval_split)
    for split, ds in ((opts.train_split, train), (opts.eval_split, evaluation)):
        if ds.labels is None:
            raise UserError(f"the '{split}' split of {cfg.source} has no labels; probing needs labelled data")
    return train, evaluation


# ---- feature extraction with an on-disk cache ------------------------------------------------------


def cache_root() -> Path:
    """$LEJEPA_CACHE_DIR, else ~/.cache/lejepa."""
    return Path(os.environ.get("LEJEPA_CACHE_DIR") or Path.home() / ".cache" / "lejepa").expanduser()


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey data for an RGB encoder (repeat) or RGB data for a grey one (luma)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


@dataclass
class FeatureSource:
    """An encoder ready to extract features from, with what makes its features unique."""

    encoder: nn.Module
    digest: str
    device: torch.device
    batch_size: int = 256
    cache_dir: Path | None = None  # None: no disk cache
    progress: bool = False
    extractions: int = field(default=0)  # passes over data actually run (not served from cache)

    @property
    def info(self) -> dict[str, Any]:
        return self.encoder.lejepa_info

    @property
    def autocast(self) -> torch.dtype | None:
        """bf16 autocast on CUDA (as training uses), full fp32 elsewhere."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def features(self, dataset: ImageDataset, *, kind: str = "probe", corruption: tuple[str, int] | None = None,
                 max_images: int | None = None, label: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (N, F) float32 on the CPU and labels (N,) of `dataset`.

        kind "probe" reads `probe_features`, "embedding" the embedding h (`forward`).
        """
        info = self.info
        channels = int(info["channels"])
        spec = {
            "encoder": self.digest, "kind": kind,
            "data": {"name": dataset.name, "fingerprint": dataset.fingerprint, "size": len(dataset),
                     "channels": dataset.channels, "resolution": dataset.resolution},
            "transform": {"eval": "resize-bilinear-antialias", "size": int(info["image_size"]),
                          "mean": [float(m) for m in info["mean"]], "std": [float(s) for s in info["std"]],
                          "channels": channels, "corruption": describe(*corruption) if corruption else None},
            "max_images": max_images, "precision": str(self.autocast).removeprefix("torch.") if self.autocast else "fp32",
            "version": __version__,  # the extraction code itself may change between versions
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
        # Without a fingerprint two different datasets could share a key: such data is never cached.
        cacheable = self.cache_dir is not None and bool(dataset.fingerprint)
        path = self.cache_dir / f"{key}.safetensors" if cacheable else None
        if path is not None and path.is_file():
            try:
                tensors = load_file(str(path))
                return tensors["features"], tensors.get("labels")
            except Exception:  # a damaged cache entry is recomputed, not fatal
                path.unlink(missing_ok=True)

        corrupt = make_corruption(*corruption) if corruption else None

        def transform(x: torch.Tensor) -> torch.Tensor:
            x = _match_channels(x, channels)
            return corrupt(x) if corrupt is not None else x

        fn = self.encoder.probe_features if kind == "probe" else self.encoder.forward
        total = len(dataset) if max_images is None else min(len(dataset), max_images)
        with self._progress(f"features {label or dataset.name}", total) as advance:
            feats, labels = extract_features(
                fn, dataset, size=int(info["image_size"]), device=self.device, mean=info["mean"], std=info["std"],
                batch_size=self.batch_size, max_images=max_images, transform=transform, on_batch=advance,
                autocast_dtype=self.autocast,
            )
        self.extractions += 1
        if path is not None:
            _save_features(path, feats, labels, spec)
        return feats, labels

    def _progress(self, description: str, total: int):
        if not self.progress:
            return nullcontext(lambda n: None)
        return _ProgressBar(description, total)


class _ProgressBar:
    def __init__(self, description: str, total: int):
        from lejepa_cli.logs import console

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True)
        self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self.bar.start()
        return lambda n: self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _save_features(path: Path, feats: torch.Tensor, labels: torch.Tensor | None, spec: dict[str, Any]) -> None:
    """safetensors for the arrays, a JSON sidecar saying what they are; both written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": feats.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"spec": json.dumps(spec)})
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**spec, "shape": list(feats.shape)}, indent=1))
    os.replace(tmp, side)


# ---- linear probe: a grid of learning rates trained together -----------------------------------------


class LinearHead(nn.Module):
    """LayerNorm + linear classifier (METHOD.md section 6)."""

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


def split_train_val(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a random split of n items; val gets `fraction` of them (at least 1)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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
    centre = train_x.mean(0, keepdim=True)
    tr = F.normalize(train_x - centre, dim=1)
    te = F.normalize(test_x - centre, dim=1)
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


# ---- robustness under shift --------------------------------------------------------------------------


def shift_report(
    src: FeatureSource, evaluation: ImageDataset, head: LinearHead, train_x: torch.Tensor, train_y: torch.Tensor,
    num_classes: int, *, max_images: int = 2000, corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES, knn_k: int = SHIFT_KNN_K,
) -> dict[str, Any]:
    """Linear-head and kNN top-1 on corrupted evaluation images, and their drops from clean."""
    n = min(max_images, len(evaluation))

    def scores(corruption: tuple[str, int] | None) -> tuple[float, float]:
        return _shift_scores(src, evaluation, corruption, n, head, train_x, train_y, num_classes, knn_k)

    clean_lin, clean_knn = scores(None)
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in corruptions:
        table[name] = {}
        for sev in severities:
            lin, knn = scores((name, sev))
            table[name][str(sev)] = {"linear_top1": lin, "linear_drop": clean_lin - lin, "knn_top1": knn, "knn_drop": clean_knn - knn}
    cells = [c for per in table.values() for c in per.values()]
    return {
        "images": n, "knn_k": knn_k,
        "clean": {"linear_top1": clean_lin, "knn_top1": clean_knn},
        "corruptions": table,
        "mean_linear_drop": float(np.mean([c["linear_drop"] for c in cells])) if cells else 0.0,
        "mean_knn_drop": float(np.mean([c["knn_drop"] for c in cells])) if cells else 0.0,
    }


def _shift_scores(src: FeatureSource, evaluation: ImageDataset, corruption: tuple[str, int] | None, n: int,
                  head: LinearHead, train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                  knn_k: int) -> tuple[float, float]:
    """Linear-head and kNN top-1 of `src` on the first n (evenly spaced) evaluation images, corrupted."""
    label = f"{evaluation.name} {corruption[0]} {corruption[1]}" if corruption else f"{evaluation.name} (shift subset)"
    x, y = src.features(evaluation, corruption=corruption, max_images=n, label=label)
    knn = knn_top1(train_x, train_y, x, y, (knn_k,), num_classes)
    return head_accuracy(head, x, y)[0], knn[knn_k]


def adapted_shift_report(src: FeatureSource, train: ImageDataset, evaluation: ImageDataset, shift: dict[str, Any],
                         num_classes: int, opts: ProbeOptions) -> dict[str, Any]:
    """The shift table after label-free adaptation (`lejepa_cli.adapt`), AdaBN's protocol.

    Source: the encoder's BatchNorm statistics re-estimated on the clean train split under the
    evaluation transform (the running statistics of training describe augmented views of moving
    weights); its train features fit a linear head and form the kNN bank. Target: for each row a
    copy of the same weights with statistics from that row's corrupted evaluation images alone,
    without labels (the same images, with the same noise, that are then scored); the labels only
    score it. Drops are from the table's clean accuracy (the unadapted encoder's).
    """
    from lejepa_cli.adapt import adapted_copy

    n, knn_k, channels = shift["images"], shift["knn_k"], int(src.info["channels"])

    def adapted_source(dataset: ImageDataset, corruption: tuple[str, int] | None, max_images: int | None) -> FeatureSource:
        corrupt = make_corruption(*corruption) if corruption else None  # the same noise the features will see

        def transform(x: torch.Tensor) -> torch.Tensor:
            x = _match_channels(x, channels)
            return corrupt(x) if corrupt is not None else x

        model = adapted_copy(src.encoder, dataset, device=src.device, batch_size=src.batch_size, max_images=max_images,
                             transform=transform)
        src.extractions += 1  # the adaptation's own pass
        return FeatureSource(model, encoder_digest(model), src.device, src.batch_size, src.cache_dir, src.progress)

    source = adapted_source(train, None, opts.max_train)
    train_x, train_y = source.features(train, max_images=opts.max_train, label=f"{train.name} train (source statistics)")
    linear, _, _ = fit_linear_probe(train_x, train_y, num_classes, val_fraction=opts.val_fraction, lrs=opts.lrs,
                                    epochs=opts.epochs, seed=opts.seed, device=src.device)
    head = linear.head
    src.extractions += source.extractions

    def scores(corruption: tuple[str, int] | None) -> tuple[float, float]:
        target = adapted_source(evaluation, corruption, n)
        result = _shift_scores(target, evaluation, corruption, n, head, train_x, train_y, num_classes, knn_k)
        src.extractions += target.extractions
        return result

    clean_lin, clean_knn = shift["clean"]["linear_top1"], shift["clean"]["knn_top1"]
    lin, knn = scores(None)
    out: dict[str, Any] = {"method": "batchnorm-stats", "source_images": len(train_x),
                           "clean": {"linear_top1": lin, "knn_top1": knn}, "corruptions": {}}
    for name, per in shift["corruptions"].items():
        out["corruptions"][name] = {}
        for sev, before in per.items():
            lin, knn = scores((name, int(sev)))
            lost = clean_lin - before["linear_top1"]
            out["corruptions"][name][sev] = {
                "linear_top1": lin, "linear_drop": clean_lin - lin, "knn_top1": knn, "knn_drop": clean_knn - knn,
                # share of the corruption's linear drop that adaptation wins back (None: nothing was lost)
                "linear_recovered": (lin - before["linear_top1"]) / lost if lost > 0.01 else None,
            }
    cells = [c for per in out["corruptions"].values() for c in per.values()]
    out["mean_linear_drop"] = float(np.mean([c["linear_drop"] for c in cells])) if cells else 0.0
    out["mean_knn_drop"] = float(np.mean([c["knn_drop"] for c in cells])) if cells else 0.0
    return out


# ---- the whole probe -----------------------------------------------------------------------------------


def run_probe(source: str | Path, opts: ProbeOptions | None = None) -> dict[str, Any]:
    """Probe the encoder at `source` (checkpoint, run folder or export); returns the JSON report."""
    opts = opts or ProbeOptions()
    t0 = time.perf_counter()
    device = select_device(opts.device)
    encoder = load_probe_encoder(source, device=device, random_init=opts.random_init, seed=opts.seed)
    info = encoder.lejepa_info
    if opts.adapt:
        _check_adapt(encoder, source, opts)
    train, evaluation = probe_datasets(info, opts)
    src = FeatureSource(encoder, encoder_digest(encoder), device, opts.batch_size,
                        cache_root() / "features" if opts.cache else None, opts.progress)
    num_classes = max(train.num_classes, evaluation.num_classes, int(train.labels.max()) + 1,
                      int(evaluation.labels.max()) + 1)

    train_x, train_y = src.features(train, max_images=opts.max_train, label=f"{train.name} train")
    eval_x, eval_y = src.features(evaluation, max_images=opts.max_eval, label=f"{evaluation.name} eval")
    t_extract = time.perf_counter()

    linear, n_fit, n_val = fit_linear_probe(train_x, train_y, num_classes, val_fraction=opts.val_fraction,
                                            lrs=opts.lrs, epochs=opts.epochs, seed=opts.seed, device=device)
    top1, top5 = head_accuracy(linear.head, eval_x, eval_y)
    knn = knn_top1(train_x, train_y, eval_x, eval_y, opts.knn_ks, num_classes)
    report: dict[str, Any] = {
        "checkpoint": str(source),
        "random_init": opts.random_init,
        "step": info.get("step"),
        "encoder": {"arch_config": info["arch_config"], "digest": src.digest, "image_size": info["image_size"],
                    "embed_dim": int(encoder.embed_dim), "feature_dim": int(encoder.feature_dim)},
        "data": {split: {"name": ds.name, "fingerprint": ds.fingerprint, "images": len(x), "num_classes": ds.num_classes}
                 for split, ds, x in (("train", train, train_x), ("eval", evaluation, eval_x))},
        "linear_top1": top1,
        "linear_top5": top5,
        "linear": {"best_lr": linear.best_lr, "val_top1": {f"{lr:g}": a for lr, a in linear.val_top1.items()},
                   "epochs": opts.epochs, "train_images": n_fit, "val_images": n_val,
                   "features": "probe_features", "feature_dim": int(train_x.shape[1])},
        "knn_top1": {str(k): v for k, v in knn.items()},
        "fewshot": fewshot_accuracy(train_x, train_y, eval_x, eval_y, num_classes, shots=opts.shots,
                                    draws=opts.fewshot_draws, seed=opts.seed),
        "shift": None,
        "conditions": None,
    }
    if opts.shift:
        report["shift"] = shift_report(src, evaluation, linear.head, train_x, train_y, num_classes,
                                       max_images=opts.shift_images)
        if opts.adapt:
            report["shift"]["adapted"] = adapted_shift_report(src, train, evaluation, report["shift"], num_classes, opts)
    if opts.conditions:
        n = min(opts.conditions_samples, len(evaluation))
        embeddings, _ = src.features(evaluation, kind="embedding", max_images=n, label=f"{evaluation.name} embeddings")
        calib = cache_root() / "calibration" if opts.cache else None
        report["conditions"] = diagnose(embeddings, seed=opts.seed, cache_dir=calib)
        report["conditions"]["space"] = "embedding h (backbone output)"
        projector = None if opts.random_init else load_projector(source, device)
        if projector is not None:
            with torch.no_grad():
                z = projector(embeddings.to(device)).float().cpu()
            report["conditions"]["projector"] = {**diagnose(z, seed=opts.seed, cache_dir=calib),
                                                 "space": "projector output z (what SIGReg regularises)"}
        report["conditions"]["reading"] = explain(report["conditions"], linear_top1=top1, num_classes=num_classes)
    report["timing"] = {"extract_s": t_extract - t0, "total_s": time.perf_counter() - t0,
                        "extractions": src.extractions}
    if opts.plots is not None:
        from lejepa_cli.plots import write_probe_plots

        report["plots"] = [str(p) for p in write_probe_plots(opts.plots, report, src, evaluation, source)]
        report["timing"]["total_s"] = time.perf_counter() - t0
    return report


def _check_adapt(encoder: nn.Module, source: str | Path, opts: ProbeOptions) -> None:
    """--adapt needs the shift table and an encoder with BatchNorm statistics to re-estimate."""
    from lejepa_cli.adapt import batchnorm_layers

    if not opts.shift:
        raise UserError("--adapt reports the shift table after adaptation: drop --no-shift")
    if not batchnorm_layers(encoder):
        raise UserError(f"--adapt re-estimates BatchNorm statistics, and {source} ({encoder.arch_config()['arch']}) "
                        f"has none (LayerNorm only); adapt it by fine-tuning with `lejepa adapt --steps N` and "
                        f"probe the export")


# ---- reporting ---------------------------------------------------------------------------------------


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report_tables(report: dict[str, Any]) -> list[Table]:
    """Rich tables of a probe report, for the terminal."""
    title = f"{report['checkpoint']}" + (" (random init)" if report["random_init"] else f" (step {report['step']})")
    main = Table("metric", "value", title=title)
    main.add_row("linear top-1 / top-5", f"{_pct(report['linear_top1'])} / {_pct(report['linear_top5'])} %")
    best = f"{report['linear']['best_lr']:g}"
    main.add_row("linear best lr (val top-1)", f"{best} ({_pct(report['linear']['val_top1'][best])} %)")
    main.add_row("kNN top-1 " + " / ".join(f"k={k}" for k in report["knn_top1"]),
                 " / ".join(_pct(v) for v in report["knn_top1"].values()) + " %")
    fs = report["fewshot"]
    main.add_row(f"few-shot top-1 ({fs['method']}, {fs['draws']} draws) "
                 + " / ".join(f"{k}-shot" for k in fs["top1"]), " / ".join(_pct(v) for v in fs["top1"].values()) + " %")
    data = report["data"]
    main.add_row("data", f"train {data['train']['name']} ({data['train']['images']}), eval {data['eval']['name']} ({data['eval']['images']})")
    tables = [main]
    shift = report.get("shift")
    if shift and shift.get("adapted"):
        tables.append(_adapted_shift_table(shift))
    elif shift:
        t = Table("corruption", "severity", "linear %", "drop", f"kNN k={shift['knn_k']} %", "drop",
                  title=f"robustness under shift ({shift['images']} eval images)")
        t.add_row("clean", "", _pct(shift["clean"]["linear_top1"]), "", _pct(shift["clean"]["knn_top1"]), "")
        for name, per in shift["corruptions"].items():
            for sev, c in per.items():
                t.add_row(name, sev, _pct(c["linear_top1"]), _pct(c["linear_drop"]), _pct(c["knn_top1"]), _pct(c["knn_drop"]))
        tables.append(t)
    cond = report.get("conditions")
    if cond:
        t = Table("statistic", *(["backbone h (probes read it)"] + (["projector z (SIGReg acts on it)"] if "projector" in cond else [])),
                  title="conditions: is the embedding an isotropic Gaussian?",
                  caption="\n".join(cond.get("reading") or ()) or None, caption_justify="left")
        spaces = [cond] + ([cond["projector"]] if "projector" in cond else [])

        def row(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
            t.add_row(label, *(fmt(s) for s in spaces))

        row("samples x dims", lambda s: f"{s['n']} x {s['dim']}")
        row("SIGReg (Gaussian ref)", lambda s: "-" if s["sigreg"] is None else f"{s['sigreg']:.3g} ({s['sigreg_gaussian']:.3g})")
        row(f"projections passing EP test at {100 * cond['alpha']:.0f}%", lambda s: f"{_pct(s['pass_rate'])} %")
        row("effective rank (Gaussian ref)", lambda s: f"{s['effective_rank']:.1f}" + (
            f" ({s['effective_rank_gaussian']:.1f})" if s.get("effective_rank_gaussian") else ""))
        row("condition number (Gaussian ref)", lambda s: _num(s["condition_number"]) + (
            f" ({_num(s['condition_number_gaussian'])})" if s.get("condition_number_gaussian") else ""))
        row("null dimensions (Gaussian ref)", lambda s: f"{s['null_dims']}" + (
            f" ({s['null_dims_gaussian']})" if s.get("null_dims_gaussian") is not None else ""))
        row("median excess kurtosis", lambda s: _num(s["median_excess_kurtosis"]))
        row("|mean| / RMS std", lambda s: f"{s['mean_norm']:.3g} / {s['scale']:.3g}")
        row("verdict", lambda s: s["verdict"])
        tables.append(t)
    return tables


def _adapted_shift_table(shift: dict[str, Any]) -> Table:
    """Clean, corrupted and adapted top-1 side by side, per corruption and severity."""
    knn = f"kNN k={shift['knn_k']}"
    t = Table("corruption", "sev", "linear clean %", "corrupted", "adapted", "recovered",
              f"{knn} clean %", "corrupted", "adapted",
              title=f"robustness under shift, before and after label-free adaptation ({shift['images']} eval images; "
                    f"adapted: BatchNorm statistics re-estimated on each row's corrupted images, no labels)")
    clean, adapted = shift["clean"], shift["adapted"]
    t.add_row("clean", "", _pct(clean["linear_top1"]), "", _pct(adapted["clean"]["linear_top1"]), "",
              _pct(clean["knn_top1"]), "", _pct(adapted["clean"]["knn_top1"]))
    for name, per in shift["corruptions"].items():
        for sev, c in per.items():
            a = adapted["corruptions"][name][sev]
            rec = "-" if a["linear_recovered"] is None else f"{100 * a['linear_recovered']:.0f}%"
            t.add_row(name, sev, _pct(clean["linear_top1"]), _pct(c["linear_top1"]), _pct(a["linear_top1"]), rec,
                      _pct(clean["knn_top1"]), _pct(c["knn_top1"]), _pct(a["knn_top1"]))
    return t


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"
