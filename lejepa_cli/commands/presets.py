"""`lejepa presets list|show`: the presets that ship with the package."""

from __future__ import annotations

import re
import sys
from typing import Annotated

import typer
from rich.table import Table

from lejepa_cli.terminal import make_console

console = make_console()  # piped or redirected: the table keeps whole descriptions
app = typer.Typer(help="List and show the shipped presets.", no_args_is_help=True)


def preset_description(text: str, name: str) -> str:
    """The first sentence of a preset file's opening comment paragraph, without the "NAME: " prefix.

    A sentence may run over several comment lines (a line that ends mid-sentence continues on a
    line starting in lower case); it ends at ". " or where a line is followed by one starting
    with a capital (a new sentence such as "Source: ...") or by the end of the paragraph.
    """
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("#") or not line.lstrip("#").strip():
            break  # the paragraph ends at the first blank comment or YAML line
        line = line.lstrip("#").strip()
        if lines and line[0].isupper():
            break
        lines.append(line)
    joined = " ".join(lines)
    end = re.search(r"\.(\s|$)", joined)
    sentence = joined[: end.start() + 1] if end else joined
    return sentence.removeprefix(f"{name}:").strip()


@app.command("list")
def presets_list() -> None:
    """List the presets that ship with the package."""
    from lejepa_cli.config import list_presets, preset_path

    table = Table("preset", "description")
    for name in list_presets():
        table.add_row(name, preset_description(preset_path(name).read_text(), name))
    console.print(table)


@app.command("show")
def presets_show(name: Annotated[str, typer.Argument(help="Preset name, e.g. vit-s.")]) -> None:
    """Print a preset's YAML, comments included (verbatim: `lejepa presets show NAME > my.yaml` is a valid config)."""
    from lejepa_cli.config import preset_path

    sys.stdout.write(preset_path(name).read_text())  # never through rich: it would wrap long lines
    sys.stdout.flush()
