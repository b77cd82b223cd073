"""The `lejepa` command: a thin Typer layer over the library.

Each command parses options and calls one plain Python function. A `UserError` anywhere becomes
one red line on stderr and its exit code (2 for bad input, 1 for a run that failed or was
stopped); so do usage errors (2) and I/O errors such as a full disk (1). `--debug` (or
LEJEPA_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lejepa_cli import __version__
from lejepa_cli.errors import UserError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="lejepa",
    help="Pretrain your own vision encoder with LeJEPA: multi-view invariance + SIGReg, one hyper-parameter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
presets_app = typer.Typer(help="List and show the shipped presets.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")


def _version(value: bool) -> None:
    if value:
        console.print(f"lejepa-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    if debug:
        os.environ["LEJEPA_DEBUG"] = "1"


# ---- presets -------------------------------------------------------------------------------------


@presets_app.command("list")
def presets_list() -> None:
    """List the presets that ship with the package."""
    from lejepa_cli.config import preset_path, list_presets

    table = Table("preset", "description")
    for name in list_presets():
        first = preset_path(name).read_text().splitlines()[0]
        table.add_row(name, first.lstrip("# ").strip())
    console.print(table)


@presets_app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name, e.g. vit-s.")]) -> None:
    """Print a preset's YAML, comments included."""
    from lejepa_cli.config import preset_path

    console.print(preset_path(name).read_text(), markup=False, highlight=False)


# ---- train ---------------------------------------------------------------------------------------


@app.command()
def train(
    preset: Annotated[str, typer.Option("--preset", "-p", help="Preset name (see `lejepa presets list`) or a YAML file.")] = "demo",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/PRESET).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: key.sub=value (repeatable).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data source: builtin, an IDX folder, an .npz or a prepared folder.")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'auto' (newest good checkpoint in the run folder) or a checkpoint file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an existing run folder (deletes its checkpoints).")] = False,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Initialise the encoder from an export or checkpoint (a new run, not a resume).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (logs still go to metrics.jsonl).")] = False,
) -> None:
    """Pretrain an encoder with LeJEPA."""
    from lejepa_cli.config import load_config
    from lejepa_cli.train import resume_config, train as run_train

    sets = list(overrides or []) + ([f"data.source={data}"] if data else [])
    out = out or Path("runs") / Path(preset).stem
    if resume is not None and init_from is not None:
        raise UserError("--resume continues a run exactly; --init-from starts a new one: give only one")
    cfg = None
    if resume == "auto":
        cfg = resume_config(out, sets)  # the run's own config; None when there is nothing to resume
    elif resume is not None:
        from lejepa_cli.checkpoint import FORMAT, read_metadata
        from lejepa_cli.config import apply_overrides, config_from_dict

        meta = read_metadata(Path(resume))  # the full load, checksum included, happens in train()
        if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
            raise UserError(f"{resume} is not a lejepa training checkpoint (no training config in it)")
        cfg = apply_overrides(config_from_dict(meta["config"]), sets)  # as with --resume auto
    cfg = cfg or load_config(preset, sets)
    summary = run_train(cfg, out, resume=resume, overwrite=overwrite, progress=not no_progress, init_from=init_from)
    table = Table("result", "value", title=f"run {out}")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    from lejepa_cli import dist

    if dist.is_main():
        console.print(table)


# ---- entry point ---------------------------------------------------------------------------------


# Topic modules: `data` is a sub-app (lejepa data prepare|info|fetch); the others add top-level commands.
from lejepa_cli.commands import bench, data, export, probe, reproduce  # noqa: E402

app.add_typer(data.app, name="data")
for _module in (probe, export, reproduce, bench):
    _module.register(app)


def _fail(message: str, code: int, error: BaseException) -> None:
    """One red line on stderr and exit `code`; under --debug the traceback instead."""
    if os.environ.get("LEJEPA_DEBUG") == "1":
        raise error
    line = " ".join(message.split())  # one line whatever the message holds
    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """The console script: known errors (UserError, usage errors, I/O errors) end as one line."""
    from lejepa_cli import threads

    threads.apply_default()  # before torch is imported: one thread on a busy machine unless pinned
    try:
        code = app(args=argv, prog_name="lejepa", standalone_mode=False)
    except UserError as e:
        _fail(str(e), e.exit_code, e)
    except (KeyboardInterrupt, typer.Abort) as e:
        _fail("interrupted", 130, e)
    except OSError as e:  # disk full, permission denied, ...: the machine, not the input or a bug
        if e.errno == errno.EPIPE:  # output piped into `head` and closed: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        _fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""), 1, e)
    except Exception as e:
        # Click's usage errors (typer may vendor click, so they are recognised by their shape).
        if not (hasattr(e, "format_message") and isinstance(getattr(e, "exit_code", None), int)):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # the help text is the message (already shown by rich)
            if e.format_message().strip():
                console.print(e.format_message(), markup=False, highlight=False)
            sys.exit(e.exit_code)
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(e.format_message() + hint, e.exit_code, e)
    if code == 130:  # typer turns Ctrl-C outside a run into exit code 130
        err_console.print("[bold red]error:[/] interrupted", highlight=False)
    sys.exit(code if isinstance(code, int) else 0)
