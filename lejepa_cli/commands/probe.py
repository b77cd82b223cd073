"""`lejepa probe`: a thin command over lejepa_cli.image.probe and .selection."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lejepa_cli.errors import UserError
from lejepa_cli.image.limits import MAX_EPOCHS, MIN_TRAIN
from lejepa_cli.terminal import make_console

console = make_console()
err_console = make_console(stderr=True)

# Shared with `lejepa viz`.
Device = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
Data = Annotated[Optional[str], typer.Option("--data", help="Labelled data: builtin, an IDX folder, an .npz or a prepared folder (default: the data the encoder was trained on).")]


def probe(
    ckpt: Annotated[Optional[Path], typer.Argument(help="Training checkpoint, run folder (its newest checkpoint) or export folder.")] = None,
    data: Data = None,
    train_split: Annotated[str, typer.Option(help="Split the probes are trained on.")] = "train",
    eval_split: Annotated[str, typer.Option(help="Split the probes are evaluated on.")] = "val",
    json_file: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write PNG plots (curves, spectrum, shift, PCA maps) to this folder.")] = None,
    label_free: Annotated[Optional[Path], typer.Option("--label-free", help="Rank every checkpoint of this run folder without labels instead.")] = None,
    random_init: Annotated[bool, typer.Option("--random-init", help="Probe a randomly initialised encoder of the same architecture (baseline); with --preset and no checkpoint, of that preset's architecture.")] = False,
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="With --random-init and no checkpoint: the preset whose untrained encoder to probe (the baseline before any training).")] = None,
    epochs: Annotated[int, typer.Option(min=1, max=MAX_EPOCHS, help="Linear-probe epochs over the cached features.")] = 40,
    max_train: Annotated[Optional[int], typer.Option(min=MIN_TRAIN, help="Use at most this many train images (evenly spaced).")] = None,
    shift: Annotated[bool, typer.Option(help="Evaluate under corruptions (noise, blur, contrast, brightness, pixelation).")] = True,
    shift_images: Annotated[int, typer.Option(min=1, help="Evaluation images corrupted per corruption and severity.")] = 2000,
    adapt: Annotated[bool, typer.Option("--adapt", help="Also show the shift table after label-free adaptation: BatchNorm statistics re-estimated on each row's corrupted images (no labels).")] = False,
    conditions: Annotated[bool, typer.Option(help="Check normality / isotropy of the embeddings.")] = True,
    cache: Annotated[bool, typer.Option(help="Cache features on disk ($LEJEPA_CACHE_DIR, default ~/.cache/lejepa).")] = True,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per extraction batch.")] = 256,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json file or plots that are not this command's own earlier output.")] = False,
) -> None:
    """Evaluate a frozen encoder: linear probe, kNN, few-shot, robustness under shift, isotropy check."""
    from lejepa_cli.outputs import REPORT_SUFFIXES, check_output_file, write_report
    from lejepa_cli.image.probe import ProbeOptions, run_probe
    from lejepa_cli.image.report import report_tables

    if json_file is not None:  # before the work, not after it
        check_output_file(json_file, "--json", overwrite=overwrite, suffixes=REPORT_SUFFIXES, report="probe")
    if label_free is not None and (ckpt is not None or random_init or preset is not None):
        given = "a checkpoint" if ckpt is not None else "--random-init / --preset"
        raise UserError(f"--label-free {label_free} ranks that run's checkpoints without labels; {given} cannot be "
                        f"used with it: give one or the other")
    if ckpt is not None and data is None:
        from lejepa_cli.world.export import refuse_world_model

        refuse_world_model(ckpt, "probe", "; to probe its encoder on labelled images anyway, give --data")
    if label_free is not None:
        from lejepa_cli.image.selection import rank_checkpoints, ranking_table

        result = rank_checkpoints(label_free, device=device, data=data, progress=not no_progress)
        console.print(ranking_table(result))
    elif ckpt is None and preset is not None and not random_init:
        raise UserError(f"--preset {preset} has no trained weights to probe: add --random-init for its untrained baseline")
    elif ckpt is None and preset is None:
        raise UserError("give a checkpoint, run folder or export to probe, --random-init --preset NAME for the "
                        "untrained baseline, or --label-free RUN_DIR")
    else:
        opts = ProbeOptions(data=data, train_split=train_split, eval_split=eval_split, device=device,
                            batch_size=batch_size, max_train=max_train, epochs=epochs, shift=shift,
                            shift_images=shift_images, conditions=conditions, adapt=adapt, random_init=random_init,
                            preset=preset, cache=cache, progress=not no_progress, plots=plots,
                            overwrite=overwrite)
        result = run_probe(ckpt, opts)
        for table in report_tables(result):
            console.print(table)
    if json_file is not None:
        write_report(result, json_file, "probe")
        err_console.print(f"report written to {json_file}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `probe` as a top-level command of the lejepa app."""
    app.command("probe")(probe)
