"""Reading the user's files: one boundary per file kind, where every read failure becomes one line.

    arrays = load_npz(path)                      # dict of every member, read now (no pickle)
    actions = load_npy(folder / "actions.npy")   # or mmap=True
    tensors = load_safetensors(path)             # safetensors_header(path) for the metadata only
    doc = load_json(path, "export config")       # load_yaml(path, "config")
    with open_h5(path) as f: ...
    pixels = load_image(path, "--goal")          # RGB uint8 array, never EPS (Ghostscript)

A missing file, a folder, a pipe or device (never opened: reading a FIFO would wait forever),
an unreadable or empty file, a truncated copy, a file of another kind: each is a `UserError`
naming the file and what is wrong with it. Nothing is ever loaded with pickle: an .npy or .npz
that would need it is reported as damaged or not plain arrays. `reading(path, what)` is the
boundary itself, for a reader this module does not wrap.
"""

from __future__ import annotations

import errno
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lejepa_cli.errors import UserError

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # never EPS (Ghostscript runs)
_DETAIL_CHARS = 120


def require_file(path: str | Path, what: str) -> Path:
    """`path` is an existing, readable, non-empty regular file (a `what`); returns it as a Path."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist (expected {what})") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}; expected {what})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is a folder, not {what}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is not a regular file (a pipe, socket or device), not {what}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path} cannot be read (permission denied; expected {what})")
    if st.st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): a damaged or unfinished copy of {what}")
    return path


def _detail(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.EACCES:
        return "permission denied"
    text = " ".join(str(error).split()) or error.__class__.__name__
    if "allow_pickle" in text or "pickle" in text.lower():
        return "not plain arrays (it would need pickle, which is never used)"
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


@contextmanager
def reading(path: str | Path, what: str, lead: str | None = None) -> Iterator[None]:
    """Any failure of the read inside the block (but a UserError) becomes one line naming `path`,
    starting with `lead` (default: "PATH is not a readable WHAT")."""
    lead = lead or f"{path} is not a readable {what}"
    try:
        yield
    except UserError:
        raise
    except MemoryError:
        raise UserError(f"{path} does not fit in memory (reading {what})") from None
    except Exception as e:  # noqa: BLE001  the boundary: a damaged file can fail in any library's way
        raise UserError(f"{lead} ({_detail(e)}): damaged, truncated or another kind of file") from None


def load_npz(path: str | Path, what: str = ".npz file") -> dict[str, Any]:
    """Every member of the .npz at `path`, read now (a truncated member fails here, not later)."""
    import numpy as np

    path = require_file(path, what)
    with reading(path, what):
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise UserError(f"{path} is a single .npy array, not {what} (an .npz archive of named arrays)")
            return {k: z[k] for k in z.files}


def npz_names(path: str | Path, what: str = ".npz file") -> list[str]:
    """The member names of the .npz at `path` (cheap: the archive's directory only)."""
    import numpy as np

    path = require_file(path, what)
    with reading(path, what):
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise UserError(f"{path} is a single .npy array, not {what} (an .npz archive of named arrays)")
            return list(z.files)


def load_npy(path: str | Path, what: str = ".npy file", *, mmap: bool = False) -> Any:
    """The array in the .npy at `path` (memory-mapped with `mmap`); never unpickled."""
    import numpy as np

    path = require_file(path, what)
    with reading(path, what):
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)  # truncated: ValueError here
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path} is an .npz archive, not {what}")
    return array


def load_safetensors(path: str | Path, what: str = "safetensors file", device: str = "cpu") -> dict[str, Any]:
    """Every tensor of the safetensors file at `path`."""
    from safetensors.torch import load_file

    from lejepa_cli.checkpoint import check_header

    path = require_file(path, what)
    check_header(path)  # a header claiming gigabytes, or longer than the file, is refused before parsing
    with reading(path, what):
        return load_file(str(path), device=device)


def safetensors_header(path: str | Path, what: str = "safetensors file") -> tuple[dict[str, str], list[str]]:
    """(metadata, tensor names) of the safetensors file at `path`, without reading the tensors."""
    from safetensors import safe_open

    from lejepa_cli.checkpoint import check_header

    path = require_file(path, what)
    check_header(path)
    with reading(path, what):
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), list(f.keys())


def load_json(path: str | Path, what: str = "JSON file") -> Any:
    import json

    path = require_file(path, what)
    with reading(path, what):
        return json.loads(path.read_text(encoding="utf-8"))


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    import yaml

    path = require_file(path, what)
    with reading(path, what):
        return yaml.safe_load(path.read_text(encoding="utf-8"))


def open_h5(path: str | Path, what: str = "HDF5 file", **kwargs: Any) -> Any:
    """The HDF5 file at `path`, open for reading (needs h5py)."""
    try:
        import h5py
    except ImportError:
        raise UserError("reading HDF5 files needs h5py: pip install h5py (or pip install 'lejepa-cli[hdf5]')") from None
    path = require_file(path, what)
    with reading(path, what):
        return h5py.File(path, "r", **kwargs)


def load_image(path: str | Path, what: str = "image", mode: str = "RGB") -> Any:
    """The image at `path` as a uint8 array in `mode` (decoded completely: a truncated file fails here)."""
    import numpy as np
    from PIL import Image

    path = require_file(path, what)
    with reading(path, what):
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            return np.asarray(im.convert(mode))
