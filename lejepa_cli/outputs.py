"""Every file the tool writes goes through here: checked before the work, never destructive, atomic.

    path = check_output_file(json_file, "--json", overwrite=overwrite, suffixes=REPORT_SUFFIXES, report="probe")
    ...  # the minutes of work
    write_report(report, path, "probe")              # JSON with the REPORT_MARKER key, atomically

    with atomic_output(path) as tmp:                 # any other writer: write `tmp`, it becomes `path`
        fig.savefig(tmp)

`check_output_file` / `check_output_folder` raise a one-line `UserError` naming the option
when the path could not be written later: a file path that is a folder, a folder path that is
a file, a name whose extension the writer cannot produce, an existing file that is not the
command's own earlier output (without `--overwrite`), or a place where nothing can be created
(read-only disk, no permission). Missing parent folders are fine (they are created when
writing), as long as the nearest existing one is writable. Writability is tried for real (a
temporary file created and removed), because `os.access` says yes to root on a read-only bind
mount.

`atomic_output` writes through a temporary file in the same folder (same extension, so
matplotlib and Pillow pick the format from it) renamed over the target only once complete: a
full disk or a crash leaves the old file as it was and no temporary file behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from lejepa_cli.errors import RunFailed, UserError

REPORT_MARKER = "lejepa_report"  # key of every JSON report: the command that wrote it ("probe", "world plan", ...)
REPORT_SUFFIXES = (".json",)
# matplotlib's canvases that need nothing beyond matplotlib and Pillow (not .pgf: LaTeX; not raw buffers).
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".eps", ".ps")
# Pillow formats that store an RGB strip; .gif also the animation.
STRIP_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
OWN_SOFTWARE = "lejepa-cli"  # the Software (PNG) / comment (GIF) text of the images the tool writes
_REPORT_READ_LIMIT = 64 * 2**20  # an own report is a few KiB to a few MiB; anything larger is not one
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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


def is_own_report(path: Path, command: str) -> bool:
    """`path` is a JSON report `command` wrote earlier (its name ends in .json and it carries REPORT_MARKER)."""
    try:
        if path.suffix.lower() != ".json" or not path.is_file() or path.stat().st_size > _REPORT_READ_LIMIT:
            return False
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get(REPORT_MARKER) == command


def is_own_image(path: Path) -> bool:
    """`path` is a PNG / GIF this tool drew earlier (its Software or comment text says so)."""
    try:
        from PIL import Image

        with Image.open(path, formats=("PNG", "GIF")) as im:
            text = im.info.get("Software") or im.info.get("comment") or ""
    except Exception:  # not an image, not readable: not ours  # noqa: BLE001
        return False
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return text.startswith(OWN_SOFTWARE)


def _is_own(path: Path, report: str | None) -> bool:
    return is_own_report(path, report) if report is not None else is_own_image(path)


def _check_suffix(path: Path, option: str, suffixes: Sequence[str] | None) -> None:
    if suffixes is not None and path.suffix.lower() not in suffixes:
        got = f"'{path.suffix}'" if path.suffix else "no extension"
        raise UserError(f"{option} {path}: cannot write {got}; give a name ending in {', '.join(suffixes)}")


def _check_existing(path: Path, option: str, overwrite: bool, report: str | None) -> None:
    """`path` exists: replaceable only when a plain file that is our own earlier output or --overwrite says so."""
    try:
        mode = path.stat().st_mode
    except OSError:  # a link to nothing (or to a place that cannot be read)
        raise UserError(f"{option} {path} is a broken link; choose another path") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{option} {path} exists and is not a regular file; choose another path")
    if not overwrite and not _is_own(path, report):
        raise UserError(f"{option} {path} already exists; pass --overwrite to replace it, or choose another path")
    reason = writable_folder(path.parent)
    if reason is None and not os.access(path, os.W_OK):
        reason = "the file is read-only"
    if reason is not None:
        raise UserError(f"{option} {path} cannot be replaced ({reason}); choose another path")


def check_output_file(path: str | Path, option: str, *, overwrite: bool = False,
                      suffixes: Sequence[str] | None = None, report: str | None = None) -> Path:
    """`path` can be written as a file; returns it as a Path.

    An existing file is replaced only with `overwrite`, or when it is the command's own earlier
    output: the JSON report of command `report` (see `is_own_report`), or, with `report` None, an
    image this tool drew. `suffixes` (lower case, with the dot) are the extensions the writer can
    produce."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder; give a file path")
    _check_suffix(path, option, suffixes)
    if path.exists() or path.is_symlink():
        _check_existing(path, option, overwrite, report)
        return path
    _check_creatable(path, option)
    return path


def check_output_folder(path: str | Path, option: str, *, files: Sequence[str] = (), overwrite: bool = False) -> Path:
    """Files can be written into the folder `path` (created later if missing); returns it.

    `files` are the names the command writes there: an existing one that is not the tool's own
    earlier image is replaced only with `overwrite`."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{option} {path} is a file; give a folder")
        reason = writable_folder(path)
        if reason is not None:
            raise UserError(f"{option} {path}: cannot write in it ({reason}); choose another folder")
        for name in files:
            if (path / name).exists() or (path / name).is_symlink():
                _check_existing(path / name, f"{option} {path}:", overwrite, None)
        return path
    _check_creatable(path, option)
    return path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` (same extension); once the block ends without an error
    it replaces `path`. On any error the temporary file is removed and `path` is left as it was;
    an OSError (full disk, ...) is raised again naming `path`, not the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # as a plain open() would have created it, not mkstemp's 0600
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_report(report: dict[str, Any], path: str | Path, command: str, *, allow_nan: bool = False) -> Path:
    """`report` as JSON at `path` with REPORT_MARKER = `command` (so a later run of the same command
    may replace it), written atomically. Check the path with `check_output_file` before the work."""
    path = Path(path)
    text = json.dumps({REPORT_MARKER: command, **report}, indent=2, allow_nan=allow_nan) + "\n"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def save_figure(fig, path: str | Path, **savefig_kw) -> Path:
    """A matplotlib figure at `path`, atomically, in the format its extension names (PNGs marked as
    this tool's, so a later run may replace them without --overwrite)."""
    path = Path(path)
    metadata = {"Software": OWN_SOFTWARE} if savefig_kw.get("format", path.suffix.lower().lstrip(".")) == "png" else None
    with atomic_output(path) as tmp:
        fig.savefig(tmp, metadata=metadata, **savefig_kw)
    return path


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors' save_file, atomically; its write errors (a full disk) become one line naming `path`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as e:
        raise RunFailed(f"could not write {path}: {' '.join(str(e).split())}") from None
    return path
