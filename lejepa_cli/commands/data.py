"""`lejepa data ...`: prepare, inspect and fetch image datasets (thin layer over lejepa_cli.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lejepa_cli.data import NPZ_KEYS_HELP
from lejepa_cli.terminal import make_console, plural, unwrapped

app = typer.Typer(help="Prepare, inspect and fetch image datasets (and trajectory files for world models).", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)
MAX_WORKERS = 256  # decoding processes; each holds a Pillow decoder and a chunk of images

SOURCE_HELP = (
    "Image folder (class sub-folders or flat), .txt/.csv file list, IDX or CIFAR folder (binary or python), "
    ".npz/.npy, .parquet, or 'builtin'. Trajectories for world models: an .npz with frames (or pixels) "
    "(T, H, W[, C]) uint8, actions (T, A) (shape (T, 0) for a passive video), episode_starts (E or E+1 offsets) "
    "(or ep_offset/ep_len, or ep_idx (T,)), optional state (T, S) and state_names (S,); an .h5/.hdf5 file as "
    "stable-worldmodel writes it (pixels, action, ep_offset/ep_len or ep_idx, step_idx, state/proprio; needs h5py, "
    "and hdf5plugin for compressed pixels); or a .lance dataset as stable-worldmodel writes it (episode_idx, step_idx, "
    "JPEG pixels, action, state/proprio; needs pylance). "
    + NPZ_KEYS_HELP.replace("data.val_fraction", "--val-fraction") + "."
)
RESOLUTION_HELP = (
    "Side of the stored square images (default: unchanged for same-size images <= 64 px, else 256; "
    "trajectory frames: their shorter side)."
)


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the prepared shards to.")],
    resolution: Annotated[Optional[int], typer.Option(help=RESOLUTION_HELP)] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction held out as 'val' when the source has no official split (of episodes, for trajectories).")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the train/val split.")] = 0,
    workers: Annotated[int, typer.Option(min=0, max=MAX_WORKERS, help="Decoding processes (0: decode in this process).")] = 2,
    overwrite: Annotated[bool, typer.Option(help="Replace a different dataset already in --out.")] = False,
) -> None:
    """Decode SOURCE into memory-mappable uint8 shards; re-running after an interruption resumes."""
    from lejepa_cli.data.prepare import prepare as prepare_images
    from lejepa_cli.data.formats import H5_SUFFIXES, LANCE_SUFFIX, is_trajectory_file

    path = Path(source).expanduser()
    if source != "builtin" and (is_trajectory_file(path) or path.suffix.lower() in (LANCE_SUFFIX, *H5_SUFFIXES)):  # a world's data
        from lejepa_cli.world.prepare import prepare_trajectory_file

        s = prepare_trajectory_file(source, out, resolution=resolution, val_fraction=val_fraction, seed=seed,
                                    overwrite=overwrite)
    else:
        s = prepare_images(source, out, resolution=resolution, val_fraction=val_fraction, seed=seed, workers=workers,
                           overwrite=overwrite)
    if s.get("kind") == "trajectories":
        counts = ", ".join(f"{split} {e['episodes']} episodes ({e['steps']} steps)" for split, e in s["splits"].items())
        state = "already up to date" if s["up_to_date"] else "done"
        err_console.print(f"[green]{state}:[/] {counts} at {s['resolution']}px x {s['channels']} ch, "
                          f"{s['action_dim']}-D actions, {s['state_dim']}-D state -> {s['out']}", highlight=False)
        if s.get("zeroed_action_rows"):
            from lejepa_cli.world.columns import zeroed_note

            err_console.print(f"[yellow]{zeroed_note(s['zeroed_action_rows'])}[/]", highlight=False)
        return
    counts = ", ".join(f"{split} {plural(n, 'image')}" for split, n in s["splits"].items())
    state = "already up to date" if s["up_to_date"] else ("resumed and finished" if s["resumed"] else "done")
    shape = f"{s['resolution']}px x {s['channels']} ch, {plural(s['num_classes'], 'class')}"
    err_console.print(f"[green]{state}:[/] {counts} at {shape} -> {s['out']}")
    if s["skipped"]:
        err_console.print(f"[yellow]skipped {plural(s['skipped'], 'unreadable file')}, listed in {s['skipped_file']}[/]")


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A folder written by `lejepa data prepare` or `lejepa world simulate`, "
                                                  "or a raw trajectory file (.npz, .h5/.hdf5, .lance).")],
    verify: Annotated[bool, typer.Option("--verify", help="Re-read every shard and check its checksum (a raw "
                                                          "trajectory file: decode every frame).")] = False,
) -> None:
    """Show what a prepared folder (or a raw trajectory file) holds, and whether its source changed since."""
    from lejepa_cli.data.formats import H5_SUFFIXES, is_trajectory_file
    from lejepa_cli.data.prepare import info as read_info
    from lejepa_cli.errors import UserError
    from lejepa_cli.data.shards import verify as verify_folder
    from lejepa_cli.world.shards import is_trajectory_folder

    if is_trajectory_folder(path):
        return _trajectory_info(path, verify)
    if is_trajectory_file(path):
        return _trajectory_file_info(path, verify)
    if not path.exists() and path.suffix.lower() in (".npz", ".lance", *H5_SUFFIXES):
        raise UserError(f"{path} does not exist (give a prepared folder or a trajectory file: .npz, .h5/.hdf5, .lance)")
    d = read_info(path)
    names = d["class_names"] or []
    classes = f"{d['num_classes']}" + (f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else "")
    table = Table(title=unwrapped(str(path)), show_header=False)
    for key, value in (
        ("splits", ", ".join(f"{s}: {n} ({plural(d['shards'][s], 'shard')})" for s, n in d["splits"].items())),
        ("images", f"{d['resolution']} x {d['resolution']} x {d['channels']} uint8"),
        ("classes", classes),
        ("mean / std", f"{[round(m, 4) for m in d['mean']]} / {[round(s, 4) for s in d['std']]}"),
        ("skipped files", str(d["num_skipped"])),
        ("source", f"{d['source']} ({d['kind']})"),
        ("fingerprint", d["fingerprint"][:16]),
        ("source status", d["source_status"]),
    ):
        table.add_row(key, value)
    console.print(table)
    if d["source_status"] == "changed":
        err_console.print("[yellow]the source changed since it was prepared; re-run prepare with --overwrite to refresh[/]")
    if verify:
        _report_problems(verify_folder(path))


def _report_problems(problems: list[str]) -> None:
    """--verify's verdict: each problem in red and exit 1, or one green line."""
    for p in problems:
        err_console.print(f"[red]{p}[/]", highlight=False)
    if problems:
        raise typer.Exit(1)
    err_console.print("[green]verified: every shard matches its checksum[/]")


def _trajectory_info(path: Path, verify: bool) -> None:
    from lejepa_cli.world.shards import read_index, verify as verify_folder

    index = read_index(path)
    names = index.get("state_names") or []
    state = f"{index['state_dim']}" + (f" ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else "")
    options = index.get("world_options") or {}
    table = Table(title=str(path), show_header=False)
    for key, value in (
        ("kind", "trajectories (for world models)"),
        ("splits", ", ".join(f"{s}: {e['episodes']} episodes, {e['steps']} steps" for s, e in index["splits"].items())),
        ("resolution", str(index["resolution"])),
        ("channels", str(index["channels"])),
        ("action dim", str(index["action_dim"])),
        ("state dim", state),
        ("world", index.get("world") or "-"),
        ("world options", ", ".join(f"{k}={v}" for k, v in options.items()) or "-"),
        ("mean / std", f"{[round(m, 4) for m in index['mean']]} / {[round(s, 4) for s in index['std']]}"),
        ("source", f"{index['source'].get('path')} ({index['source'].get('kind')})"),
        ("fingerprint", index["splits"]["train"].get("fingerprint", "")),
    ):
        table.add_row(key, value)
    console.print(table)
    if verify:
        _report_problems(verify_folder(path))


def _trajectory_file_info(path: Path, verify: bool) -> None:
    """A raw trajectory file, described without preparing it; --verify decodes every frame."""
    from lejepa_cli.world.file_info import describe_trajectory_file, verify_trajectory_file

    table = Table(title=unwrapped(str(path)), show_header=False)
    for key, value in describe_trajectory_file(path):
        table.add_row(key, value)
    console.print(table)
    if verify:
        problems = verify_trajectory_file(path)
        for p in problems:
            err_console.print(f"[red]{p}[/]", highlight=False)
        if problems:
            raise typer.Exit(1)
        err_console.print("[green]verified: every frame decodes[/]")
    err_console.print(f"train on it directly (`lejepa train --preset lewm --data {path} --set data.val_fraction=0.1`) "
                      f"or prepare it first (`lejepa data prepare {path} --out DIR --val-fraction 0.1`)",
                      highlight=False, markup=False)


@app.command()
def fetch(
    name: Annotated[str, typer.Argument(help="mnist, fashion-mnist, cifar10, cifar100, imagenette or imagenette-320.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to download into.")],
    base_url: Annotated[Optional[str], typer.Option(help="Mirror to download from instead of the official one.")] = None,
) -> None:
    """Download (or copy a local copy of) a standard dataset; prints the folder to prepare."""
    from lejepa_cli.data.fetch import fetch as run_fetch

    folder = run_fetch(name, out, base_url=base_url)
    err_console.print(f"[green]ready:[/] lejepa data prepare {folder} --out <DIR>")
    console.print(str(folder), highlight=False, soft_wrap=True)
