"""Reading users' trajectory files: `.npz` arrays, HDF5 files as stable-worldmodel writes them
(the files LeWM's reference code trains on) and, through lance_reader.py, its Lance datasets.

    raw = read_trajectory_file(Path("tworoom.h5"))   # RawTrajectories (columns.py); frames stay lazy

.npz keys (one row per time step, episodes one after another):
    frames or pixels   (T, H, W), (T, H, W, C) or (T, C, H, W) uint8, C in {1, 3}
    actions or action  (T, A) float; a_t acts between frame t and t + 1; (T, 0) for a passive video
    episode_starts     (E,) or (E + 1,) row offsets of the episodes (first 0; optional last T), or
                       stable-worldmodel's names: ep_offset and/or ep_len, or one id per row in
                       ep_idx or episode_idx (each episode's rows together, in step order);
                       none of them: the whole file is one episode
    state              (T, S) float, optional true state; state_names (S,) strings, optional
HDF5, as stable-worldmodel writes it (`World.collect(..., format="hdf5")` through HDF5Writer in
stable_worldmodel/data/formats/hdf5.py; in early 2026 `World.record_dataset`): datasets `pixels`
(T, H, W, C), `action` (T, A), `ep_offset` + `ep_len` (early 2026: also `ep_idx`, one id per row),
`step_idx`, state from `state` and/or `proprio`; other columns (reward, goal, ...) are not read.
A dataset compressed with a plugin filter (early 2026: Blosc-LZ4 pixels) needs `hdf5plugin`,
imported only when a file asks for it. Needs h5py (`pip install 'lejepa-cli[hdf5]'` brings both).
Episode boundaries, step_idx and NaN action rows: columns.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.data.formats import FRAME_KEYS, H5_SUFFIXES, LANCE_SUFFIX, is_trajectory_file  # noqa: F401  (detection lives with the data layer)
from lejepa_cli.data.inputs import load_npz, open_h5
from lejepa_cli.errors import UserError
from lejepa_cli.world.columns import (  # noqa: F401  (RawTrajectories, ACTION_KEYS, STATE_KEYS: re-exported)
    ACTION_KEYS, EPISODE_COLUMNS, STATE_KEYS, RawTrajectories, clean_actions, episode_starts, parse_actions, parse_state,
    state_columns,
)

CHUNK_CACHE_BYTES = 64 << 20  # per HDF5 dataset: a compressed chunk of 100 frames is decoded once, not per frame
FILTER_NAMES = {1: "gzip", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset", 307: "BZip2",
                32000: "LZF", 32001: "Blosc", 32004: "LZ4", 32008: "Bitshuffle", 32013: "ZFP", 32015: "Zstandard",
                32026: "Blosc2"}
BLOSC_CODECS = ("BloscLZ", "LZ4", "LZ4HC", "Snappy", "Zlib", "Zstd")  # Blosc's cd_values[6]


class FrameArray:
    """(T, H, W, C) uint8 view of a numpy array or an h5py dataset, channels-last, gathered by index.

    h5py reads only sorted, unique indices, so fancy indices are sorted, read once, and
    scattered back. Pickling (to a DataLoader worker) sends the file path, not the data.
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, base: Any, channels_first: bool, grey: bool, path: Path | None = None, key: str | None = None):
        self._base, self._cf, self._grey = base, channels_first, grey
        self._path, self._key = path, key
        shape = tuple(int(s) for s in base.shape)
        if grey:
            shape = (*shape, 1)
        if channels_first:
            shape = (shape[0], shape[2], shape[3], shape[1])
        self.shape = shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._path is not None:
            state["_base"] = None
        return state

    def _array(self) -> Any:
        if self._base is None:
            base = _open_h5(self._path)[self._key]
            _require_filters(base, self._path, self._key)  # a fresh process registers hdf5plugin's filters again
            self._base = base
        return self._base

    def _fix(self, block: np.ndarray) -> np.ndarray:
        if self._grey:
            block = block[..., None]
        if self._cf:
            block = np.moveaxis(block, 1, -1)
        return np.ascontiguousarray(block, dtype=np.uint8)

    def _read(self, index: Any) -> np.ndarray:
        try:
            return self._fix(np.asarray(self._array()[index]))
        except OSError as e:  # a damaged chunk, a filter that fails: one line, not a traceback
            raise UserError(f"{self._path}: cannot read '{self._key}' ({str(e).splitlines()[0]})") from None

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return self._read(index)
        if isinstance(index, (int, np.integer)):
            return self._read(slice(int(index), int(index) + 1))[0]
        idx = np.asarray(index, dtype=np.int64).ravel()
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} frames")
        unique, inverse = np.unique(idx, return_inverse=True)
        if unique.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=np.uint8)
        return self._read(unique)[inverse]


def read_trajectory_file(path: Path, *, check_frames: bool = True) -> RawTrajectories:
    """The validated columns of an .npz, .h5/.hdf5 file or .lance dataset; check_frames=False
    describes an HDF5 file whose frames this process cannot decode instead of refusing it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in H5_SUFFIXES:
        return _read_h5(path, check_frames)
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == LANCE_SUFFIX:
        from lejepa_cli.world.lance_reader import read_lance

        return read_lance(path)
    raise UserError(f"{path.name} is not a trajectory file: give an .npz, an .h5/.hdf5 file or a .lance dataset")


def source_fingerprint(path: Path) -> str:
    """sha256 of a trajectory file's bytes; of a .lance folder, of its files' names and bytes."""
    from lejepa_cli.data.shards import sha256_file

    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}:{sha256_file(f)};".encode())
    return digest.hexdigest()


def _first(keys: Any, names: tuple[str, ...]) -> str | None:
    return next((k for k in names if k in keys), None)


def _read_npz(path: Path) -> RawTrajectories:
    arrays = load_npz(path)  # every member read now: a truncated or pickled one is one line here
    frame_key = _first(arrays, FRAME_KEYS)
    if frame_key is None and {"x_train", "images", "x"} & set(arrays):
        raise UserError(f"{path} is an image dataset: use an image preset (e.g. --preset demo), not a world preset")
    if frame_key is None:
        raise UserError(f"{path} has no 'frames' (or 'pixels') array (found: {', '.join(arrays) or 'nothing'})")
    frames = _frames(arrays[frame_key], path)
    T = len(frames)
    action_key = _first(arrays, ACTION_KEYS)
    actions = parse_actions(arrays[action_key] if action_key else None, T, path)
    starts, how, first = episode_starts(arrays.get, T, path)
    actions, zeroed = clean_actions(actions, starts, path)
    state = parse_state(arrays.get("state"), T, path, "state")
    names = None
    if "state_names" in arrays:
        names = [str(n) for n in np.asarray(arrays["state_names"]).ravel()]
        if state is None or len(names) != state.shape[1]:
            raise UserError(f"{path}: state_names has {len(names)} names for {0 if state is None else state.shape[1]} state columns")
    elif state is not None:
        names = [f"state_{i}" for i in range(state.shape[1])]
    others = sorted(set(arrays) - {frame_key, action_key, "state", "state_names", *EPISODE_COLUMNS})
    return RawTrajectories(frames, actions, starts, state, names, "npz", zeroed, how, first, "as an .npz array", others)


def _open_h5(path: Path) -> Any:
    return open_h5(path, rdcc_nbytes=CHUNK_CACHE_BYTES)


def _filters(dataset: Any) -> list[tuple[int, str]]:
    """(code, name) of every filter in an HDF5 dataset's pipeline, e.g. (32001, "Blosc-LZ4")."""
    plist = dataset.id.get_create_plist()
    found = []
    for i in range(plist.get_nfilters()):
        code, _, values, name = plist.get_filter(i)
        label = FILTER_NAMES.get(code) or name.decode(errors="replace") or f"filter {code}"
        if code == 32001 and len(values) > 6 and 0 <= values[6] < len(BLOSC_CODECS):
            label = f"Blosc-{BLOSC_CODECS[values[6]]}"
        found.append((code, label))
    return found


def _hdf5plugin() -> bool:
    """Import hdf5plugin (it registers its filters with HDF5); False when it is not installed."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        return False
    return True


def _missing_filters(dataset: Any) -> list[tuple[int, str]]:
    from h5py import h5z

    missing = [(c, name) for c, name in _filters(dataset) if not h5z.filter_avail(c)]
    if missing and _hdf5plugin():
        missing = [(c, name) for c, name in missing if not h5z.filter_avail(c)]
    return missing


def _require_filters(dataset: Any, path: Path, key: str) -> None:
    """A one-line UserError naming the filter and the package when `dataset` cannot be decoded here."""
    missing = _missing_filters(dataset)
    if missing:
        code, name = missing[0]
        fix = ("the installed hdf5plugin does not provide it" if _hdf5plugin()
               else "pip install hdf5plugin (or pip install 'lejepa-cli[hdf5]')")
        raise UserError(f"{path}: '{key}' is compressed with {name} (HDF5 filter {code}), which h5py decodes only "
                        f"with its plugin: {fix}")


def _read_h5(path: Path, check_frames: bool = True) -> RawTrajectories:
    f = _open_h5(path)
    keys = set(f.keys())
    if "pixels" not in keys:
        raise UserError(f"{path} has no 'pixels' dataset (found: {', '.join(sorted(keys)) or 'nothing'}); "
                        f"stable-worldmodel's HDF5 layout has pixels, action, ep_offset, ep_len, step_idx")
    pixels = f["pixels"]
    filters = [name for _, name in _filters(pixels)]
    storage = f"compressed with {' + '.join(filters)}" if filters else "uncompressed"
    if check_frames:
        _require_filters(pixels, path, "pixels")
    elif _missing_filters(pixels):
        storage += " (not decodable here: pip install hdf5plugin)"
    frames = _frames(pixels, path, h5=(path, "pixels"))
    T = len(frames)

    def get(key: str) -> np.ndarray | None:
        if key not in keys or not hasattr(f[key], "dtype"):  # absent, or a group
            return None
        _require_filters(f[key], path, key)
        return f[key][()]

    action_key = _first(keys, ACTION_KEYS)
    actions = parse_actions(get(action_key) if action_key else None, T, path)
    starts, how, first = episode_starts(get, T, path)
    actions, zeroed = clean_actions(actions, starts, path)
    state, names = state_columns(get, T, path)
    others = sorted(keys - {"pixels", action_key, *STATE_KEYS, *EPISODE_COLUMNS})
    return RawTrajectories(frames, actions, starts, state, names, "hdf5", zeroed, how, first, storage, others)


def _frames(array: Any, path: Path, h5: tuple[Path, str] | None = None) -> FrameArray:
    shape, dtype = tuple(array.shape), np.dtype(array.dtype)
    if dtype != np.uint8:
        raise UserError(f"{path}: frames must be uint8 (0-255), got {dtype}")
    if len(shape) not in (3, 4):
        raise UserError(f"{path}: frames must be (T, H, W[, C]) or (T, C, H, W), got shape {shape}")
    grey = len(shape) == 3
    channels_first = not grey and shape[-1] not in (1, 3) and shape[1] in (1, 3)
    if not grey and not channels_first and shape[-1] not in (1, 3):
        raise UserError(f"{path}: frames need 1 or 3 channels, got shape {shape}")
    if shape[0] == 0:
        raise UserError(f"{path} holds no frames")
    base = array if h5 is not None else np.asarray(array)
    return FrameArray(base, channels_first, grey, *(h5 or (None, None)))
