"""`lejepa world ...`: simulate the built-in worlds (thin layer over lejepa_cli.world)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Built-in simulated worlds and trained world models: list and simulate worlds; plan, probe and surprise with a world run.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@app.command("list")
def list_worlds() -> None:
    """Show the built-in worlds, their state variables and their options (set with --set key=value)."""
    from lejepa_cli.world.sim import COMMON_OPTIONS, world_class, world_names

    for name in world_names():
        cls = world_class(name)
        world = cls(size=16)
        table = Table("option", "default", "range", "meaning", title=f"{name}: {cls.description}", title_justify="left")
        for o in (*cls.options_spec, *COMMON_OPTIONS):
            table.add_row(o.name, str(o.default), f"{o.low} .. {o.high}", o.help)
        console.print(table)
        console.print(f"  actions: {cls.action_dim}-D in [-1, 1]; state: {', '.join(world.state_names)}; "
                      f"goal reached within {cls.success_radius}", highlight=False)


@app.command()
def simulate(
    name: Annotated[str, typer.Argument(help="World name: two-room, push or balls (see `lejepa world list`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the trajectory dataset to.")],
    episodes: Annotated[int, typer.Option(help="Training episodes.")] = 400,
    steps: Annotated[int, typer.Option(help="Frames (and actions) per episode.")] = 100,
    val_episodes: Annotated[int, typer.Option(help="Held-out episodes (split 'val'), simulated from their own seeds.")] = 40,
    size: Annotated[int, typer.Option(help="Frame side in pixels (RGB).")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed, options and counts give the same data.")] = 0,
    sets: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="World option key=value (repeatable), e.g. noise=0.05.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a different dataset already in --out.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Simulate a built-in world with a smooth random exploration policy into a trajectory dataset."""
    from lejepa_cli.world.build import simulate_dataset

    s = simulate_dataset(name, out, episodes=episodes, steps=steps, val_episodes=val_episodes, size=size, seed=seed,
                         sets=sets, overwrite=overwrite, progress=not no_progress)
    counts = ", ".join(f"{split} {e['episodes']} episodes x {e['steps'] // max(e['episodes'], 1)} steps" for split, e in s["splits"].items())
    state = "already up to date" if s["up_to_date"] else f"done in {s['seconds']:.1f} s"
    err_console.print(f"[green]{state}:[/] {counts} at {s['resolution']}px -> {s['out']}", highlight=False)


def _register_use_commands() -> None:
    from lejepa_cli.commands.world_use import register

    register(app)


_register_use_commands()
