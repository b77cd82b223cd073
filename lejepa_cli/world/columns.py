"""The columns of a raw trajectory file, checked the same way for every format (readers.py reads
.npz and HDF5, lance_reader.py Lance datasets; both hand their arrays to the functions here).

    starts, how = episode_starts(lambda key: arrays.get(key), T, path)   # (E + 1,) offsets
    actions, zeroed = clean_actions(actions, starts, path)                # NaN end-of-episode rows -> 0

Episodes come from the first of these that the file holds: `episode_starts` (lejepa's .npz),
`ep_offset` and/or `ep_len` (stable-worldmodel's HDF5 writers), `ep_idx` (one id per row: its
HDF5 writer of early 2026, next to ep_offset / ep_len) or `episode_idx` (one id per row: its Lance
writer). `step_idx`, when present, must increase inside each episode; its first value per
episode says whether the reset frame was stored (0) or dropped (1, stable-worldmodel 0.1.1).

Actions: row t acts between frame t and frame t + 1. stable-worldmodel's writers store each
step's action with the frame it leads to and then move every episode's action column up one row
(`World.collect` in stable_worldmodel/world/world.py), so an episode's last row holds the reset's
placeholder: NaN in the current and early-2026 writers (LeWM's train.py zeroes it), the episode's
first action in 0.1.1 (whose reset frame is not stored). That row leads out of the episode and no
window feeds it to the predictor; NaN / inf there becomes 0. NaN anywhere else is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lejepa_cli.errors import UserError

ACTION_KEYS = ("actions", "action")
STATE_KEYS = ("state", "proprio")
ROW_EPISODE_KEYS = ("ep_idx", "episode_idx")  # one episode id per row, in the order they are tried
EPISODE_COLUMNS = ("episode_starts", "ep_offset", "ep_len", "step_idx", *ROW_EPISODE_KEYS)


@dataclass
class RawTrajectories:
    """What a trajectory file holds, validated; frames stay lazy for HDF5 and Lance."""

    frames: Any  # (T, H, W, C) uint8: a FrameArray (readers.py) or LanceFrames (lance_reader.py)
    actions: np.ndarray  # (T, A) float32
    episode_starts: np.ndarray  # (E + 1,) int64
    state: np.ndarray | None  # (T, S) float32
    state_names: list[str] | None
    kind: str  # "npz", "hdf5" or "lance"
    zeroed_rows: int = 0  # end-of-episode action rows that held NaN / inf and now hold 0
    episodes_from: str = "one episode"  # the column(s) the episode boundaries came from
    first_step_idx: int | None = None  # step_idx of every episode's first row, when the file has one and they agree
    frame_storage: str = "uncompressed"  # how the file stores its frames (compression, JPEG)
    other_columns: list[str] = field(default_factory=list)  # columns lejepa does not read


def episode_starts(get: Callable[[str], Any], T: int, path: Path) -> tuple[np.ndarray, str, int | None]:
    """(E + 1,) row offsets, the name of the column(s) they came from, and the first step_idx of
    every episode when step_idx is present and they all agree (else None).

    `get(key)` returns the array stored under key, or None when the file has none.
    """
    offsets, lengths = get("ep_offset"), get("ep_len")
    row_key = next((k for k in ROW_EPISODE_KEYS if get(k) is not None), None)
    if get("episode_starts") is not None:
        starts, how = _from_offsets(get("episode_starts"), T, path, "episode_starts"), "episode_starts"
    elif offsets is not None or lengths is not None:
        starts, how = _from_ep_offset(offsets, lengths, T, path)
        if row_key is not None:  # the early-2026 writer stores both: they must agree
            per_row = _from_row_ids(get(row_key), T, path, row_key)
            if not np.array_equal(per_row, starts):
                raise UserError(f"{path}: {row_key} and {how} disagree about where episodes start "
                                f"({per_row[:6].tolist()}... vs {starts[:6].tolist()}...)")
            how = f"{how}; {row_key} agrees"
    elif row_key is not None:
        starts, how = _from_row_ids(get(row_key), T, path, row_key), row_key
    else:
        starts, how = np.array([0, T], dtype=np.int64), "one episode"
    first = None
    step_idx = get("step_idx")
    if step_idx is not None:
        first = _check_step_order(step_idx, starts, T, path, row_key or "episode")
    return starts, how, first


def _from_offsets(starts: Any, T: int, path: Path, key: str) -> np.ndarray:
    starts = np.asarray(starts).ravel()
    if not np.issubdtype(starts.dtype, np.integer):
        raise UserError(f"{path}: {key} must be integers, got {starts.dtype}")
    starts = starts.astype(np.int64)
    if starts.size == 0 or starts[-1] != T:
        starts = np.append(starts, T)
    if starts[0] != 0 or np.any(np.diff(starts) <= 0):
        raise UserError(f"{path}: {key} must start at 0 and increase strictly up to the {T} rows, got {starts[:8].tolist()}...")
    return starts


def _from_ep_offset(offsets: Any, lengths: Any, T: int, path: Path) -> tuple[np.ndarray, str]:
    if lengths is None:
        return _from_offsets(offsets, T, path, "ep_offset"), "ep_offset"
    lengths = np.asarray(lengths).ravel()
    if not np.issubdtype(lengths.dtype, np.integer):
        raise UserError(f"{path}: ep_len must be integers, got {lengths.dtype}")
    lengths = lengths.astype(np.int64)
    if offsets is None:
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        how = "ep_len"
    else:
        offsets, how = np.asarray(offsets, dtype=np.int64).ravel(), "ep_offset / ep_len"
    if lengths.shape != offsets.shape or np.any(offsets + lengths != np.append(offsets[1:], T)):
        raise UserError(f"{path}: ep_offset and ep_len do not tile the {T} rows (episodes must be stored one after another)")
    return _from_offsets(offsets, T, path, "ep_offset"), how


def _from_row_ids(ids: Any, T: int, path: Path, key: str) -> np.ndarray:
    ep = np.asarray(ids).ravel()
    if len(ep) != T:
        raise UserError(f"{path}: {key} has {len(ep)} rows for {T} frames")
    change = np.flatnonzero(ep[1:] != ep[:-1]) + 1
    starts = np.concatenate([[0], change, [T]]).astype(np.int64)
    if len(np.unique(ep)) != len(starts) - 1:
        raise UserError(f"{path}: the rows of an episode are not together; sort the rows by {key}, then step_idx")
    return starts


def _check_step_order(step_idx: Any, starts: np.ndarray, T: int, path: Path, key: str) -> int | None:
    step = np.asarray(step_idx).ravel()
    if len(step) != T:
        raise UserError(f"{path}: step_idx has {len(step)} rows for {T} frames")
    inside = np.ones(T, dtype=bool)
    inside[starts[:-1]] = False  # the first row of each episode may restart the count
    if np.any((np.diff(step, prepend=step[0]) <= 0) & inside):
        raise UserError(f"{path}: step_idx is not increasing within an episode; sort the rows by {key}, then step_idx")
    first = np.unique(step[starts[:-1]])
    return int(first[0]) if len(first) == 1 else None


def parse_actions(actions: Any, T: int, path: Path) -> np.ndarray:
    """(T, A) float32 from a (T,) or (T, A) number array; NaN / inf left for clean_actions."""
    if actions is None:
        raise UserError(f"{path} has no 'actions' (or 'action') array; for a passive video give actions of shape (T, 0)")
    actions = np.asarray(actions)
    if actions.ndim == 1:
        actions = actions[:, None]
    if actions.ndim != 2 or not np.issubdtype(actions.dtype, np.number):
        raise UserError(f"{path}: actions must be a (T, A) number array, got {actions.dtype} {actions.shape}")
    if len(actions) != T:
        raise UserError(f"{path}: {T} frames but {len(actions)} actions; give one action per frame (a_t acts between frame t and t + 1)")
    return actions.astype(np.float32)


def clean_actions(actions: np.ndarray, starts: np.ndarray, path: Path) -> tuple[np.ndarray, int]:
    """Actions with NaN / inf rows at an episode's end set to 0, and how many rows that was.

    A non-finite row anywhere else is a one-line UserError naming the row, its episode and step.
    """
    bad = ~np.isfinite(actions).all(axis=1)
    if not bad.any():
        return actions, 0
    last = np.zeros(len(actions), dtype=bool)
    last[starts[1:] - 1] = True
    inside = np.flatnonzero(bad & ~last)
    if inside.size:
        row = int(inside[0])
        e = int(np.searchsorted(starts, row, side="right")) - 1
        step, length = row - int(starts[e]), int(starts[e + 1] - starts[e])
        hint = ("a NaN first row means each row holds the action that led TO its frame: move every episode's actions "
                "up one row (a_t acts between frame t and t + 1)") if step == 0 else "fix or drop those steps"
        raise UserError(f"{path}: actions hold NaN or inf (first at row {row}) at step {step} of episode {e} ({length} "
                        f"steps); only an episode's last action row may (stable-worldmodel's placeholder, zeroed); {hint}")
    actions = actions.copy()
    actions[bad] = 0.0
    return actions, int(bad.sum())


def zeroed_note(rows: int) -> str:
    """The one line that reports zeroed action rows (prepare, train, data info)."""
    return (f"{rows} end-of-episode action row{'s' if rows != 1 else ''} held NaN or inf (stable-worldmodel's placeholder "
            f"after an episode's last frame) and {'were' if rows != 1 else 'was'} set to 0, as LeWM's train.py does")


def parse_state(state: Any, T: int, path: Path, key: str) -> np.ndarray | None:
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


def state_columns(get: Callable[[str], Any], T: int, path: Path) -> tuple[np.ndarray | None, list[str] | None]:
    """The `state` and `proprio` columns side by side (T, S), named key_i; (None, None) without either."""
    columns = [(k, parse_state(get(k), T, path, k)) for k in STATE_KEYS if get(k) is not None]
    if not columns:
        return None, None
    return np.concatenate([c for _, c in columns], axis=1), [f"{k}_{i}" for k, c in columns for i in range(c.shape[1])]
