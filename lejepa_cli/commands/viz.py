"""`lejepa viz`: a thin command over lejepa_cli.image.viz (training curves and PCA maps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lejepa_cli.commands.probe import Data, Device
from lejepa_cli.image.limits import MAX_PCA_IMAGES
from lejepa_cli.terminal import make_console

err_console = make_console(stderr=True)


def viz(
    ckpt: Annotated[Path, typer.Argument(help="Training checkpoint, run folder or export folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG files.")] = Path("plots"),
    images: Annotated[Optional[list[Path]], typer.Option("--image", "-i", help=f"Image file for the PCA maps (repeatable, at most {MAX_PCA_IMAGES}; default: images of the encoder's data).")] = None,
    num_images: Annotated[int, typer.Option(min=1, max=MAX_PCA_IMAGES, help="Images of the data to show when no --image is given.")] = 6,
    data: Data = None,
    device: Device = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace PNG files in --out that this command did not write.")] = False,
) -> None:
    """Plot training curves (from metrics.jsonl) and PCA maps of patch features."""
    from lejepa_cli.image.viz import write_viz

    if data is None and not images:  # its own data would be trajectories
        from lejepa_cli.world.export import refuse_world_model

        refuse_world_model(ckpt, "viz", "; to see its encoder's PCA maps of images anyway, give --data or --image")
    for path in write_viz(ckpt, out, images=images or (), num_images=num_images, data=data, device=device,
                          overwrite=overwrite):
        err_console.print(f"wrote {path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `viz` as a top-level command of the lejepa app."""
    app.command("viz")(viz)
