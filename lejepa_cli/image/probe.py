"""Frozen-encoder evaluation: `lejepa probe CKPT` and the functions behind it.

    lejepa probe runs/demo/checkpoints/step-000000300.safetensors --json probe.json
    lejepa probe exports/demo --data /usr/share/datasets/fashion-mnist --plots plots/
    lejepa probe --random-init --preset fmnist --data DIR      # the untrained baseline, before any run

    from lejepa_cli.image.probe import ProbeOptions, run_probe
    report = run_probe("runs/demo", ProbeOptions(shift=False))
    report["linear_top1"], report["knn_top1"][20], report["conditions"]["verdict"]

What it measures, on labelled train and evaluation splits (by default the data the checkpoint
was trained on: its train split and its held-out "val" split):
- linear probe (docs/method.md section 6.1): LayerNorm + linear on `backbone.probe_features` (the
  concatenated CLS tokens of the last two blocks for a ViT, pooled features for a CNN); a grid
  of learning rates trained together on cached features, the best chosen on a validation part
  carved from the train split; top-1 / top-5 on the evaluation split;
- kNN: cosine similarity, temperature 0.07, k in {10, 20, 200} (`evaluate.knn_classify`);
- few-shot: 1 / 5 / 10 labelled images per class, nearest class centroid on centred, unit-norm
  features (SimpleShot), mean and std over draws;
- robustness under shift (`corruptions.py`, its shift-table half): the same linear head and kNN on corrupted evaluation
  images, accuracy and its drop per corruption and severity; with `adapt`, also after label-free
  adaptation (`adapt.py`: BatchNorm statistics re-estimated on each row's corrupted images);
- conditions (`conditions.py`): is the embedding h a near isotropic Gaussian, or which of
  collapse / anisotropy / heavy tails fails; for a training checkpoint also the projector
  output z, the space SIGReg acts on; a reading of both verdicts next to the linear probe.

Features come from `features.FeatureSource` (cached on disk); the linear, kNN and few-shot
classifiers are in `classifiers.py`; the tables and the JSON file are written by `report.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from lejepa_cli import dist
from lejepa_cli.checkpoint import tensor_digest
from lejepa_cli.image.conditions import diagnose, explain
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.errors import UserError
from lejepa_cli.image.features import FeatureSource, cache_root, match_channels, usable_cache_dir
from lejepa_cli.image.model import load_projector
from lejepa_cli.image.limits import MAX_EPOCHS, MIN_TRAIN
from lejepa_cli.image.classifiers import (
    LRS, SHOTS, LinearHead, fewshot_accuracy, fit_linear_probe, head_accuracy, knn_top1,
)
from lejepa_cli.image.corruptions import CORRUPTIONS, SEVERITIES, make_corruption

if TYPE_CHECKING:
    from lejepa_cli.config import DataConfig

KNN_KS: tuple[int, ...] = (10, 20, 200)
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
    preset: str | None = None  # with random_init and no source: the architecture (and data) of this preset
    cache: bool = True
    progress: bool = True
    plots: Path | None = None  # folder for PNG plots (training curves, spectrum, shift, PCA maps)
    overwrite: bool = False  # replace files in `plots` that this tool did not draw
    seed: int = 0

    def check(self) -> None:
        """One-line UserError for a value the probe cannot run with (the CLI checks ranges first;
        this protects the Python API)."""
        def whole(name: str, value: Any, low: int, high: int | None = None) -> None:
            ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
                  and (high is None or value <= high))
            if not ok:
                allowed = f"between {low} and {high}" if high is not None else f"a whole number >= {low}"
                raise UserError(f"--{name.replace('_', '-')} must be {allowed}, got {value!r}")

        whole("batch_size", self.batch_size, 1)
        whole("epochs", self.epochs, 1, MAX_EPOCHS)
        whole("shift_images", self.shift_images, 1)
        whole("fewshot_draws", self.fewshot_draws, 1)
        whole("conditions_samples", self.conditions_samples, 2)
        whole("seed", self.seed, 0)
        if self.max_train is not None:
            whole("max_train", self.max_train, MIN_TRAIN)
        if self.max_eval is not None:
            whole("max_eval", self.max_eval, 1)
        for name, values in (("knn_ks", self.knn_ks), ("shots", self.shots)):
            if not values:
                raise UserError(f"{name} must list at least one value")
            for v in values:
                whole(name, v, 1)
        if not (isinstance(self.val_fraction, numbers.Real) and 0 < self.val_fraction < 1):
            raise UserError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not self.lrs or not all(isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0 for lr in self.lrs):
            raise UserError(f"lrs must be finite learning rates > 0, got {list(self.lrs)!r}")
        if self.preset is not None and not self.random_init:
            raise UserError("--preset names an untrained architecture: use it with --random-init")


# ---- loading -------------------------------------------------------------------------------------


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


def preset_encoder(preset: str, data: str | None, *, device: torch.device, seed: int = 0) -> nn.Module:
    """A freshly initialised encoder (seeded) built as `preset` would build it for `data` (default:
    the preset's own data), with the `lejepa_info` a checkpoint of that run would carry: the
    random-init baseline before any training."""
    from lejepa_cli.config import load_config
    from lejepa_cli.data.sources import load_dataset
    from lejepa_cli.models import build_backbone_from_config

    cfg = load_config(preset, [f"data.source={data}"] if data is not None else [])
    train = load_dataset(cfg.data, cfg.data.train_split)  # its channels and mean/std, as training uses them
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build_backbone_from_config(cfg, train.channels)
    arch = encoder.arch_config()
    encoder.lejepa_info = {
        "arch_config": arch, "image_size": int(arch["img_size"]), "patch_size": arch.get("patch_size"),
        "channels": int(arch["in_chans"]), "mean": list(train.mean), "std": list(train.std), "step": None,
        "preset": preset, "config": cfg.to_dict(), "random_init": True, "source": f"preset {preset}",
        "embed_dim": int(encoder.embed_dim), "feature_dim": int(encoder.feature_dim),
    }
    return encoder.to(device).eval()


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
    """The shift table after label-free adaptation (`lejepa_cli.image.adapt`), AdaBN's protocol.

    Source: the encoder's BatchNorm statistics re-estimated on the clean train split under the
    evaluation transform (the running statistics of training describe augmented views of moving
    weights); its train features fit a linear head and form the kNN bank. Target: for each row a
    copy of the same weights with statistics from that row's corrupted evaluation images alone,
    without labels (the same images, with the same noise, that are then scored); the labels only
    score it. Drops are from the table's clean accuracy (the unadapted encoder's).
    """
    from lejepa_cli.image.adapt import adapted_copy

    n, knn_k, channels = shift["images"], shift["knn_k"], int(src.info["channels"])

    def adapted_source(dataset: ImageDataset, corruption: tuple[str, int] | None, max_images: int | None) -> FeatureSource:
        corrupt = make_corruption(*corruption) if corruption else None  # the same noise the features will see

        def transform(x: torch.Tensor) -> torch.Tensor:
            x = match_channels(x, channels)
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


def run_probe(source: str | Path | None, opts: ProbeOptions | None = None) -> dict[str, Any]:
    """Probe the encoder at `source` (checkpoint, run folder or export), or with `source` None a
    random-init encoder of `opts.preset`; returns the JSON report."""
    opts = opts or ProbeOptions()
    opts.check()
    if source is not None and opts.preset is not None:
        raise UserError("give a checkpoint to probe or --preset (an untrained encoder of that preset), not both")
    if source is None and opts.preset is None:
        raise UserError("give a checkpoint, run folder or export to probe, or --random-init --preset NAME for the "
                        "untrained baseline")
    if opts.plots is not None:
        from lejepa_cli.image.plots import PROBE_PLOTS
        from lejepa_cli.outputs import check_output_folder

        check_output_folder(opts.plots, "--plots", files=PROBE_PLOTS, overwrite=opts.overwrite)  # before the work
    t0 = time.perf_counter()
    device = dist.select_device(opts.device)
    encoder = _encoder_to_probe(source, opts, device)
    info = encoder.lejepa_info
    if opts.adapt:
        _check_adapt(encoder, source, opts)
    train, evaluation = probe_datasets(info, opts)
    n_train = len(train) if opts.max_train is None else min(len(train), opts.max_train)
    if n_train < MIN_TRAIN or len(evaluation) == 0:
        raise UserError(f"the probe needs at least {MIN_TRAIN} labelled train images and 1 evaluation image; "
                        f"'{opts.train_split}' gives {n_train}, '{opts.eval_split}' {len(evaluation)}")
    cache = usable_cache_dir(cache_root()) if opts.cache else None  # not writable: uncached, one warning
    src = FeatureSource(encoder, encoder_digest(encoder), device, opts.batch_size,
                        cache / "features" if cache else None, opts.progress)
    num_classes = _num_classes(train, evaluation)
    train_x, train_y = src.features(train, max_images=opts.max_train, label=f"{train.name} train")
    eval_x, eval_y = src.features(evaluation, max_images=opts.max_eval, label=f"{evaluation.name} eval")
    t_extract = time.perf_counter()

    linear, n_fit, n_val = _fit_linear(train_x, train_y, num_classes, opts, device)
    top1, top5 = head_accuracy(linear.head, eval_x, eval_y)
    knn = knn_top1(train_x, train_y, eval_x, eval_y, opts.knn_ks, num_classes)
    report: dict[str, Any] = {
        "checkpoint": str(source) if source is not None else f"preset {opts.preset}",
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
        calib = cache / "calibration" if cache and src.cache_dir is not None else None
        report["conditions"] = conditions_report(src, evaluation, source, opts, calib)
        report["conditions"]["reading"] = explain(report["conditions"], linear_top1=top1, num_classes=num_classes)
    report["timing"] = {"extract_s": t_extract - t0, "total_s": time.perf_counter() - t0,
                        "extractions": src.extractions}
    if opts.plots is not None:
        from lejepa_cli.image.plots import write_probe_plots

        report["plots"] = [str(p) for p in write_probe_plots(opts.plots, report, src, evaluation, source)]
        report["timing"]["total_s"] = time.perf_counter() - t0
    return report


def _num_classes(train: ImageDataset, evaluation: ImageDataset) -> int:
    return max(train.num_classes, evaluation.num_classes, int(train.labels.max()) + 1, int(evaluation.labels.max()) + 1)


def _fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, opts: ProbeOptions,
                device: torch.device):
    return fit_linear_probe(train_x, train_y, num_classes, val_fraction=opts.val_fraction, lrs=opts.lrs,
                            epochs=opts.epochs, seed=opts.seed, device=device)


def linear_top1(source: str | Path, device: torch.device) -> float:
    """The held-out linear top-1 of the encoder at `source`, as `lejepa probe SOURCE` reports it
    (its default options; no disk cache): the number `lejepa train` ends a small image run with."""
    opts = ProbeOptions(cache=False, progress=False, shift=False, conditions=False)
    encoder = load_probe_encoder(source, device=device)
    train, evaluation = probe_datasets(encoder.lejepa_info, opts)
    src = FeatureSource(encoder, encoder_digest(encoder), device, opts.batch_size)
    train_x, train_y = src.features(train, max_images=opts.max_train)
    eval_x, eval_y = src.features(evaluation, max_images=opts.max_eval)
    linear, _, _ = _fit_linear(train_x, train_y, _num_classes(train, evaluation), opts, device)
    return head_accuracy(linear.head, eval_x, eval_y)[0]


def _encoder_to_probe(source: str | Path | None, opts: ProbeOptions, device: torch.device) -> nn.Module:
    """The encoder at `source`, or with `source` None a random-init one of `opts.preset`."""
    if source is None:
        return preset_encoder(opts.preset, opts.data, device=device, seed=opts.seed)
    return load_probe_encoder(source, device=device, random_init=opts.random_init, seed=opts.seed)


def conditions_report(src: FeatureSource, evaluation: ImageDataset, source: str | Path | None, opts: ProbeOptions,
                      calib: Path | None) -> dict[str, Any]:
    """Is the embedding h of up to `opts.conditions_samples` evaluation images a near isotropic
    Gaussian (`conditions.diagnose`), and for a training checkpoint also the projector output z;
    `calib`: where null-distribution calibrations are cached (None: not cached)."""
    n = min(opts.conditions_samples, len(evaluation))
    embeddings, _ = src.features(evaluation, kind="embedding", max_images=n, label=f"{evaluation.name} embeddings")
    report = diagnose(embeddings, seed=opts.seed, cache_dir=calib)
    report["space"] = "embedding h (backbone output)"
    projector = None if opts.random_init else load_projector(source, src.device)
    if projector is not None:
        with torch.no_grad():
            z = projector(embeddings.to(src.device)).float().cpu()
        report["projector"] = {**diagnose(z, seed=opts.seed, cache_dir=calib),
                               "space": "projector output z (what SIGReg regularises)"}
    return report


def _check_adapt(encoder: nn.Module, source: str | Path, opts: ProbeOptions) -> None:
    """--adapt needs the shift table and an encoder with BatchNorm statistics to re-estimate."""
    from lejepa_cli.image.adapt import batchnorm_layers

    if not opts.shift:
        raise UserError("--adapt reports the shift table after adaptation: drop --no-shift")
    if not batchnorm_layers(encoder):
        raise UserError(f"--adapt re-estimates BatchNorm statistics, and {source} ({encoder.arch_config()['arch']}) "
                        f"has none (LayerNorm only); adapt it by fine-tuning with `lejepa adapt --steps N` and "
                        f"probe the export")
