"""`lejepa embed`: a thin command over lejepa_cli.image.embed."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from lejepa_cli.terminal import plural

err_console = Console(stderr=True)


class Features(str, Enum):
    embedding = "embedding"
    probe = "probe"


def embed(
    encoder: Annotated[Path, typer.Argument(help="An export folder, a training checkpoint or a run folder.")],
    data: Annotated[str, typer.Argument(help="A prepared folder, or a source `lejepa data prepare` reads (image folder, .npz, IDX, builtin ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .npy (+ .ids.json beside it) or .parquet (needs pyarrow).")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split to embed (default: train, or every image of a source without splits).")] = None,
    features: Annotated[Features, typer.Option("--features", help="embedding (h) or probe (what linear probes read).")] = Features.embedding,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Write the embedding of every image of DATA, one row per image, with ids and labels."""
    from lejepa_cli.image.embed import embed as run_embed

    s = run_embed(encoder, data, out, split=split, features=features.value, batch_size=batch_size, device=device,
                  overwrite=overwrite, progress=not no_progress)
    labelled = "with labels" if s["labels"] else "no labels"
    err_console.print(f"[green]embedded[/] {plural(s['rows'], 'image')} x {s['dim']} ({s['features']}, {labelled}) -> {s['out']}")
    if s["skipped"]:  # as `lejepa data prepare` reports them
        err_console.print(f"[yellow]skipped {plural(s['skipped'], 'unreadable file')}, listed in {s['skipped_file']}[/]")


def register(app: typer.Typer) -> None:
    """Add `embed` as a top-level command of the lejepa app."""
    app.command("embed")(embed)
