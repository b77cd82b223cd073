"""Pretraining: `train(cfg, out)` builds the run, resumes if asked, runs the loop and saves.

    lejepa train --preset demo --out runs/demo          # CLI
    from lejepa_cli.train import train; train(cfg, Path("runs/demo"))   # Python

Every source of randomness in a step (which images, their views, drop-path) is seeded from
(seed, step, rank, micro-batch), and the learning rate is a pure function of the step, so a run
resumed from a checkpoint continues bit for bit.

The step order is fixed: lr from step -> views -> encoder forward -> projector + loss parts ->
backward -> optimizer step -> log -> (evaluate) -> (save).
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lejepa_cli import __version__, dist
from lejepa_cli.checkpoint import (
    checkpoint_name, find_resumable, list_checkpoints, load_checkpoint, optimizer_from_flat, optimizer_to_flat,
    prune, save_checkpoint, split_prefix,
)
from lejepa_cli.config import Config, apply_overrides
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.data.loader import BatchLoader, StepSampler
from lejepa_cli.data.sources import load_dataset
from lejepa_cli.errors import RunFailed, UserError
from lejepa_cli.evaluate import TRAIN_KNN_K, TRAIN_KNN_MAX_IMAGES, extract_features, knn_classify, knn_protocol
from lejepa_cli.lejepa import (
    OnlineProbe, ViewEncoder, ViewProjector, build_backbone_from_config, build_projector_from_config,
)
from lejepa_cli.logs import RunLogger, Throughput, console, trim_metrics
from lejepa_cli.loss import lejepa_loss
from lejepa_cli.preflight import preflight
from lejepa_cli.resume import check_run_folder, finished_summary, resume_point
from lejepa_cli.views import make_views


# ---- small pure pieces -------------------------------------------------------------------------


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at the last step."""
    total, peak = cfg.train.steps, cfg.optim.lr
    warmup = cfg.optim.warmup_steps or max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    floor = peak * cfg.optim.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


def select_device(name: str) -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"train.device = {name} but CUDA is not available here; use train.device=cpu or auto")
        if name == "mps" and not torch.backends.mps.is_available():
            raise UserError("train.device = mps but MPS is not available here; use train.device=cpu or auto")
        if name == "cuda":
            return torch.device("cuda", dist.local_rank())  # one GPU per torchrun process
        try:
            return torch.device(name)
        except RuntimeError:  # --device of probe / embed / viz is free text
            raise UserError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; on the CPU only when asked (train.precision=bf16)."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and the CLS token."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config | None:
    """The config stored in a run's newest good checkpoint, with `overrides` on top; None if no checkpoint."""
    point = resume_point(run_dir)
    return None if point is None else apply_overrides(point[1], overrides)


# ---- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
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


def build_run(cfg: Config, device: torch.device, train_data: ImageDataset | None = None) -> Run:
    train_data = load_dataset(cfg.data, cfg.data.train_split) if train_data is None else train_data
    try:
        val_data = load_dataset(cfg.data, cfg.data.eval_split)
    except UserError:
        val_data = None  # unlabelled or single-split data: no held-out evaluation
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
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(backbone, cfg.optim.weight_decay) + param_groups(projector, cfg.optim.weight_decay),
        lr=cfg.optim.lr, betas=cfg.optim.betas, fused=fused,
    )
    probe_optimizer = None
    if probe is not None:
        probe_optimizer = torch.optim.AdamW(probe.parameters(), lr=cfg.optim.probe_lr, weight_decay=1e-6, fused=fused)
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
    return Run(cfg, device, autocast_dtype(cfg, device), train_data, val_data, backbone, encoder,
               view_projector, probe, optimizer, probe_optimizer, modules)


def run_state(run: Run, step: int, sampler: StepSampler) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole training state as named tensors + JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    # Whole tensors even under FSDP (gathered to rank 0), so any world size can resume.
    for prefix, module in run.modules.items():
        tensors.update({f"model.{prefix}.{k}": v for k, v in dist.full_state_dict(module).items()})
    opt_state = dist.full_optimizer_state_dict(run.optimizer, _optimized(run))
    # optimizer_to_flat reads .state_dict() from what it is given: hand it the gathered state.
    opt_tensors, opt_meta = optimizer_to_flat(SimpleNamespace(state_dict=lambda: opt_state))
    tensors.update(opt_tensors)
    meta: dict[str, Any] = {"optim": opt_meta}
    if run.probe_optimizer is not None:
        probe_tensors, meta["probe_optim"] = optimizer_to_flat(run.probe_optimizer)
        tensors.update({"probe_" + k: v for k, v in probe_tensors.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    data = run.train_data
    meta.update({
        "step": step,
        "config": run.cfg.to_dict(),
        "data_position": {"step": step, **sampler.position(step), "steps_per_epoch": sampler.steps_per_epoch},
        "data": {"name": data.name, "fingerprint": data.fingerprint, "mean": list(data.mean), "std": list(data.std),
                 "channels": data.channels, "resolution": data.resolution, "num_classes": data.num_classes,
                 "class_names": data.class_names},
        "backbone": run.backbone.arch_config(),
        "world_size": dist.world_size(),
        "version": __version__,
    })
    return tensors, meta


def _optimized(run: Run) -> dict[str, nn.Module]:
    """The modules whose parameters `run.optimizer` updates."""
    return {k: run.modules[k] for k in ("backbone", "projector")}


def restore_state(run: Run, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    for prefix, module in run.modules.items():
        state = split_prefix(tensors, f"model.{prefix}")
        try:
            dist.load_full_state_dict(module, state)
        except RuntimeError as e:
            raise UserError(f"checkpoint does not fit this model ({prefix}): {' '.join(str(e).split())[:300]}") from None
    opt_state = optimizer_from_flat(split_prefix(tensors, "optim"), meta["optim"])
    dist.load_full_optimizer_state_dict(run.optimizer, opt_state, _optimized(run))
    if run.probe_optimizer is not None and "probe_optim" in meta:
        probe_state = optimizer_from_flat(split_prefix(tensors, "probe_optim"), meta["probe_optim"])
        run.probe_optimizer.load_state_dict(probe_state)
    torch.set_rng_state(tensors["rng.cpu"])
    return int(meta["step"])


# ---- one optimizer step ------------------------------------------------------------------------


def lejepa_step(run: Run, micro_batches: list[torch.Tensor], labels: list[torch.Tensor | None], step: int,
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
def evaluate(run: Run, max_train: int = TRAIN_KNN_MAX_IMAGES) -> dict[str, float]:
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


def _before_training(metrics: Path) -> dict[str, float]:
    """The step-0 evaluation (the encoder before any update) from metrics.jsonl, keys suffixed; {} if none."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        record = json.loads(line)
        if record.get("step") == 0 and "knn_top1" in record:
            return {f"{k}_before_training": v for k, v in record.items() if k.endswith("_top1")}
    return {}


# ---- the loop ------------------------------------------------------------------------------------


class _StopSignal:
    """SIGTERM / SIGINT ask the loop to save and stop at the end of the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


def check_run_dir(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse to reuse a run folder by accident; True when its old contents must be cleared."""
    check_run_folder(out)
    existing = out.exists() and any(out.iterdir())
    if existing and not resume and not overwrite:
        raise UserError(f"run folder {out} already exists: pass --resume auto to continue it or --overwrite to start over")
    return existing and not resume


def clear_run_dir(out: Path) -> None:
    """--overwrite: remove what a previous run wrote (only that), once the new run is known to start."""
    if dist.is_main():
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for name in ("metrics.jsonl", "config.yaml", "summary.json"):
            (out / name).unlink(missing_ok=True)
    dist.barrier()


def train(cfg: Config, out: Path, *, resume: str | None = None, overwrite: bool = False,
          progress: bool = True, init_from: Path | None = None) -> dict[str, Any]:
    """Pretrain per `cfg` into run folder `out`; returns the final summary.

    resume: None (new run), "auto" (newest good checkpoint in `out`, or a new run if none),
    or the path of a checkpoint file.
    """
    if resume is not None and (done := finished_summary(out, cfg, resume)) is not None:
        return done  # nothing left to train: the run's files stay as they are
    device = select_device(cfg.train.device)
    owns_group = dist.setup(device)  # torchrun: join the process group (and leave it at the end)
    world, rank = dist.world_size(), dist.rank()
    per_rank, rem = divmod(cfg.train.batch_size, world * cfg.train.grad_accum)
    if rem or per_rank < 1:
        raise UserError(f"train.batch_size = {cfg.train.batch_size} must be divisible by world size x "
                        f"train.grad_accum = {world} x {cfg.train.grad_accum}")
    must_clear = check_run_dir(out, resume=resume is not None, overwrite=overwrite)
    dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    train_data = load_dataset(cfg.data, cfg.data.train_split)
    preflight(cfg, device, train_data, autocast_dtype(cfg, device))  # before anything heavy is built or written
    run = build_run(cfg, device, train_data)
    sampler = StepSampler(len(run.train_data), cfg.train.batch_size, cfg.train.seed)
    ckpt_dir = out / "checkpoints"

    start = 0
    found = None
    if resume == "auto":
        found = find_resumable(ckpt_dir, warn=lambda m: dist.is_main() and console.print(f"[yellow]{m}"))
    elif resume is not None:
        path = Path(resume)
        found = (path, *load_checkpoint(path))
    if found is not None:
        start = restore_state(run, found[1], found[2])
        if dist.is_main():
            console.print(f"resuming from {found[0]} at step {start}")
    elif init_from is not None:
        from lejepa_cli.export import load_backbone_weights

        load_backbone_weights(run.backbone, init_from)
    if must_clear:
        clear_run_dir(out)  # only now: a bad --init-from or data error must not cost the old run
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(cfg.to_yaml())
        # Lines up to `start` were logged before its checkpoint; with no checkpoint (start 0) none
        # survive, not even a step-0 evaluation, which is logged again below.
        trim_metrics(out / "metrics.jsonl", start if start > 0 else -1)
    logger = RunLogger(out, cfg.log, enabled=dist.is_main(), total_steps=cfg.train.steps, start_step=start,
                       show_progress=progress, run_config=cfg.to_dict())
    logger.print(f"{cfg.preset or 'custom'}: {cfg.model.arch} on {run.train_data.name} ({len(run.train_data)} images), "
                 f"device {device}{' bf16' if run.amp else ''}, global batch {cfg.train.batch_size} = "
                 f"{world} process(es) x {cfg.train.grad_accum} micro-batch(es) x {per_rank}"
                 f"{' (FSDP)' if dist.is_sharded(run.backbone) else ''}")

    if cfg.train.eval_every and start == 0:  # where the curve starts: the encoder before any update
        logger.log({"step": 0, "train_s": 0.0, **evaluate(run)})
    loader = BatchLoader(run.train_data, sampler, device, rank=rank, world=world, num_micro=cfg.train.grad_accum)
    meter = Throughput()
    started = time.perf_counter()  # evaluations carry the training seconds so far (this process)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first non-finite step, found without a sync
    last_saved = start if found is not None else -1
    last_good_step = start
    micro_x: list[torch.Tensor] = []
    micro_y: list[torch.Tensor | None] = []

    def save(step: int) -> None:
        nonlocal last_saved
        tensors, meta = run_state(run, step, sampler)
        if dist.is_main():
            save_checkpoint(ckpt_dir / checkpoint_name(step), tensors, meta)
            prune(ckpt_dir, cfg.train.keep_last)
        dist.barrier()
        last_saved = step

    def check_finite(step: int) -> None:
        bad = int(first_bad)
        if bad >= 0:
            kept = f"the last good checkpoint is {ckpt_dir / checkpoint_name(last_saved)}" if last_saved >= 0 else "no checkpoint was written"
            raise RunFailed(f"non-finite loss at step {bad}; stopping ({kept}); try a lower optim.lr or train.on_nonfinite=skip")

    try:
        with _StopSignal() as stop:
            for step, micro, batch in loader.iterate(start, cfg.train.steps):
                micro_x.append(batch.images)
                micro_y.append(batch.labels)
                meter.add(len(batch.images) * world, batch.wait_s)
                if micro < cfg.train.grad_accum - 1:
                    continue
                lr = lr_at(step, cfg)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                seeds = [step_seed(cfg.train.seed, step, rank, m) for m in range(cfg.train.grad_accum)]
                # skip mode: a skipped step must not leave its NaNs in BatchNorm statistics either
                buffers = [b for m in run.modules.values() for b in m.buffers()] if cfg.train.on_nonfinite == "skip" else []
                saved = [b.clone() for b in buffers]
                parts = lejepa_step(run, micro_x, micro_y, step, seeds)
                micro_x, micro_y = [], []
                # The mean over ranks, so every rank takes the same stop/skip decision.
                finite = torch.isfinite(dist.all_reduce_mean(parts["loss"]))
                if cfg.train.on_nonfinite == "skip" and not bool(finite):
                    logger.print(f"[yellow]step {step}: non-finite loss, update skipped")
                    run.optimizer.zero_grad(set_to_none=True)
                    for buffer, old in zip(buffers, saved):
                        buffer.copy_(old)
                    if run.probe_optimizer is not None:  # the probe saw the same non-finite features
                        run.probe_optimizer.zero_grad(set_to_none=True)
                else:
                    first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
                    run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                if run.probe_optimizer is not None:
                    run.probe_optimizer.step()
                    run.probe_optimizer.zero_grad(set_to_none=True)

                done = step + 1
                is_last = done == cfg.train.steps
                if done % cfg.log.every == 0 or is_last:
                    check_finite(step)  # values are read from the device only here
                    img_s, wait = meter.read()
                    meter.reset()
                    record = {"step": done, **{k: float(dist.all_reduce_mean(v.float())) for k, v in parts.items()},
                              "lr": lr, "images_per_s": img_s, "data_wait": wait}
                    logger.log(record)
                    logger.advance(done, f"loss {record['loss']:.4f} pred {record['pred']:.4f} "
                                         f"sigreg {record['sigreg']:.3f} lr {lr:.2e} {img_s:.0f} img/s")
                else:
                    logger.advance(done)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and not is_last:
                    logger.log({"step": done, "train_s": round(time.perf_counter() - started, 1), **evaluate(run)})
                # A signal may reach the ranks in different steps: all of them stop after the same one.
                stopping = dist.any_rank(stop.signum is not None)
                if done % cfg.train.save_every == 0 or is_last or stopping:
                    check_finite(step)
                    save(done)
                last_good_step = done
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal to another rank"
                    raise RunFailed(f"stopped by {name} after step {done}; checkpoint saved, continue with --resume auto")
    finally:
        loader.close()
        logger.close()

    train_s = round(time.perf_counter() - started, 1)
    scores = evaluate(run)
    summary = {"step": last_good_step, "train_s": train_s, "checkpoint": str(ckpt_dir / checkpoint_name(last_saved)), **scores,
               **_before_training(out / "metrics.jsonl")}
    if "knn_top1" in scores:
        summary["knn_protocol"] = knn_protocol(run.backbone, len(run.train_data))
    if dist.is_main():
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": last_good_step, "train_s": train_s, **scores}) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if owns_group:
        dist.barrier()  # no rank tears gloo / NCCL down while another still uses it
        dist.teardown()
    return summary
