"""Label-free model selection: rank the checkpoints of a run without labels.

    lejepa probe --label-free runs/demo            # table of checkpoints, best first
    from lejepa_cli.image.selection import rank_checkpoints
    result = rank_checkpoints(Path("runs/demo"))   # result["checkpoints"][0] is the best

Every checkpoint is scored on the same fixed, unlabelled batch: the same images, the same
augmented views (a seeded generator) and the same SIGReg directions, so the score is a
deterministic function of the weights. It is computed the way training computes the loss:
BatchNorm normalises with batch statistics (the backbone's over chunks of train.batch_size /
train.grad_accum images, the projector's over the whole batch); drop-path and dropout stay off.
The running averages of eval mode lag the weights after a short, fast schedule: on eight
Fashion-MNIST runs they gave a Spearman of 0.24 with linear accuracy, batch statistics 0.86
(docs/recipes.md). The score is the LeJEPA loss on that batch divided by lambda**0.4, the
statistic the paper found to track linear-probe accuracy (Spearman ~0.99 across runs; docs/method.md
section 6.3). Lower is better.

When the data has labels, each checkpoint is also linear-probed (on cached features) and the
Spearman rank correlation between -score and linear top-1 is reported: 1 means the label-free
ranking equals the accuracy ranking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.table import Table
from torch import nn

from lejepa_cli import dist
from lejepa_cli.checkpoint import list_checkpoints, read_metadata
from lejepa_cli.config import Config, config_from_dict
from lejepa_cli.errors import UserError
from lejepa_cli.probes import average_ranks
from lejepa_cli.image.model import ViewEncoder, ViewProjector
from lejepa_cli.image.objective import lejepa_loss
from lejepa_cli.sigreg import random_directions
from lejepa_cli.image.views import make_views


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation; None when it is undefined (fewer than 2 points or a constant side)."""
    ra, rb = average_ranks(np.asarray(a, np.float64)), average_ranks(np.asarray(b, np.float64))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def run_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder (or of a checkpoints/ folder), oldest first."""
    ckpts = list_checkpoints(run_dir / "checkpoints") or list_checkpoints(run_dir)
    if not ckpts:
        raise UserError(f"{run_dir} holds no checkpoints (expected {run_dir}/checkpoints/step-*.safetensors)")
    return ckpts


def rank_checkpoints(
    run_dir: Path, *, num_images: int = 256, num_slices: int = 1024, seed: int = 0, device: str = "auto",
    data: str | None = None, with_labels: bool = True, probe_epochs: int = 20, max_train: int | None = 10_000,
    progress: bool = False, chunk: int | None = None,
) -> dict[str, Any]:
    """Score and rank every checkpoint of `run_dir`; see the module docstring. JSON-serialisable.

    `chunk`: images per backbone pass (default: train.batch_size / train.grad_accum of the run).
    """
    from lejepa_cli.data.sources import load_dataset
    from lejepa_cli.image.probe import probe_data_config

    ckpts = run_checkpoints(run_dir)
    meta = read_metadata(ckpts[-1])
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"{ckpts[-1]} carries no training config; label-free ranking needs training checkpoints")
    cfg = config_from_dict(meta["config"])
    dev = dist.select_device(device)
    data_cfg = probe_data_config({"config": meta["config"]}, data)
    split = data_cfg.eval_split
    try:
        dataset = load_dataset(data_cfg, split)
    except UserError:
        split = data_cfg.train_split  # single-split data: any fixed batch works, labels are not needed
        dataset = load_dataset(data_cfg, split)
    index = np.linspace(0, len(dataset) - 1, min(num_images, len(dataset))).astype(np.int64)
    images = torch.from_numpy(np.ascontiguousarray(dataset.batch(index)[0])).permute(0, 3, 1, 2).to(dev)
    mean, std = (meta.get("data") or {}).get("mean") or dataset.mean, (meta.get("data") or {}).get("std") or dataset.std
    # The fixed batch: the same views and directions for every checkpoint.
    views = make_views(images, cfg.views, mean=mean, std=std, generator=torch.Generator(dev).manual_seed(seed))
    directions = random_directions(cfg.model.proj_dim, num_slices, step=seed, device=dev)

    chunk = chunk or max(1, cfg.train.batch_size // cfg.train.grad_accum)
    rows = [_score(path, views, directions, cfg, dev, seed, num_slices, chunk) for path in ckpts]
    rho = None
    if with_labels and dataset.labels is not None:
        rho = _linear_accuracies(rows, data, dev, probe_epochs, max_train, seed, progress)
    rows.sort(key=lambda r: r["score"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return {"run": str(run_dir), "images": len(index), "split": split, "views": int(cfg.views.global_views + cfg.views.local_views),
            "num_slices": num_slices, "seed": seed, "lambda": cfg.loss.lamb, "best": rows[0]["checkpoint"],
            "checkpoints": rows, "spearman": rho}


@torch.no_grad()
def _score(path: Path, views: tuple[torch.Tensor, torch.Tensor | None], directions: torch.Tensor, cfg: Config,
           dev: torch.device, seed: int, num_slices: int, chunk: int) -> dict[str, Any]:
    """The LeJEPA loss parts of one checkpoint on the fixed views, BatchNorm on batch statistics."""
    from lejepa_cli.image.probe import load_probe_encoder, load_projector

    backbone = load_probe_encoder(path, device=dev)
    projector = load_projector(path, dev)
    if projector is None:
        raise UserError(f"{path} holds no projector; label-free scores need training checkpoints")
    for module in [*backbone.modules(), *projector.modules()]:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()  # batch statistics, as in training; the models are discarded after scoring
    encoder = ViewEncoder(backbone)
    g, loc = views
    h = torch.cat([encoder(g[:, i : i + chunk], None if loc is None else loc[:, i : i + chunk])
                   for i in range(0, g.shape[1], chunk)], dim=1)  # (V, N, D)
    z = ViewProjector(projector)(h)  # (V, N, K); its BatchNorm pools all views, as in training
    parts = lejepa_loss(z.float(), num_global=cfg.views.global_views, lamb=cfg.loss.lamb, step=seed,
                        num_slices=num_slices, t_max=cfg.loss.t_max, num_knots=cfg.loss.num_knots,
                        directions=directions)
    return {"checkpoint": str(path), "step": backbone.lejepa_info.get("step"),
            "score": float(parts["loss_scaled"]), "loss": float(parts["loss"]),
            "pred": float(parts["pred"]), "sigreg": float(parts["sigreg"])}


def _linear_accuracies(rows: list[dict[str, Any]], data: str | None, device: torch.device, epochs: int,
                       max_train: int | None, seed: int, progress: bool) -> float | None:
    """Add linear_top1 to every row (a quick linear probe on cached features); Spearman(-score, top-1)."""
    from lejepa_cli.image.probe import FeatureSource, ProbeOptions, cache_root, encoder_digest, load_probe_encoder, probe_datasets
    from lejepa_cli.image.classifiers import fit_linear_probe, head_accuracy

    train = evaluation = None
    for r in rows:
        encoder = load_probe_encoder(r["checkpoint"], device=device)
        if train is None:  # one run, one config: load the splits once
            train, evaluation = probe_datasets(encoder.lejepa_info, ProbeOptions(data=data))
        src = FeatureSource(encoder, encoder_digest(encoder), device, cache_dir=cache_root() / "features", progress=progress)
        tx, ty = src.features(train, max_images=max_train, label=f"step {r['step']} train")
        ex, ey = src.features(evaluation, label=f"step {r['step']} eval")
        num_classes = int(max(ty.max(), ey.max())) + 1
        result = fit_linear_probe(tx, ty, num_classes, epochs=epochs, seed=seed, device=device)[0]
        r["linear_top1"] = head_accuracy(result.head, ex, ey)[0]
    return spearman([-r["score"] for r in rows], [r["linear_top1"] for r in rows])


def ranking_table(result: dict[str, Any]) -> Table:
    labelled = any("linear_top1" in r for r in result["checkpoints"])
    t = Table("rank", "step", "score (loss / lambda^0.4)", "pred", "sigreg", *(["linear top-1 %"] if labelled else []),
              title=f"label-free ranking of {result['run']} ({result['images']} {result['split']} images x "
                    f"{result['views']} views, {result['num_slices']} fixed directions)")
    for r in result["checkpoints"]:
        t.add_row(str(r["rank"]), str(r["step"]), f"{r['score']:.4f}", f"{r['pred']:.4f}", f"{r['sigreg']:.3f}",
                  *([f"{100 * r['linear_top1']:.1f}"] if labelled else []))
    if result["spearman"] is not None:
        t.caption = f"Spearman(-score, linear top-1) = {result['spearman']:.3f}"
    return t
