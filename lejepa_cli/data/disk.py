"""Free space before a command writes: refuse in one line rather than fill the disk halfway.

    from lejepa_cli.data.disk import require_space
    require_space(out, episodes * steps * size * size * 3, "the trajectory dataset")  # UserError if short

`world simulate`, `data prepare`, `embed` and `export` call it with the bytes they will write
(frames x H x W x C, N x D x 4, the weights' size) before they write anything.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lejepa_cli.errors import UserError

# Room kept free beyond the estimate: index files, temp copies and what the filesystem reserves.
MARGIN = 16 << 20


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def free_bytes(path: Path) -> tuple[int | None, Path]:
    """(free bytes, the existing folder measured) on the filesystem that will hold `path`; None
    for the bytes on a pseudo-filesystem (/proc, /sys: no size, and writing there fails anyway)."""
    folder = Path(path).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        folder = folder.parent
    usage = shutil.disk_usage(folder)
    return (usage.free if usage.total else None), folder


def require_space(path: Path, need: int, what: str, *, replaces: int = 0) -> None:
    """Refuse (UserError) when the filesystem of `path` has not `need` bytes (+ MARGIN) free.

    `what` names what is written ("the embeddings"); `replaces`: bytes of files there that the
    write deletes first (an --overwrite), which count as free.
    """
    free, folder = free_bytes(path)
    if free is not None and need + MARGIN > free + replaces:
        raise UserError(f"{what} needs about {_size(need)} but {folder} has {_size(free + replaces)} free: "
                        f"free some space or write to another disk")


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist): what replacing it frees."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for f in path.rglob("*") if path.is_dir() else ():
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            pass
    return total
