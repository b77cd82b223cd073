"""Lance datasets as stable-worldmodel writes them, read with pylance: `World.collect(path)` (its
default format) through LanceWriter in stable_worldmodel/data/formats/lance.py.

    raw = read_lance(Path("pusht_expert_train.lance"))   # RawTrajectories (columns.py)
    raw.frames[np.array([5, 0])]                          # (2, H, W, C) uint8, decoded on access

Layout: one row per step, episodes one after another; `episode_idx` and `step_idx` int32 (the
writer's own count, 0, 1, ... in every episode, so it cannot tell whether the reset frame was
stored); `pixels` one JPEG per row (quality 95); every other numeric column (`action`, `proprio`,
`state`, reward, ...) a fixed-size list of float32; '.' in a name is stored as '_'. The frames
lejepa reads are the decoded JPEGs, i.e. what the dataset holds. Actions are aligned as in the
HDF5 files (columns.py). Needs pylance (`pip install 'lejepa-cli[lance]'`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world.columns import (
    ACTION_KEYS, EPISODE_COLUMNS, STATE_KEYS, RawTrajectories, clean_actions, episode_starts, parse_actions, state_columns,
)

READ_COLUMNS = (*ACTION_KEYS, *STATE_KEYS, *EPISODE_COLUMNS)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # what a stored frame may be; never EPS (Pillow would run Ghostscript)


def _open(path: Path) -> Any:
    try:
        import lance
    except ImportError:
        raise UserError("reading Lance datasets needs pylance: pip install pylance (or pip install 'lejepa-cli[lance]')") from None
    try:
        return lance.dataset(str(path))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable Lance dataset ({str(e).split(',')[0]})") from None


def _decode(blob: bytes | None, path: Path, row: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """One stored image -> (H, W, C) uint8; C = 1 for a greyscale JPEG, else 3 (RGB)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(blob), formats=IMAGE_FORMATS) as img:
            grey = img.mode in ("L", "1") if shape is None else shape[-1] == 1
            array = np.asarray(img.convert("L" if grey else "RGB"))
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as e:
        raise UserError(f"{path}: the pixels of row {row} are not a readable image ({e})") from None
    array = array[..., None] if array.ndim == 2 else array
    if shape is not None and array.shape != shape:
        raise UserError(f"{path}: the frame of row {row} is {array.shape}, the first one {shape}; every frame needs one size")
    return array


class LanceFrames:
    """(T, H, W, C) uint8 frames of a Lance dataset's image column, decoded per access; the same
    interface as readers.FrameArray. Pickling sends the path, not the open dataset."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, path: Path, key: str, shape: tuple[int, int, int, int], dataset: Any = None):
        self._path, self._key, self.shape, self._dataset = path, key, shape, dataset

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        if self._dataset is None:
            self._dataset = _open(self._path)
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        if len(rows):
            blobs = self._dataset.take(rows.tolist(), columns=[self._key]).column(self._key).to_pylist()
            for i, (row, blob) in enumerate(zip(rows, blobs)):
                out[i] = _decode(blob, self._path, int(row), self.shape[1:])
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return self._rows(np.arange(len(self))[index])
        if isinstance(index, (int, np.integer)):
            return self._rows(np.arange(len(self))[[int(index)]])[0]
        idx = np.asarray(index, dtype=np.int64).ravel()
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} frames")
        unique, inverse = np.unique(idx, return_inverse=True)  # each stored image decoded once
        return self._rows(unique)[inverse]


def _column(table: Any, key: str) -> np.ndarray:
    """A numeric column as numpy: (T,) for scalars, (T, n) for fixed-size lists."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    if pa.types.is_fixed_size_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return np.asarray(col.to_pylist())
    return col.to_numpy(zero_copy_only=False)


def read_lance(path: Path) -> RawTrajectories:
    import pyarrow as pa

    ds = _open(path)
    names = list(ds.schema.names)
    if "pixels" not in names:
        raise UserError(f"{path} has no 'pixels' column (found: {', '.join(names) or 'nothing'}); stable-worldmodel's "
                        f"Lance layout has episode_idx, step_idx, pixels, action")
    kind = ds.schema.field("pixels").type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        raise UserError(f"{path}: 'pixels' holds {kind}, not encoded images (stable-worldmodel stores one JPEG per row)")
    T = ds.count_rows()
    if T == 0:
        raise UserError(f"{path} holds no frames")
    table = ds.to_table(columns=[c for c in READ_COLUMNS if c in names])
    first = _decode(ds.take([0], columns=["pixels"]).column("pixels")[0].as_py(), path, 0)
    frames = LanceFrames(path, "pixels", (T, *first.shape), ds)

    def get(key: str) -> np.ndarray | None:
        return _column(table, key) if key in table.column_names else None

    action_key = next((k for k in ACTION_KEYS if k in names), None)
    actions = parse_actions(get(action_key) if action_key else None, T, path)
    starts, how, _ = episode_starts(get, T, path)  # step_idx is the writer's count: it says nothing of the reset frame
    actions, zeroed = clean_actions(actions, starts, path)
    state, state_names = state_columns(get, T, path)
    others = sorted(set(names) - {"pixels", action_key, *READ_COLUMNS})
    return RawTrajectories(frames, actions, starts, state, state_names, "lance", zeroed, how, None, "as JPEG images", others)
