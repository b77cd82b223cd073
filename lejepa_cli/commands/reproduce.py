"""`lejepa reproduce NAME`: run a pinned recipe end to end and print its verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lejepa_cli.reproduce import RECIPES  # torch-free at import: keeps `lejepa --help` fast
from lejepa_cli.terminal import make_console

console = make_console()  # piped: lines and tables kept whole


def reproduce(
    name: Annotated[str, typer.Argument(help=f"Recipe: {', '.join(RECIPES)}.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Work folder (default: runs/reproduce-NAME); running again continues.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Your copy of the recipe's data (required for the ImageNet recipes).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Extra config override (changes the recipe: the verdict then says so).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Run a pinned recipe (data, pretraining, probe) and compare its figures with the expected range."""
    from lejepa_cli.reproduce import reproduce as run

    out = out or Path("runs") / f"reproduce-{name}"
    result = run(name, out, data=data, extra=list(overrides or []), progress=not no_progress)
    table = Table("metric", "measured", "expected", "ok", title=f"reproduce {name}")
    for row in result["checks"]:
        table.add_row(row["metric"], f"{row['measured']:.4f}", f"[{row['low']}, {row['high']}]", "yes" if row["ok"] else "NO")
    if not result["checks"]:
        for key, value in result["measured"].items():
            table.add_row(key, f"{value:.4f}", "-", "-")
    console.print(table)
    minutes = result["minutes"]
    machine = result["machine"]
    console.print(f"expected figures: {result['expected_from']}")
    console.print(f"time: {minutes['total']:.1f} min (data {minutes['data']:.1f}, pretrain {minutes['pretrain']:.1f}, "
                  f"probe {minutes['probe']:.1f}) on {machine['cpu']} ({machine['cpu_capability']}"
                  f"{''.join(f', {k}={v}' for k, v in machine['isa_settings'].items())}) x{machine['threads']} threads"
                  f"{', ' + machine['gpu'] if machine['gpu'] else ''}")
    tag = "[bold green]PASS" if result["verdict"] == "PASS" else "[bold red]FAIL" if result["verdict"] == "FAIL" else "[bold yellow]NO-REFERENCE"
    if overrides:
        tag += "[/] (recipe changed by --set)"
    console.print(f"verdict: {tag}")
    if result["verdict"] == "FAIL":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(reproduce)
