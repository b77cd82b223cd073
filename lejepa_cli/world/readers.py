"""Reading users' trajectory files: `.npz` arrays and HDF5 files in LeWM's published layout.

.npz keys (one row per time step, episodes one after another):
    frames or pixels   (T, H, W), (T, H, W, C) or (T, C, H, W) uint8, C in {1, 3}
    actions or action  (T, A) float; a_t acts between frame t and t + 1; (T, 0) for a passive video
    episode_starts     (E,) or (E + 1,) row offsets of the episodes (first 0; optional last T), or
    episode_idx        (T,) episode id of every row (each episode's rows together, in step order);
                       neither: the whole file is one episode
    state              (T, S) float, optional true state; state_names (S,) strings, optional
HDF5 (LeWM / stable-worldmodel layout): datasets `pixels`, `action`, and `ep_offset` + `ep_len`
or `episode_idx` (with `step_idx` checked for order); state from `state` and/or `proprio`.
Reading HDF5 needs h5py (`pip install 'lejepa-cli[hdf5]'`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.data.formats import FRAME_KEYS, H5_SUFFIXES, is_trajectory_file  # noqa: F401  (detection lives with the data layer)
from lejepa_cli.errors import UserError

ACTION_KEYS = ("actions", "action")
STATE_KEYS = ("state", "proprio")


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
            self._base = _open_h5(self._path)[self._key]
        return self._base

    def _fix(self, block: np.ndarray) -> np.ndarray:
        if self._grey:
            block = block[..., None]
        if self._cf:
            block = np.moveaxis(block, 1, -1)
        return np.ascontiguousarray(block, dtype=np.uint8)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            return self._fix(np.asarray(self._array()[index]))
        if isinstance(index, (int, np.integer)):
            return self._fix(np.asarray(self._array()[int(index) : int(index) + 1]))[0]
        idx = np.asarray(index, dtype=np.int64).ravel()
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} frames")
        unique, inverse = np.unique(idx, return_inverse=True)
        if unique.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=np.uint8)
        return self._fix(np.asarray(self._array()[unique]))[inverse]


@dataclass
class RawTrajectories:
    """What a trajectory file holds, validated; frames stay lazy for HDF5."""

    frames: FrameArray  # (T, H, W, C) uint8
    actions: np.ndarray  # (T, A) float32
    episode_starts: np.ndarray  # (E + 1,) int64
    state: np.ndarray | None  # (T, S) float32
    state_names: list[str] | None
    kind: str  # "npz" or "hdf5"


def read_trajectory_file(path: Path) -> RawTrajectories:
    path = Path(path)
    if path.suffix.lower() in H5_SUFFIXES:
        return _read_h5(path)
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    raise UserError(f"{path.name} is not a trajectory file: give an .npz or an .h5/.hdf5 file")


def _first(keys: Any, names: tuple[str, ...]) -> str | None:
    return next((k for k in names if k in keys), None)


def _read_npz(path: Path) -> RawTrajectories:
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}  # members load lazily: refuse object (pickled) arrays here
        z.close()
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npz file ({str(e).splitlines()[0]})") from None
    frame_key = _first(arrays, FRAME_KEYS)
    if frame_key is None and {"x_train", "images", "x"} & set(arrays):
        raise UserError(f"{path} is an image dataset: use an image preset (e.g. --preset demo), not a world preset")
    if frame_key is None:
        raise UserError(f"{path} has no 'frames' (or 'pixels') array (found: {', '.join(arrays) or 'nothing'})")
    frames = _frames(arrays[frame_key], path)
    action_key = _first(arrays, ACTION_KEYS)
    actions = _actions(arrays[action_key] if action_key else None, len(frames), path)
    starts = _starts(arrays.get("episode_starts"), arrays.get("episode_idx"), arrays.get("step_idx"), len(frames), path)
    state = _state(arrays.get("state"), len(frames), path, "state")
    names = None
    if "state_names" in arrays:
        names = [str(n) for n in np.asarray(arrays["state_names"]).ravel()]
        if state is None or len(names) != state.shape[1]:
            raise UserError(f"{path}: state_names has {len(names)} names for {0 if state is None else state.shape[1]} state columns")
    elif state is not None:
        names = [f"state_{i}" for i in range(state.shape[1])]
    return RawTrajectories(frames, actions, starts, state, names, "npz")


def _open_h5(path: Path) -> Any:
    try:
        import h5py
    except ImportError:
        raise UserError("reading HDF5 files needs h5py: pip install h5py (or pip install 'lejepa-cli[hdf5]')") from None
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e})") from None


def _read_h5(path: Path) -> RawTrajectories:
    f = _open_h5(path)
    keys = set(f.keys())
    if "pixels" not in keys:
        raise UserError(f"{path} has no 'pixels' dataset (found: {', '.join(sorted(keys)) or 'nothing'}); LeWM's layout has pixels, action, episode_idx, step_idx")
    pixels = f["pixels"]
    frames = _frames(pixels, path, h5=(path, "pixels"))
    T = len(frames)
    action_key = _first(keys, ACTION_KEYS)
    actions = _actions(f[action_key][()] if action_key else None, T, path)

    def small(key: str) -> np.ndarray | None:
        return f[key][()] if key in keys else None

    starts_given = None
    if "ep_offset" in keys:
        starts_given = np.asarray(small("ep_offset"), dtype=np.int64).ravel()
        if "ep_len" in keys:
            lengths = np.asarray(small("ep_len"), dtype=np.int64).ravel()
            if lengths.shape != starts_given.shape or np.any(starts_given + lengths != np.append(starts_given[1:], T)):
                raise UserError(f"{path}: ep_offset and ep_len do not tile the {T} rows (episodes must be stored one after another)")
    starts = _starts(starts_given, small("episode_idx"), small("step_idx"), T, path)
    columns = [(k, _state(small(k), T, path, k)) for k in STATE_KEYS if k in keys]
    state = np.concatenate([c for _, c in columns], axis=1) if columns else None
    names = [f"{k}_{i}" for k, c in columns for i in range(c.shape[1])] if columns else None
    return RawTrajectories(frames, actions, starts, state, names, "hdf5")


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


def _actions(actions: np.ndarray | None, T: int, path: Path) -> np.ndarray:
    if actions is None:
        raise UserError(f"{path} has no 'actions' (or 'action') array; for a passive video give actions of shape (T, 0)")
    actions = np.asarray(actions)
    if actions.ndim == 1:
        actions = actions[:, None]
    if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.number):
        raise UserError(f"{path}: actions must be a (T, A) number array, got {actions.dtype} {actions.shape}")
    if len(actions) != T:
        raise UserError(f"{path}: {T} frames but {len(actions)} actions; give one action per frame (a_t acts between frame t and t + 1)")
    actions = actions.astype(np.float32)
    bad = ~np.isfinite(actions).all(axis=1)
    if bad.any():
        raise UserError(f"{path}: actions hold NaN or inf (first at row {int(np.flatnonzero(bad)[0])}); fix or drop those steps")
    return actions


def _state(state: np.ndarray | None, T: int, path: Path, key: str) -> np.ndarray | None:
    if state is None:
        return None
    state = np.asarray(state)
    if state.ndim == 1:
        state = state[:, None]
    if state.ndim != 2 or len(state) != T or not np.issubdtype(state.dtype, np.number):
        raise UserError(f"{path}: '{key}' must be a (T, S) number array with T = {T} rows, got {state.dtype} {state.shape}")
    state = state.astype(np.float32)
    if not np.isfinite(state).all():
        raise UserError(f"{path}: '{key}' holds NaN or inf")
    return state


def _starts(starts: Any, episode_idx: Any, step_idx: Any, T: int, path: Path) -> np.ndarray:
    """(E + 1,) episode offsets from explicit starts, a per-row episode id, or one episode."""
    if starts is not None:
        starts = np.asarray(starts).ravel()
        if not np.issubdtype(starts.dtype, np.integer):
            raise UserError(f"{path}: episode_starts must be integers, got {starts.dtype}")
        starts = starts.astype(np.int64)
        if starts.size == 0 or starts[-1] != T:
            starts = np.append(starts, T)
        if starts[0] != 0 or np.any(np.diff(starts) <= 0):
            raise UserError(f"{path}: episode_starts must start at 0 and increase strictly up to the {T} rows, got {starts[:8].tolist()}...")
    elif episode_idx is not None:
        ep = np.asarray(episode_idx).ravel()
        if len(ep) != T:
            raise UserError(f"{path}: episode_idx has {len(ep)} rows for {T} frames")
        change = np.flatnonzero(ep[1:] != ep[:-1]) + 1
        starts = np.concatenate([[0], change, [T]]).astype(np.int64)
        if len(np.unique(ep)) != len(starts) - 1:
            raise UserError(f"{path}: the rows of an episode are not together; sort the rows by episode_idx, then step_idx")
    else:
        starts = np.array([0, T], dtype=np.int64)
    if step_idx is not None:
        step = np.asarray(step_idx).ravel()
        if len(step) != T:
            raise UserError(f"{path}: step_idx has {len(step)} rows for {T} frames")
        inside = np.ones(T, dtype=bool)
        inside[starts[:-1]] = False  # the first row of each episode may restart the count
        if np.any((np.diff(step, prepend=step[0]) <= 0) & inside):
            raise UserError(f"{path}: step_idx is not increasing within an episode; sort the rows by episode_idx, then step_idx")
    return starts
