"""`lejepa adapt`: a thin command over lejepa_cli.image.adapt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lejepa_cli.image.limits import MAX_ADAPT_STEPS
from rich.console import Console

err_console = Console(stderr=True)


def adapt(
    source: Annotated[Path, typer.Argument(help="A training checkpoint, a run folder (its newest checkpoint) or an export folder.")],
    data: Annotated[str, typer.Option("--data", help="Unlabelled target images: builtin, an IDX folder, an .npz or a prepared folder; for a world run, target trajectories (a folder from `lejepa world simulate`, a trajectory file).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the adapted export to (model.safetensors + config.json).")],
    steps: Annotated[int, typer.Option("--steps", min=0, help=f"LeJEPA fine-tuning steps on the target images before the statistics (0: BatchNorm statistics only; at most {MAX_ADAPT_STEPS}).")] = 0,
    lr: Annotated[float, typer.Option("--lr", help="Fine-tuning learning rate (AdamW, constant).")] = 1e-4,
    split: Annotated[str, typer.Option("--split", help="Split of the target data to adapt on.")] = "train",
    batch_size: Annotated[int, typer.Option("--batch-size", min=2, help="Images per fine-tuning step and per statistics batch.")] = 128,
    max_images: Annotated[Optional[int], typer.Option("--max-images", min=1, help="Estimate the statistics from at most this many images (evenly spaced).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seeds the fine-tuning's batches, views and fresh projector.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace what is in --out.")] = False,
    freeze_dynamics: Annotated[bool, typer.Option("--freeze-dynamics/--train-dynamics", help="World runs: keep the predictor and action encoder fixed so the target's latents must follow the learned dynamics (default), or let every module learn.")] = True,
) -> None:
    """Adapt an encoder to new images without labels (BatchNorm statistics, optional LeJEPA fine-tuning); write an export. A world run adapts on target trajectories with its own loss (--steps N) into a run folder."""
    from lejepa_cli.world.export import is_world_checkpoint

    if is_world_checkpoint(source):
        return _adapt_world(source, data, out, steps, lr, seed, device, overwrite, freeze_dynamics)
    from lejepa_cli.image.adapt import AdaptOptions, adapt_encoder
    from lejepa_cli.world.export import refuse_world_model

    refuse_world_model(source, "adapt")

    opts = AdaptOptions(data=data, split=split, steps=steps, lr=lr, batch_size=batch_size, max_images=max_images,
                        device=device, seed=seed, overwrite=overwrite)
    result = adapt_encoder(source, out, opts, log=lambda line: err_console.print(line, highlight=False, soft_wrap=True))
    s = result.summary
    done = []
    if s["steps"]:
        done.append(f"{s['steps']} LeJEPA steps (loss {s['loss_first']:.4f} -> {s['loss_last']:.4f}, {s['projector']} projector)")
    if "stats_images" in s:
        done.append(f"BatchNorm statistics of {s['batchnorm_layers']} layers from {s['stats_images']} images")
    err_console.print(f"[green]adapted[/] {source} to {s['target']['name'] or data} ({s['target']['images']} images): "
                      f"{'; '.join(done)} in {s['seconds']:.1f} s -> {result.export.out}", highlight=False, soft_wrap=True)


def _adapt_world(source: Path, data: str, out: Path, steps: int, lr: float, seed: int, device: str, overwrite: bool,
                 freeze_dynamics: bool) -> None:
    from lejepa_cli.world.adapt import adapt_world

    summary = adapt_world(source, data, out, steps=steps, lr=lr, seed=seed, device=device, freeze_dynamics=freeze_dynamics,
                          overwrite=overwrite, progress=True)
    err_console.print(f"[green]adapted[/] world run {source} to {data}: {summary['step']} steps of its own loss "
                      f"in {summary['train_s']:.1f} s -> run folder {out} (use it with `lejepa world ...` or `lejepa export`)",
                      highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("adapt")(adapt)
