"""Label-free adaptation of a trained encoder to new images: `lejepa adapt`.

    lejepa adapt runs/fmnist --data camera.npz --out exports/fmnist-camera              # statistics only
    lejepa adapt exports/demo --data camera.npz --out exports/demo-camera --steps 100   # + LeJEPA fine-tuning

    from lejepa_cli.image.adapt import AdaptOptions, adapt_encoder
    result = adapt_encoder("runs/fmnist", "exports/fmnist-camera", AdaptOptions(data="camera.npz"))

Two levers, neither needs a label:
- normalisation statistics (AdaBN): every BatchNorm's running mean and variance are re-estimated
  from the target images (the evaluation transform, forward passes in train mode without
  gradients, momentum None: a cumulative average over all batches instead of the last few). The
  weights stay as they are. LayerNorm (the ViTs) normalises each image by its own statistics, so
  a ViT has nothing to re-estimate and needs fine-tuning.
- fine-tuning (`steps` > 0): AdamW steps of the training objective itself, the LeJEPA loss on
  views of the unlabelled target images (the run's own view and loss settings), encoder and
  projector together; the projector is the checkpoint's, or a fresh one for an export (exports
  hold no projector). The BatchNorm statistics are re-estimated afterwards.

The result is an ordinary export (`lejepa export`'s format); its config.json's "lejepa" section
records the adaptation ("adaptation": source, target data, images, method, steps, lr).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lejepa_cli import dist
from lejepa_cli.config import Config, DataConfig, config_from_dict
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.errors import RunFailed, UserError
from lejepa_cli.image.evaluate import extract_features
from lejepa_cli.export import Exported, export_backbone, load_encoder
from lejepa_cli.image.model import ViewEncoder, ViewProjector, load_projector
from lejepa_cli.models import build_projector_from_config
from lejepa_cli.image.limits import MAX_ADAPT_STEPS
from lejepa_cli.image.loss import lejepa_loss
from lejepa_cli.image.views import make_views


@dataclass
class AdaptOptions:
    data: str  # target images: builtin, an IDX folder, an .npz or a prepared folder (labels unused)
    split: str = "train"  # split of the target data to adapt on
    steps: int = 0  # LeJEPA fine-tuning steps before the statistics (0: statistics only)
    lr: float = 1e-4  # AdamW learning rate of the fine-tuning (constant, no weight decay)
    batch_size: int = 128  # images per fine-tuning step and per statistics batch
    max_images: int | None = None  # images (evenly spaced) the statistics are estimated from; None: all
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False


@dataclass
class Adapted:
    export: Exported
    summary: dict[str, Any]  # what was done, also stored as the export's "adaptation" record


# ---- normalisation statistics ---------------------------------------------------------------------


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def require_batchnorm(encoder: nn.Module, source: str | Path) -> None:
    """UserError when statistics-only adaptation cannot change `encoder` (no BatchNorm layers)."""
    if not batchnorm_layers(encoder):
        arch = encoder.arch_config().get("arch", "encoder")
        raise UserError(f"{source} is a {arch} without BatchNorm layers (its LayerNorms normalise each image by "
                        f"its own statistics), so statistics-only adaptation cannot change it; "
                        f"fine-tune it instead with --steps N (e.g. --steps 100)")


@torch.no_grad()
def reestimate_batchnorm(encoder: nn.Module, dataset: ImageDataset, *, device: torch.device, batch_size: int = 128,
                         max_images: int | None = None,
                         transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Replace every BatchNorm's running mean / var of `encoder` (in place) by those of `dataset`'s
    images under the evaluation transform (`transform` acts on the uint8 batch first, as in
    `extract_features`); returns the number of images seen. The encoder is left in eval mode."""
    layers = batchnorm_layers(encoder)
    info = encoder.lejepa_info
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n < 2:
        raise UserError(f"BatchNorm statistics need at least 2 images, got {n}")
    while batch_size > 2 and n % batch_size == 1:  # a batch of one image has no variance on a 1x1 map
        batch_size -= 1
    encoder.eval()  # dropout / drop-path off: only the BatchNorms run in train mode
    momenta = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over every batch
        bn.train()
    try:
        feats, _ = extract_features(encoder, dataset, size=int(info["image_size"]), device=device, mean=info["mean"],
                                    std=info["std"], batch_size=batch_size, max_images=max_images, transform=transform)
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        encoder.eval()
    return len(feats)


def adapted_copy(encoder: nn.Module, dataset: ImageDataset, *, device: torch.device, batch_size: int = 128,
                 max_images: int | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> nn.Module:
    """A copy of `encoder` with its BatchNorm statistics re-estimated on `dataset` (the original is untouched)."""
    model = copy.deepcopy(encoder)
    reestimate_batchnorm(model, dataset, device=device, batch_size=batch_size, max_images=max_images,
                         transform=transform)
    return model


# ---- LeJEPA fine-tuning ------------------------------------------------------------------------------


def training_config(info: dict[str, Any]) -> Config:
    """The config the encoder was trained with (views, loss, projector sizes), or defaults that fit it."""
    saved = info.get("config")
    if isinstance(saved, dict):
        return config_from_dict(saved)
    cfg = Config()
    cfg.views.global_size = int(info["image_size"])
    cfg.views.local_views = 0  # no local size is known to fit the encoder (a ViT's patch grid)
    return cfg


def finetune(backbone: nn.Module, projector: nn.Module, dataset: ImageDataset, cfg: Config, *, steps: int, lr: float,
             batch_size: int, device: torch.device, seed: int = 0,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """`steps` AdamW steps of the LeJEPA loss on views of `dataset` (labels unused); returns the losses."""
    info = backbone.lejepa_info
    params = [p for m in (backbone, projector) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    encode, project = ViewEncoder(backbone), ViewProjector(projector)
    rng = np.random.default_rng(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = min(batch_size, len(dataset))
    backbone.train()
    projector.train()
    losses = []
    for step in range(steps):
        images, _ = dataset.batch(np.sort(rng.choice(len(dataset), size=n, replace=False)))
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # (N, C, H, W) uint8
        global_views, local_views = make_views(x, cfg.views, mean=info["mean"], std=info["std"], generator=gen)
        z = project(encode(global_views, local_views))  # (V, N, K)
        parts = lejepa_loss(z, num_global=cfg.views.global_views, lamb=cfg.loss.lamb, step=step,
                            num_slices=cfg.loss.num_slices, t_max=cfg.loss.t_max, num_knots=cfg.loss.num_knots)
        loss = parts["loss"]
        if not torch.isfinite(loss.detach()):
            raise RunFailed(f"adaptation loss is {float(loss.detach())} at step {step}; try a smaller --lr (now {lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    backbone.eval()
    projector.eval()
    return losses


# ---- the command -----------------------------------------------------------------------------------


def load_target(data: str, split: str, channels: int) -> ImageDataset:
    """The target images, checked: some images, and the channel count the encoder takes."""
    from lejepa_cli.data.sources import load_dataset

    if split not in ("train", "val") and not (Path(data).expanduser() / "index.json").is_file():
        # builtin and IDX folders also answer to "test" with their held-out images: a name embed refuses too
        raise UserError(f"--data {data} has splits train, val, not '{split}'")
    try:
        dataset = load_dataset(DataConfig(source=data), split)
    except ZeroDivisionError:  # the data's mean / std over zero images
        dataset = None
    if dataset is None or len(dataset) == 0:
        raise UserError(f"--data {data} holds no images in split '{split}'; adaptation needs unlabelled images "
                        f"of the target domain")
    if len(dataset) < 2:
        raise UserError(f"--data {data} holds {len(dataset)} image in split '{split}'; adaptation needs at least 2")
    if dataset.channels != channels:
        raise UserError(f"--data {data} has {dataset.channels}-channel images, but this encoder takes {channels}; "
                        f"convert the images to {'grey' if channels == 1 else 'RGB'} first")
    return dataset


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that is a file or a non-empty folder (without --overwrite)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; choose another folder or pass --overwrite")


def adapt_encoder(source: str | Path, out: str | Path, opts: AdaptOptions,
                  log: Callable[[str], None] = lambda line: None) -> Adapted:
    """`lejepa adapt`: adapt the encoder at `source` (checkpoint, run folder or export) to
    `opts.data` without labels and write it to `out` as an export."""
    out = Path(out)
    if not 0 <= opts.steps <= MAX_ADAPT_STEPS:
        raise UserError(f"--steps {opts.steps} is not allowed: expected an integer in [0, {MAX_ADAPT_STEPS}] "
                        f"(0: statistics only)")
    if opts.batch_size < 2:
        raise UserError(f"--batch-size {opts.batch_size} is not allowed: expected an integer >= 2")
    if not 0 < opts.lr < float("inf"):
        raise UserError(f"--lr {opts.lr} is not allowed: expected a number > 0")
    if not 0 <= opts.seed < 2**63:
        raise UserError(f"--seed {opts.seed} is not allowed: expected an integer in [0, 2**63)")
    if opts.max_images is not None and opts.max_images < 1:
        raise UserError(f"--max-images {opts.max_images} is not allowed: expected an integer >= 1")
    check_out(out, opts.overwrite)
    device = dist.select_device(opts.device)
    t0 = time.perf_counter()
    encoder = load_encoder(source, device=device)
    info = encoder.lejepa_info
    has_bn = bool(batchnorm_layers(encoder))
    if opts.steps == 0:
        require_batchnorm(encoder, source)
    target = load_target(opts.data, opts.split, int(info["channels"]))
    summary: dict[str, Any] = {
        "source": str(source), "target": {"source": opts.data, "split": opts.split, "name": target.name,
                                          "fingerprint": target.fingerprint, "images": len(target)},
        "method": "+".join((["lejepa-finetune"] if opts.steps else []) + (["batchnorm-stats"] if has_bn else [])),
        "steps": opts.steps, "lr": opts.lr if opts.steps else None, "seed": opts.seed,
    }
    if opts.steps:
        cfg = training_config(info)
        projector = load_projector(source, device)
        summary["projector"] = "checkpoint" if projector is not None else "fresh"
        if projector is None:
            with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
                torch.manual_seed(opts.seed)
                projector = build_projector_from_config(cfg, int(encoder.embed_dim)).to(device)
            log(f"{source} holds no projector (an export): fine-tuning a fresh one "
                f"({cfg.model.proj_hidden} hidden, {cfg.model.proj_dim} out) with the encoder")
        every = max(1, opts.steps // 10)
        losses = finetune(encoder, projector, target, cfg, steps=opts.steps, lr=opts.lr, batch_size=opts.batch_size,
                          device=device, seed=opts.seed,
                          on_step=lambda s, v: log(f"step {s + 1}/{opts.steps}: loss {v:.4f}")
                          if (s + 1) % every == 0 or s == 0 else None)
        summary["loss_first"], summary["loss_last"] = losses[0], losses[-1]
    if has_bn:
        summary["stats_images"] = reestimate_batchnorm(encoder, target, device=device, batch_size=opts.batch_size,
                                                       max_images=opts.max_images)
        summary["batchnorm_layers"] = len(batchnorm_layers(encoder))
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    keep = ("step", "preset", "lambda", "views", "data", "config")
    meta = {k: info.get(k) for k in keep}
    meta["trained_with"] = info.get("trained_with") or info.get("version")
    meta["adaptation"] = summary  # "probe" stays None: metrics of the source encoder no longer apply
    exported = export_backbone(encoder, out, mean=info["mean"], std=info["std"], meta=meta, overwrite=opts.overwrite)
    return Adapted(exported, summary)
