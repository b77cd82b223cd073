"""The `lejepa` command: a thin Typer layer over the library.

This module holds the app, `lejepa train` and the error handling; every other command lives in
lejepa_cli/commands/ in a module named after it. Each command parses options and calls one
plain Python function. A `UserError` anywhere becomes
one red line on stderr and its exit code (2 for bad input, 1 for a run that failed or was
stopped); so do usage errors (2), OS errors (2 for a path that cannot be used: missing, not a
folder, permission denied; 1 for the machine failing: a full disk, an I/O error) and running out
of memory (1). `--debug` (or
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
from typer.core import TyperGroup

from lejepa_cli._version import __version__
from lejepa_cli.data import NPZ_KEYS_HELP
from lejepa_cli.errors import UserError, out_of_memory
from lejepa_cli.terminal import make_console

console = make_console()  # piped or redirected: tables keep whole paths, lines are not wrapped
err_console = Console(stderr=True)


def _plain_flags(command: TyperGroup) -> None:
    """Flags take no value, so --help shows none: typer's rich help would print `<bool>` beside
    --flag / --no-flag. An empty metavar drops it (click itself never shows a flag's metavar)."""
    for param in command.params:
        if getattr(param, "is_flag", False) or getattr(param, "count", False):  # typer may vendor click: duck-typed
            param.metavar = ""
    make_help = command.get_help_option  # --help is built on demand, outside command.params

    def plain_help(ctx, make_help=make_help):
        option = make_help(ctx)
        if option is not None:
            option.metavar = ""
        return option

    if not getattr(make_help, "plain", False):
        plain_help.plain = True
        command.get_help_option = plain_help
    for sub in getattr(command, "commands", {}).values():
        _plain_flags(sub)


class _LejepaGroup(TyperGroup):
    """The root command group: flags made plain before any parsing or help (also under CliRunner)."""

    def main(self, *args, **kwargs):
        _plain_flags(self)
        return super().main(*args, **kwargs)


app = typer.Typer(
    cls=_LejepaGroup,
    name="lejepa",
    help="Pretrain your own vision encoder with LeJEPA: multi-view invariance + SIGReg, one hyper-parameter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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


# ---- train ---------------------------------------------------------------------------------------


@app.command()
def train(
    preset: Annotated[Optional[str], typer.Option("--preset", "-p", help="Preset name (see `lejepa presets list`) or a YAML file [default: demo]. With --resume the run keeps the config stored in its checkpoint: a --preset given then must match it.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run folder (default: runs/PRESET).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: key.sub=value (repeatable; with --resume, on top of the run's own config).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data source: builtin, an IDX folder, an .npz or a prepared folder (a trajectory folder, .npz or .h5 for a world preset). " + NPZ_KEYS_HELP + ".")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'auto' (newest good checkpoint in the run folder; none there: a new run) or a checkpoint file. A finished run is left as it is.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in an existing run folder (deletes its checkpoints).")] = False,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Initialise the encoder from an export or checkpoint (a new run, not a resume).")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (logs still go to metrics.jsonl).")] = False,
) -> None:
    """Pretrain an encoder with LeJEPA."""
    from lejepa_cli import dist
    from lejepa_cli.config import apply_overrides, load_config
    from lejepa_cli.resume import check_preset_matches, check_run_folder, resume_point
    from lejepa_cli.train import train as run_train

    sets = list(overrides or []) + ([f"data.source={data}"] if data else [])
    out = out or Path("runs") / Path(preset or "demo").stem
    if resume is not None and init_from is not None:
        raise UserError("--resume continues a run exactly; --init-from starts a new one: give only one")
    if resume is not None and overwrite:
        raise UserError("--resume continues the run in the run folder; --overwrite deletes it to start over: give only one")
    check_run_folder(out)
    cfg, point = None, None
    if resume == "auto":
        point = resume_point(out)  # the one scan of the checkpoints; train() loads the file it found
        if point is None:
            cfg = load_config(preset or "demo", sets)  # a bad --set is the one line, not this note
            if dist.is_main():
                err_console.print(f"nothing to resume in {out}: starting a new run", highlight=False, soft_wrap=True)
        else:
            resume, cfg = str(point[0]), apply_overrides(point[1], sets)
    elif resume is not None:
        cfg = _checkpoint_config(resume, sets)
    if cfg is not None and preset is not None and not (resume == "auto" and point is None):
        check_preset_matches(cfg, load_config(preset, sets), preset, resume)
    note = None
    if preset is None and (resume is None or (resume == "auto" and point is None)):
        # `lejepa train --out X` is the demo, as its --help says: the run's first line says so
        note = "no --preset given: this is the demo preset; `lejepa presets list` shows the others"
    cfg = cfg or load_config(preset or "demo", sets)
    summary = run_train(cfg, out, resume=resume, overwrite=overwrite, progress=not no_progress, init_from=init_from,
                        note=note)
    if dist.is_main():
        print_result(summary, f"run {out}")


def _checkpoint_config(resume: str, sets: list[str]):
    """The config stored in checkpoint file `resume`, with `sets` on top; refuses a folder or a non-checkpoint."""
    from lejepa_cli.checkpoint import FORMAT, list_checkpoints, read_metadata
    from lejepa_cli.config import apply_overrides, config_from_dict

    if Path(resume).is_dir():
        empty = "" if list_checkpoints(Path(resume) / "checkpoints") else " with no checkpoints"
        raise UserError(f"--resume {resume} is a folder{empty}: give a checkpoint file ({resume}/checkpoints/"
                        f"step-*.safetensors), or `--resume auto --out {resume}` to continue the run in it")
    meta = read_metadata(Path(resume))  # the full load, checksum included, happens in train()
    if meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise UserError(f"{resume} is not a lejepa training checkpoint (no training config in it)")
    return apply_overrides(config_from_dict(meta["config"]), sets)  # as with --resume auto


def print_result(summary: dict, title: str) -> None:
    """A result table on a terminal (values folded, never cut: paths stay whole); otherwise the title, then
    `key: value` lines (for files and scripts)."""
    cells = {key: f"{value:.4f}" if isinstance(value, float) else str(value) for key, value in summary.items()}
    if not console.is_terminal:
        print(title)
        for key, text in cells.items():
            print(f"{key}: {text}")
        return
    table = Table("result", "value", title=title)
    table.columns[1].overflow = "fold"
    for key, text in cells.items():
        table.add_row(key, text)
    console.print(table)


# ---- entry point ---------------------------------------------------------------------------------


# One module per command, named after it: `presets`, `data` and `world` are sub-apps (lejepa presets
# list|show, lejepa data prepare|info|fetch, lejepa world list|simulate|...); the others add one
# top-level command each, in the order `lejepa --help` lists them.
from lejepa_cli.commands import adapt, bench, data, embed, export, presets, probe, reproduce, viz, world  # noqa: E402

for _module in (probe, viz, export, embed, adapt, reproduce, bench):
    _module.register(app)
app.add_typer(presets.app, name="presets")
app.add_typer(data.app, name="data")
app.add_typer(world.app, name="world")


# OS errors of the machine rather than of a path the user gave: a full disk or quota, a failing
# device, a file too large for the filesystem, no memory. The others (no such file, not a folder,
# permission denied, read-only filesystem, name too long, ...) are bad input: exit code 2.
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM, errno.ENXIO, errno.ETIMEDOUT}


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
    except OSError as e:  # a path that cannot be used (input, exit 2) or the machine failing (exit 1)
        if e.errno == errno.EPIPE:  # output piped into `head` and closed: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        _fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""), 1 if e.errno in _MACHINE_ERRNOS else 2, e)
    except Exception as e:
        if (what := out_of_memory(e)) is not None:  # outside training (which names its config's settings)
            _fail(f"out of memory ({what}): use less at once (a smaller --batch-size where the command has one) "
                  f"or free memory", 1, e)
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
