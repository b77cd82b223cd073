"""`lejepa bench`: the benchmark suite (benchmarks/ in the source checkout) as a command.

The suite is not part of the installed package: it compares against kornia and reference
formulas that users do not need. From a source checkout (or an editable install) the command
finds it beside the package; elsewhere it says so.
"""

from __future__ import annotations

import importlib
import sys
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Optional

import typer
from rich.console import Console

from lejepa_cli.errors import RunFailed, UserError

err_console = Console(stderr=True)
MAX_THREADS = 1024  # torch rejects absurd counts with an internal error; no CPU this runs on has more


class Module(str, Enum):
    sigreg = "sigreg"
    views = "views"
    step = "step"
    resnet_stem = "resnet_stem"
    memory = "memory"
    loader = "loader"
    world = "world"
    verify = "verify"  # shard checksums: seconds per GB
    plan = "plan"


def load_suite() -> ModuleType:
    """The `benchmarks.__main__` module of the checkout this package sits in (else of sys.path)."""
    root = Path(__file__).resolve().parents[2]  # <root>/lejepa_cli/commands/bench.py
    if (root / "benchmarks" / "__main__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        suite = importlib.import_module("benchmarks.__main__")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.__main__"):
            raise  # the suite is there but needs something missing (e.g. kornia): say which
        suite = None
    if suite is None or not hasattr(suite, "run_suite"):
        raise UserError("the benchmark suite ships with the source checkout (benchmarks/), not the installed "
                        "package: run `lejepa bench` from a clone of lejepa-cli, or `python -m benchmarks` in it")
    return suite


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Small sizes and few repeats (about a minute on 2 idle CPU cores).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the JSON document to this file.")] = None,
    only: Annotated[Optional[list[Module]], typer.Option("--only", help="Run only this benchmark (repeatable).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, max=MAX_THREADS, help="CPU threads for torch (default: torch's, or 1 on an oversubscribed CPU).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file that is not an earlier `lejepa bench` document.")] = False,
) -> None:
    """Benchmark SIGReg, the views, the training step, its memory, the data path, world models and planning; print one JSON document."""
    import json

    from lejepa_cli.outputs import REPORT_SUFFIXES, check_output_file, write_report

    if out is not None:  # before minutes of benchmarking, not after
        check_output_file(out, "--out", overwrite=overwrite, suffixes=REPORT_SUFFIXES, report="bench")
    suite = load_suite()
    doc = suite.run_suite(quick, [m.value for m in only] if only else None, threads,
                          progress=lambda msg: err_console.print(msg, highlight=False))
    text = json.dumps(doc, indent=2)
    if out is not None:
        write_report(doc, out, "bench", allow_nan=True)  # as printed
    typer.echo(text)
    broken = suite.failed(doc)
    if broken:
        raise RunFailed(f"benchmark(s) failed: {', '.join(broken)} (see their 'error' entries in the JSON)")


def register(app: typer.Typer) -> None:
    """Add `bench` as a top-level command of the lejepa app."""
    app.command("bench")(bench)
