"""Output paths checked before the work: an hour of probing must not end in "permission denied".

`check_output_file` / `check_output_folder` raise a one-line `UserError` naming the option
when the path could not be written later: a file path that is a folder, a folder path that is
a file, or a place where nothing can be created (read-only disk, no permission). Missing parent
folders are fine (they are created when writing), as long as the nearest existing one is
writable. Writability is tried for real (a temporary file created and removed), because
`os.access` says yes to root on a read-only bind mount.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lejepa_cli.errors import UserError


def writable_folder(folder: Path) -> str | None:
    """None when a file can be created in the existing `folder`, else the reason it cannot."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".lejepa-write-test-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists():
            return parent
    return Path(".")


def _check_creatable(path: Path, option: str) -> None:
    """`path` does not exist yet: its nearest existing ancestor must be a writable folder."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"{option} {path}: {base} is a file, not a folder")
    reason = writable_folder(base)
    if reason is not None:
        raise UserError(f"{option} {path}: cannot write in {base} ({reason}); choose another path")


def check_output_file(path: str | Path, option: str) -> Path:
    """`path` can be (over)written as a file; returns it as a Path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path")
    if path.exists():
        reason = writable_folder(path.parent)
        if reason is None and not os.access(path, os.W_OK):
            reason = "the file is read-only"
        if reason is not None:
            raise UserError(f"{option} {path} cannot be replaced ({reason}); choose another path")
        return path
    _check_creatable(path, option)
    return path


def check_output_folder(path: str | Path, option: str) -> Path:
    """Files can be written into the folder `path` (created later if missing); returns it."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {path} is a file; give a folder")
        reason = writable_folder(path)
        if reason is not None:
            raise UserError(f"{option} {path}: cannot write in it ({reason}); choose another folder")
        return path
    _check_creatable(path, option)
    return path
