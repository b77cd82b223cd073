"""`lejepa export`: a thin command over lejepa_cli.export (and lejepa_cli.world.export for a world run)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from lejepa_cli.errors import UserError

err_console = Console(stderr=True)


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Format(str, Enum):
    safetensors = "safetensors"
    onnx = "onnx"
    all = "all"


def export(
    source: Annotated[Path, typer.Argument(help="A training checkpoint, a run folder (its newest checkpoint) or an export folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write model.safetensors + config.json (and model.onnx) to.")],
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Precision of the saved weights.")] = Dtype.fp32,
    fmt: Annotated[Format, typer.Option("--format", help="safetensors (timm-compatible weights + config.json), or onnx / all: the same plus model.onnx (fp32; dynamic batch, height and width).")] = Format.safetensors,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an export already in --out.")] = False,
) -> None:
    """Export the encoder alone (no projector, optimizer or probe) for downstream use."""
    from lejepa_cli.export import export_encoder
    from lejepa_cli.world.export import export_world, is_world_checkpoint
    from lejepa_cli.models.timm_compat import timm_hint

    if is_world_checkpoint(source):  # encoder + projector, action encoder and predictor
        if fmt != Format.safetensors or dtype != Dtype.fp32:
            raise UserError("a world model exports as fp32 safetensors only: drop --format / --dtype")
        r = export_world(source, out, overwrite=overwrite)
    else:
        r = export_encoder(source, out, dtype=dtype.value, format=fmt.value, overwrite=overwrite)
    files = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in r.files)
    err_console.print(f"[green]exported[/] {r.info['arch_config']['arch']} (step {r.info.get('step')}, {r.dtype}) -> {r.out}: {files}")
    hint = timm_hint(r.info["arch_config"], str(r.out))
    err_console.print(hint if r.timm_compatible else f"[yellow]{hint}[/]", markup=not r.timm_compatible, highlight=False)
    if r.onnx_max_abs_diff is not None:
        onnx = r.info["onnx"]
        sizes = ", ".join(f"{h}x{w}" for h, w in onnx["checked_sizes"])
        err_console.print(f"ONNX (dynamic batch, height, width: {onnx['size_rule']}) vs PyTorch at {sizes}: "
                          f"max abs diff {r.onnx_max_abs_diff:.2e}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `export` as a top-level command of the lejepa app."""
    app.command("export")(export)
