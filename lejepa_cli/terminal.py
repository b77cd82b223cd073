"""What the commands print: consoles that never reshape output meant for files, and counted nouns.

On a terminal rich wraps and fits tables to the window. Piped or redirected (`> report.txt`),
a console of the default 80 columns would wrap long lines and cut long cells (paths) with "…",
so there the console is as wide as the text: tables keep every character and lines stay whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

if TYPE_CHECKING:
    from rich.progress import Progress

UNWRAPPED_WIDTH = 10_000  # wider than any table or line the tool prints


def make_console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr); unbounded width when that stream is not a terminal."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=UNWRAPPED_WIDTH)
    return console


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 image', '2 images', '0 classes' (the plural `many`, else noun + 's' / 'es')."""
    if count == 1:
        return f"{count} {noun}"
    if many is None:
        many = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{count} {many}"


def unwrapped(text: str) -> Text:
    """A table title (or cell) kept on one line: a path in it stays whole and copyable."""
    return Text(text, no_wrap=True, overflow="ignore")


def progress_bar(enabled: bool) -> "Progress":
    """A counted progress bar on stderr (description, bar, n/total, elapsed, remaining); `enabled`
    False gives a silent one, so callers never branch on it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )
