"""Image pretraining, the objective `lejepa train` runs for an image preset (objective: image).

`build_image_run(cfg, device)` builds the data, the backbone + projector (+ online probe) and the
optimizers; the shared loop in train.py then calls, per optimizer step, `run.step(...)` (views ->
encoder -> projector -> LeJEPA loss parts -> backward) and, at evaluations, `run.evaluate()`
(held-out kNN and online-probe top-1). The world-model objective (world/objective.py) offers the
same few methods, so there is one training loop for both.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lejepa_cli import dist
from lejepa_cli.config import Config
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.data.sources import held_out_note, load_dataset
from lejepa_cli.errors import UserError
from lejepa_cli.image.evaluate import TRAIN_KNN_K, TRAIN_KNN_MAX_IMAGES, extract_features, knn_classify
from lejepa_cli.image.limits import MIN_TRAIN
from lejepa_cli.image.loss import lejepa_loss
from lejepa_cli.image.model import OnlineProbe, ViewEncoder, ViewProjector
from lejepa_cli.image.views import make_views
from lejepa_cli.logs import console
from lejepa_cli.models import build_backbone_from_config, build_projector_from_config
from lejepa_cli.optim import adamw, autocast_dtype, param_groups
from lejepa_cli.sigreg import sigreg


@dataclass
class ImageRun:
    """Everything a step needs, built once."""

    cfg: Config
    device: torch.device
    amp: torch.dtype | None
    train_data: ImageDataset
    val_data: ImageDataset | None
    backbone: nn.Module
    encoder: nn.Module  # ViewEncoder, possibly DDP- or compile-wrapped
    projector: nn.Module  # ViewProjector, possibly DDP-wrapped
    probe: nn.Module | None
    optimizer: torch.optim.Optimizer
    probe_optimizer: torch.optim.Optimizer | None
    modules: dict[str, nn.Module] = field(default_factory=dict)  # unwrapped, for state dicts

    kind = "image"

    @property
    def optimized(self) -> dict[str, nn.Module]:
        """The modules whose parameters `optimizer` updates (the probe has its own optimizer)."""
        return {k: self.modules[k] for k in ("backbone", "projector")}

    @property
    def side_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers of modules trained beside the encoder, by their checkpoint prefix."""
        return {} if self.probe_optimizer is None else {"probe_optim": self.probe_optimizer}

    def step(self, micro_inputs: list[torch.Tensor], micro_targets: list[torch.Tensor | None], step: int,
             seeds: list[int]) -> dict[str, torch.Tensor]:
        # micro_inputs: image batches (B, C, H, W) uint8; micro_targets: their class labels (B,), or None
        return lejepa_step(self, micro_inputs, micro_targets, step, seeds)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self)

    def final_scores(self, checkpoint: Path) -> dict[str, float]:
        """The held-out linear top-1 `lejepa probe` reports (README's headline number), when the run has
        labelled held-out data and a train split small enough (FINAL_PROBE_MAX_IMAGES) for it to take seconds."""
        if (not dist.is_main() or self.val_data is None or self.val_data.labels is None
                or self.train_data.labels is None or not MIN_TRAIN <= len(self.train_data) <= FINAL_PROBE_MAX_IMAGES):
            return {}
        from lejepa_cli.image.probe import linear_top1

        return {"linear_top1": linear_top1(checkpoint, self.device)}

    def data_meta(self) -> dict[str, Any]:
        d = self.train_data
        return {"name": d.name, "fingerprint": d.fingerprint, "mean": list(d.mean), "std": list(d.std),
                "channels": d.channels, "resolution": d.resolution, "num_classes": d.num_classes,
                "class_names": d.class_names}

    def describe(self) -> str:
        return f"{self.cfg.model.arch} on {self.train_data.name} ({len(self.train_data)} images)"


# The end-of-run linear probe (image/probe.py's, on probe features) re-reads the train split once: for
# the demo's 4096 + 1024 images about 7 CPU-seconds (2-core EPYC); above this many train images it is left
# to `lejepa probe`.
FINAL_PROBE_MAX_IMAGES = 60_000


def build_image_run(cfg: Config, device: torch.device, train_data: ImageDataset | None = None) -> ImageRun:
    train_data = load_dataset(cfg.data, cfg.data.train_split) if train_data is None else train_data
    try:
        val_data = load_dataset(cfg.data, cfg.data.eval_split)
    except UserError:
        val_data = None  # unlabelled or single-split data: no held-out evaluation
    if dist.is_main() and (note := held_out_note(cfg.data, train_data, val_data)):
        console.print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    backbone = build_backbone_from_config(cfg, train_data.channels).to(device)
    projector = build_projector_from_config(cfg, backbone.embed_dim).to(device)
    # channels-last convolutions: faster on CUDA and, via oneDNN, on the CPU too (benchmarks/bench_resnet_stem.py)
    channels_last = cfg.model.arch.startswith("resnet")
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    # In a process group: BatchNorm statistics over the global batch (projector; ResNet backbone),
    # then FSDP2 sharding if asked; both before the optimizer takes the parameters.
    backbone, projector = dist.global_batchnorm(backbone, device), dist.global_batchnorm(projector, device)
    sharded = cfg.train.fsdp and dist.is_distributed()
    if sharded:
        dist.shard(backbone, backbone.blocks, methods=("probe_features", "patch_tokens"))
        dist.shard(projector, ())
    view_encoder, view_projector = ViewEncoder(backbone, channels_last), ViewProjector(projector)
    probe = None
    if cfg.train.online_probe and train_data.labels is not None:
        probe = OnlineProbe(backbone.embed_dim, max(train_data.num_classes, 2)).to(device)
    optimizer = adamw(param_groups(backbone, cfg.optim.weight_decay) + param_groups(projector, cfg.optim.weight_decay),
                      cfg, device)
    probe_optimizer = None
    if probe is not None:
        probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.optim.probe_lr, weight_decay=1e-6,
                                            fused=device.type == "cuda")
    modules = {"backbone": backbone, "projector": projector}
    if probe is not None:
        modules["probe"] = probe
    # DDP replicates and all-reduces gradients; FSDP-sharded modules reduce their own.
    encoder: nn.Module = view_encoder if sharded else dist.ddp(view_encoder, device)
    view_projector = view_projector if sharded else dist.ddp(view_projector, device)
    if probe is not None:
        probe = dist.ddp(probe, device)
    if cfg.train.compile:
        encoder = torch.compile(encoder)
    return ImageRun(cfg, device, autocast_dtype(cfg, device), train_data, val_data, backbone, encoder,
               view_projector, probe, optimizer, probe_optimizer, modules)



# ---- one optimizer step ------------------------------------------------------------------------


def lejepa_step(run: ImageRun, micro_batches: list[torch.Tensor], labels: list[torch.Tensor | None], step: int,
                seeds: list[int]) -> dict[str, torch.Tensor]:
    """Forward, loss and backward of one optimizer step over its micro-batches.

    One micro-batch: the plain path. Several: the loss is still that of the whole batch, exactly:
    pass 1 embeds every micro-batch without a graph; the projector, SIGReg (whose statistic
    couples every sample) and BatchNorm then run once on all embeddings; pass 2 re-embeds each
    micro-batch with a graph (same seeds, so the same views and drop-path) and back-propagates
    the embedding gradient from the full-batch loss. The extra cost is one backbone forward.
    """
    cfg, amp = run.cfg, run.amp
    autocast = torch.autocast(run.device.type, dtype=amp) if amp else nullcontext()

    def views_of(m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        gen = torch.Generator(run.device).manual_seed(seeds[m])
        torch.manual_seed(seeds[m])  # drop-path draws
        return make_views(micro_batches[m], cfg.views, mean=run.train_data.mean, std=run.train_data.std, generator=gen)

    if len(micro_batches) == 1:
        with autocast:
            h = run.encoder(*views_of(0))  # (V, N, D)
            z = run.projector(h)  # (V, N, K)
        parts = lejepa_loss(z, num_global=cfg.views.global_views, lamb=cfg.loss.lamb, step=step,
                            num_slices=cfg.loss.num_slices, t_max=cfg.loss.t_max, num_knots=cfg.loss.num_knots)
        parts["loss"].backward()
    else:
        with torch.no_grad(), autocast:
            h = torch.cat([run.encoder(*views_of(m)) for m in range(len(micro_batches))], dim=1)
        h = h.detach().requires_grad_(True)
        with autocast:
            z = run.projector(h)
        parts = lejepa_loss(z, num_global=cfg.views.global_views, lamb=cfg.loss.lamb, step=step,
                            num_slices=cfg.loss.num_slices, t_max=cfg.loss.t_max, num_knots=cfg.loss.num_knots)
        parts["loss"].backward()
        sizes = [len(b) for b in micro_batches]
        for m, grad in enumerate(h.grad.split(sizes, dim=1)):
            defer = m < len(micro_batches) - 1  # gradients are reduced across ranks once, after the last
            with dist.no_grad_sync(run.encoder, defer), autocast:
                h_m = run.encoder(*views_of(m))
            with dist.no_grad_sync(run.encoder, defer):
                h_m.backward(grad.to(h_m.dtype))
    if run.probe is not None and labels[0] is not None:
        y = torch.cat(labels)  # (N,)
        global_h = h[: cfg.views.global_views].detach().float()  # (Vg, N, D)
        logits = run.probe(global_h.flatten(0, 1))
        probe_loss = F.cross_entropy(logits, y.repeat(cfg.views.global_views))
        probe_loss.backward()
        parts["probe_loss"] = probe_loss.detach()
        parts["probe_acc"] = (logits.argmax(1) == y.repeat(cfg.views.global_views)).float().mean()
    return {k: v.detach() for k, v in parts.items()}


# ---- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(run: ImageRun, max_train: int = TRAIN_KNN_MAX_IMAGES) -> dict[str, float]:
    """kNN (k=20) and online-probe top-1 on the held-out split, with the clean eval transform."""
    if run.val_data is None or run.val_data.labels is None or run.train_data.labels is None:
        return {}
    backbone = run.backbone
    was_training = backbone.training
    backbone.eval()
    kwargs = dict(size=run.cfg.views.global_size, device=run.device, mean=run.train_data.mean,
                  std=run.train_data.std, autocast_dtype=run.amp)
    train_f, train_y = extract_features(backbone, run.train_data, max_images=max_train, **kwargs)
    val_f, val_y = extract_features(backbone, run.val_data, **kwargs)
    backbone.train(was_training)
    num_classes = max(run.train_data.num_classes, run.val_data.num_classes)
    k = TRAIN_KNN_K
    out = {"knn_top1": knn_classify(train_f, train_y, val_f, val_y, ks=(k,), num_classes=num_classes)[min(k, len(train_f))]}
    probe = run.modules.get("probe")
    if probe is not None:
        probe.eval()
        logits = probe(val_f.to(run.device))
        probe.train()
        out["online_probe_top1"] = float((logits.argmax(1).cpu() == val_y).float().mean())
    return out
