"""Pretraining: `train(cfg, out)` builds the run, resumes if asked, runs the loop and saves.

    lejepa train --preset demo --out runs/demo          # CLI
    from lejepa_cli.train import train; train(cfg, Path("runs/demo"))   # Python

Every source of randomness in a step (which images, their views, drop-path) is seeded from
(seed, step, rank, micro-batch), and the learning rate is a pure function of the step, so a run
resumed from a checkpoint continues bit for bit.

The step order is fixed: lr from step -> the objective's step (image: views -> encoder forward ->
projector + loss parts -> backward; world: encode frames -> predict -> loss parts -> backward) ->
optimizer step -> log -> (evaluate) -> (save). Both objectives run this one loop; what differs
lives in image/objective.py and world/objective.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from lejepa_cli import dist, threads
from lejepa_cli._version import __version__
from lejepa_cli.checkpoint import (
    checkpoint_name, find_resumable, load_checkpoint, optimizer_from_flat, optimizer_to_flat, prune,
    save_checkpoint, split_prefix,
)
from lejepa_cli.config import Config, apply_overrides
from lejepa_cli.data.loader import BatchLoader, StepSampler
from lejepa_cli.errors import RunFailed, UserError, out_of_memory
from lejepa_cli.logs import RunLogger, Throughput, console, trim_metrics
from lejepa_cli.outputs import atomic_output
from lejepa_cli.optim import autocast_dtype, lr_at, param_groups  # noqa: F401  (re-exported: the loop's pieces)
from lejepa_cli.preflight import memory_advice, preflight
from lejepa_cli.resume import check_run_folder, finished_summary, resume_point


# ---- small pure pieces -------------------------------------------------------------------------


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


def resume_config(run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> Config | None:
    """The config stored in a run's newest good checkpoint, with `overrides` on top; None if no checkpoint."""
    point = resume_point(run_dir)
    return None if point is None else apply_overrides(point[1], overrides)


# ---- the run -------------------------------------------------------------------------------------


class Run(Protocol):
    """What the loop needs of an objective's run (image.objective.ImageRun, world.objective.WorldRun)."""

    kind: str
    cfg: Config
    device: torch.device
    train_data: Any  # len() = samples the sampler draws from; .batch(index) -> (inputs, targets) arrays
    modules: dict[str, nn.Module]  # unwrapped, saved in checkpoints as model.<name>.*
    optimizer: torch.optim.Optimizer  # updates `optimized`
    optimized: dict[str, nn.Module]
    side_optimizers: dict[str, torch.optim.Optimizer]  # e.g. the online probe's, by checkpoint prefix

    def step(self, micro_inputs: list[torch.Tensor], micro_targets: list[torch.Tensor | None], step: int,
             seeds: list[int]) -> dict[str, torch.Tensor]: ...

    def evaluate(self) -> dict[str, float]: ...

    def final_scores(self, checkpoint: Path) -> dict[str, float]: ...  # once, from the final checkpoint

    def data_meta(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


def build_run(cfg: Config, device: torch.device, train_data: Any = None) -> Run:
    """The run of the config's objective: image pretraining or a world model (`train_data`: an
    image objective's already loaded train split)."""
    if cfg.objective == "world":
        from lejepa_cli.world.objective import build_world_run

        return build_world_run(cfg, device)
    from lejepa_cli.image.objective import build_image_run

    return build_image_run(cfg, device, train_data)


def run_state(run: Run, step: int, sampler: StepSampler) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The whole training state as named tensors + JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    # Whole tensors even under FSDP (gathered to rank 0), so any world size can resume.
    for prefix, module in run.modules.items():
        tensors.update({f"model.{prefix}.{k}": v for k, v in dist.full_state_dict(module).items()})
    opt_state = dist.full_optimizer_state_dict(run.optimizer, run.optimized)
    # optimizer_to_flat reads .state_dict() from what it is given: hand it the gathered state.
    opt_tensors, opt_meta = optimizer_to_flat(SimpleNamespace(state_dict=lambda: opt_state))
    tensors.update(opt_tensors)
    meta: dict[str, Any] = {"optim": opt_meta}
    for name, optimizer in run.side_optimizers.items():  # "optim.<i>.<key>" -> "<name>.<i>.<key>"
        side_tensors, meta[name] = optimizer_to_flat(optimizer)
        tensors.update({f"{name}.{k.partition('.')[2]}": v for k, v in side_tensors.items()})
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta.update({
        "step": step,
        "config": run.cfg.to_dict(),
        "data_position": {"step": step, **sampler.position(step), "steps_per_epoch": sampler.steps_per_epoch},
        "data": run.data_meta(),
        "backbone": run.modules["backbone"].arch_config(),
        "world_size": dist.world_size(),
        "version": __version__,
    })
    return tensors, meta


def restore_state(run: Run, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    for prefix, module in run.modules.items():
        state = split_prefix(tensors, f"model.{prefix}")
        try:
            dist.load_full_state_dict(module, state)
        except RuntimeError as e:
            raise UserError(f"checkpoint does not fit this model ({prefix}): {' '.join(str(e).split())[:300]}") from None
    opt_state = optimizer_from_flat(split_prefix(tensors, "optim"), meta["optim"])
    dist.load_full_optimizer_state_dict(run.optimizer, opt_state, run.optimized)
    for name, optimizer in run.side_optimizers.items():
        if name in meta:
            optimizer.load_state_dict(optimizer_from_flat(split_prefix(tensors, name), meta[name]))
    torch.set_rng_state(tensors["rng.cpu"])
    return int(meta["step"])


# ---- the loop ------------------------------------------------------------------------------------


def _before_training(metrics: Path) -> dict[str, float]:
    """The step-0 evaluation (the encoder before any update) from metrics.jsonl, keys suffixed; {} if none."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        record = json.loads(line)
        if record.get("step") == 0 and len(record) > 2:  # more than step and train_s: an evaluation
            return {f"{k}_before_training": v for k, v in record.items() if k not in ("step", "train_s")}
    return {}


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


def _per_rank_batch(cfg: Config, world: int) -> int:
    """Samples per rank per micro-batch: the global batch must split evenly over ranks x micro-batches."""
    per_rank, rem = divmod(cfg.train.batch_size, world * cfg.train.grad_accum)
    if rem or per_rank < 1:
        raise UserError(f"train.batch_size = {cfg.train.batch_size} must be divisible by world size x "
                        f"train.grad_accum = {world} x {cfg.train.grad_accum}")
    return per_rank


def _checked_train_data(cfg: Config, device: torch.device) -> Any:
    """An image run's train split, loaded once and checked against memory before anything heavy is
    built or written (the check estimates image pretraining's step); None for a world model."""
    if cfg.objective != "image":
        return None
    from lejepa_cli.data.sources import load_dataset

    train_data = load_dataset(cfg.data, cfg.data.train_split)
    preflight(cfg, device, train_data, autocast_dtype(cfg, device))
    return train_data


def _resume_or_init(run: Run, ckpt_dir: Path, resume: str | None, init_from: Path | None) -> int | None:
    """Restore the checkpoint `resume` points at (see train()) and return its step; with none, load
    --init-from backbone weights when given and return None."""
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
        return start
    if init_from is not None and not _continue_from(run, init_from):
        from lejepa_cli.export import load_backbone_weights

        load_backbone_weights(run.modules["backbone"], init_from)
    return None


def _continue_from(run: Run, source: Path) -> bool:
    """Load every module of `run` (weights only: a fresh optimizer, step 0) when `source` is a
    checkpoint or run folder of the same objective with the same modules, i.e. a world model
    continued on new data (`lejepa adapt` of a world run). False otherwise: an image checkpoint or
    export for a world run's encoder, or any source of an image run, initialises the backbone only."""
    if run.kind != "world" or not (source.is_file() or (source / "checkpoints").is_dir()):
        return False
    try:
        found = (source, *load_checkpoint(source)) if source.is_file() else find_resumable(source / "checkpoints")
    except UserError:
        return False  # not a training checkpoint (e.g. an export's weights): the backbone route says what is wrong
    if found is None:
        return False
    path, tensors, meta = found
    if meta.get("config", {}).get("objective") != run.cfg.objective:
        return False
    for prefix, module in run.modules.items():
        try:
            dist.load_full_state_dict(module, split_prefix(tensors, f"model.{prefix}"))
        except RuntimeError as e:
            raise UserError(f"{path} does not fit this model ({prefix}): {' '.join(str(e).split())[:300]}") from None
    if dist.is_main():
        console.print(f"continuing the model of {path} (step {meta.get('step')}) from step 0 on {run.train_data.name}")
    return True


def _open_run_folder(cfg: Config, out: Path, start: int, progress: bool) -> RunLogger:
    """Write the resolved config, drop metrics logged after `start`, and open the run's logger."""
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        with atomic_output(out / "config.yaml") as tmp:  # never a half-written config beside the checkpoints
            tmp.write_text(cfg.to_yaml())
        # Lines up to `start` were logged before its checkpoint; with no checkpoint (start 0) none
        # survive, not even a step-0 evaluation, which is logged again.
        trim_metrics(out / "metrics.jsonl", start if start > 0 else -1)
    return RunLogger(out, cfg.log, enabled=dist.is_main(), total_steps=cfg.train.steps, start_step=start,
                     show_progress=progress, run_config=cfg.to_dict())


def _describe(cfg: Config, run: Run, device: torch.device, world: int, per_rank: int) -> str:
    """The run's first line: what trains where, and how the global batch splits."""
    return (f"{cfg.preset or 'custom'}: {run.describe()}, "
            f"device {device}{' bf16' if autocast_dtype(cfg, device) else ''}, global batch {cfg.train.batch_size} = "
            f"{world} process(es) x {cfg.train.grad_accum} micro-batch(es) x {per_rank}, "
            f"{torch.get_num_threads()} CPU thread(s) ({threads.choice()})"
            f"{' (FSDP)' if dist.is_sharded(run.modules['backbone']) else ''}")


class _Loop:
    """What the loop carries from step to step (throughput, non-finite watch, last checkpoint) and
    the steps' verbs that use it: update, log, evaluate, save, finish."""

    def __init__(self, run: Run, sampler: StepSampler, logger: RunLogger, ckpt_dir: Path, start: int,
                 resumed: bool):
        self.run, self.cfg, self.sampler, self.logger, self.ckpt_dir = run, run.cfg, sampler, logger, ckpt_dir
        self.meter = Throughput("frames" if run.kind == "world" else "images")
        self.started = time.perf_counter()  # evaluations carry the training seconds so far (this process)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=run.device)  # first non-finite step, found without a sync
        self.last_saved = start if resumed else -1
        self.last_good_step = start

    def snapshot_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """skip mode: a skipped step must not leave its NaNs in BatchNorm statistics either."""
        buffers = [b for m in self.run.modules.values() for b in m.buffers()] if self.cfg.train.on_nonfinite == "skip" else []
        return [(b, b.clone()) for b in buffers]

    def update(self, step: int, loss: torch.Tensor, snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The optimizer step on the gradients run.step left, or (skip mode) none for a non-finite loss."""
        run, cfg = self.run, self.cfg
        # The mean over ranks, so every rank takes the same stop/skip decision.
        finite = torch.isfinite(dist.all_reduce_mean(loss))
        if cfg.train.on_nonfinite == "skip" and not bool(finite):
            self.logger.print(f"[yellow]step {step}: non-finite loss, update skipped")
            run.optimizer.zero_grad(set_to_none=True)
            for buffer, old in snapshot:
                buffer.copy_(old)
            for side in run.side_optimizers.values():  # e.g. the probe saw the same non-finite features
                side.zero_grad(set_to_none=True)
        else:
            self.first_bad = torch.where(~finite & (self.first_bad < 0), step, self.first_bad)
            if cfg.optim.grad_clip > 0:
                params = [p for m in run.optimized.values() for p in m.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        for side in run.side_optimizers.values():
            side.step()
            side.zero_grad(set_to_none=True)

    def check_finite(self, step: int) -> None:
        """Stop the run if a loss so far was non-finite (reads the device: call it only when logging or saving)."""
        bad = int(self.first_bad)
        if bad >= 0:
            kept = (f"the last good checkpoint is {self.ckpt_dir / checkpoint_name(self.last_saved)}"
                    if self.last_saved >= 0 else "no checkpoint was written")
            raise RunFailed(f"non-finite loss at step {bad}; stopping ({kept}); try a lower optim.lr or train.on_nonfinite=skip")

    def log(self, step: int, parts: dict[str, torch.Tensor], lr: float) -> None:
        """Every log.every steps and at the last: the loss parts (mean over ranks), lr and throughput."""
        cfg, done = self.cfg, step + 1
        if done % cfg.log.every == 0 or done == cfg.train.steps:
            self.check_finite(step)  # values are read from the device only here
            rate, wait = self.meter.read()
            self.meter.reset()
            record = {"step": done, **{k: float(dist.all_reduce_mean(v.float())) for k, v in parts.items()},
                      "lr": lr, self.meter.key: rate, "data_wait": wait}
            self.logger.log(record)
            self.logger.advance(done, f"loss {record['loss']:.4f} pred {record['pred']:.4f} "
                                      f"sigreg {record['sigreg']:.3f} lr {lr:.2e} {rate:.0f} {self.meter.short}")
        else:
            self.logger.advance(done)

    def evaluate(self, done: int) -> None:
        self.logger.log({"step": done, "train_s": round(time.perf_counter() - self.started, 1), **self.run.evaluate()})

    def save(self, step: int) -> None:
        tensors, meta = run_state(self.run, step, self.sampler)
        if dist.is_main():
            save_checkpoint(self.ckpt_dir / checkpoint_name(step), tensors, meta)
            prune(self.ckpt_dir, self.cfg.train.keep_last)
        dist.barrier()
        self.last_saved = step

    def finish(self, out: Path) -> dict[str, Any]:
        """The final evaluation, appended to metrics.jsonl and written with the run's facts to summary.json."""
        run = self.run
        train_s = round(time.perf_counter() - self.started, 1)
        checkpoint = self.ckpt_dir / checkpoint_name(self.last_saved)
        if not checkpoint.is_file():  # resumed from a checkpoint elsewhere with no step left: the run folder gets its own
            self.save(self.last_good_step)
            checkpoint = self.ckpt_dir / checkpoint_name(self.last_saved)
        if not checkpoint.is_file():  # resumed from a checkpoint elsewhere with no step left: the run folder gets its own
            self.save(self.last_good_step)
            checkpoint = self.ckpt_dir / checkpoint_name(self.last_saved)
        scores = {**run.final_scores(checkpoint), **run.evaluate()}
        summary = {"step": self.last_good_step, "train_s": train_s,
                   "checkpoint": str(checkpoint), **scores,
                   **_before_training(out / "metrics.jsonl")}
        if "knn_top1" in scores:
            from lejepa_cli.image.evaluate import knn_protocol

            summary["knn_protocol"] = knn_protocol(run.modules["backbone"], len(run.train_data))
        if dist.is_main():
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.last_good_step, "train_s": train_s, **scores}) + "\n")
            with atomic_output(out / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
        return summary


def train(cfg: Config, out: Path, *, resume: str | None = None, overwrite: bool = False,
          progress: bool = True, init_from: Path | None = None, note: str | None = None) -> dict[str, Any]:
    """Pretrain per `cfg` into run folder `out`; returns the final summary.

    resume: None (new run), "auto" (newest good checkpoint in `out`, or a new run if none),
    or the path of a checkpoint file. `note` ends the run's first line (the CLI's "no --preset
    given"). Running out of memory is a RunFailed naming what to change.
    """
    try:
        return _train(cfg, out, resume=resume, overwrite=overwrite, progress=progress, init_from=init_from, note=note)
    except Exception as e:
        if (what := out_of_memory(e)) is None:
            raise
        raise RunFailed(f"out of memory during training ({what}): {memory_advice(cfg)}") from e


def _train(cfg: Config, out: Path, *, resume: str | None, overwrite: bool, progress: bool,
           init_from: Path | None, note: str | None) -> dict[str, Any]:
    if resume is not None and (done := finished_summary(out, cfg, resume)) is not None:
        return done  # nothing left to train: the run's files stay as they are
    device = dist.select_device(cfg.train.device, "train.device")
    owns_group = dist.setup(device)  # torchrun: join the process group (and leave it at the end)
    world, rank = dist.world_size(), dist.rank()
    per_rank = _per_rank_batch(cfg, world)
    must_clear = check_run_dir(out, resume=resume is not None, overwrite=overwrite)
    dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    run = build_run(cfg, device, _checked_train_data(cfg, device))
    sampler = StepSampler(len(run.train_data), cfg.train.batch_size, cfg.train.seed)
    ckpt_dir = out / "checkpoints"
    resumed_at = _resume_or_init(run, ckpt_dir, resume, init_from)
    start = 0 if resumed_at is None else resumed_at
    if must_clear:
        clear_run_dir(out)  # only now: a bad --init-from or data error must not cost the old run
    logger = _open_run_folder(cfg, out, start, progress)
    logger.print(_describe(cfg, run, device, world, per_rank) + (f" ({note})" if note else ""))

    if cfg.train.eval_every and start == 0:  # where the curve starts: the encoder before any update
        logger.log({"step": 0, "train_s": 0.0, **run.evaluate()})
    loader = BatchLoader(run.train_data, sampler, device, rank=rank, world=world, num_micro=cfg.train.grad_accum)
    loop = _Loop(run, sampler, logger, ckpt_dir, start, resumed=resumed_at is not None)
    micro_inputs: list[torch.Tensor] = []
    micro_targets: list[torch.Tensor | None] = []
    try:
        with _StopSignal() as stop:
            for step, micro, batch in loader.iterate(start, cfg.train.steps):
                micro_inputs.append(batch.inputs)
                micro_targets.append(batch.targets)
                loop.meter.add(batch.inputs.shape[:-3].numel() * world, batch.wait_s)  # images, or frames of windows
                if micro < cfg.train.grad_accum - 1:
                    continue
                lr = lr_at(step, cfg)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                seeds = [step_seed(cfg.train.seed, step, rank, m) for m in range(cfg.train.grad_accum)]
                snapshot = loop.snapshot_buffers()
                parts = run.step(micro_inputs, micro_targets, step, seeds)  # forward -> loss parts -> backward
                micro_inputs, micro_targets = [], []
                loop.update(step, parts["loss"], snapshot)  # optimizer step (or skip a non-finite one)
                done = step + 1
                loop.log(step, parts, lr)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != cfg.train.steps:
                    loop.evaluate(done)
                # A signal may reach the ranks in different steps: all of them stop after the same one.
                stopping = dist.any_rank(stop.signum is not None)
                if done % cfg.train.save_every == 0 or done == cfg.train.steps or stopping:
                    loop.check_finite(step)  # no checkpoint holds weights a non-finite step touched
                    loop.save(done)
                loop.last_good_step = done
                if stopping:
                    name = signal.Signals(stop.signum).name if stop.signum is not None else "a signal to another rank"
                    raise RunFailed(f"stopped by {name} after step {done}; checkpoint saved, continue with --resume auto")
    finally:
        loader.close()
        logger.close()

    summary = loop.finish(out)
    if owns_group:
        dist.barrier()  # no rank tears gloo / NCCL down while another still uses it
        dist.teardown()
    return summary
