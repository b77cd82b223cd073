"""TrajectoryDataset: episodes of frames, actions and (optionally) true state, and their windows.

    ds = load_trajectories("worlds/two-room", "train")  # prepared folder, .npz, .h5 or .lance
    val = load_trajectories("tworoom.h5", "val", val_fraction=0.1)   # a raw file's held-out episodes
    starts = require_windows(ds, num_frames=4, frameskip=5)   # (W,) valid window starts
    frames, actions, state = ds.windows(starts[:32], 4, 5)
    # frames (32, 4, R, R, C) uint8; actions (32, 4, 5 * A) raw; state (32, 4, S) or None

A window of `num_frames` frames taken every `frameskip` steps starts at row t when every frame
t + k * frameskip (k < num_frames) and every action t .. t + num_frames * frameskip - 1 lie in
t's episode, so windows never cross an episode end. Action block k concatenates the
`frameskip` actions a_{t+k*fs} .. a_{t+k*fs+fs-1} that lead from window frame k to frame k + 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from lejepa_cli.data.dataset import ImageArray, channel_stats
from lejepa_cli.data.formats import is_trajectory_source  # noqa: F401  (re-exported: where world code looks for it)
from lejepa_cli.data.inputs import load_npy
from lejepa_cli.errors import UserError


@dataclass
class TrajectoryDataset:
    frames: ImageArray  # (T_total, R, R, C) uint8, all episodes of one split concatenated
    actions: np.ndarray  # (T_total, A) float32 raw; a_t acts between frame t and frame t + 1
    episode_starts: np.ndarray  # (E + 1,) int64; episode e is rows [starts[e], starts[e + 1])
    state: np.ndarray | None = None  # (T_total, S) float32 true simulator state (probes only)
    state_names: list[str] | None = None
    mean: Sequence[float] = (0.5,)  # per-channel pixel mean/std in [0, 1] units, TRAIN split
    std: Sequence[float] = (0.25,)
    action_mean: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (A,) TRAIN split
    action_std: np.ndarray = field(default_factory=lambda: np.ones(0, np.float32))  # (A,) >= 1e-6
    name: str = ""
    fingerprint: str = ""
    world: str | None = None
    world_options: dict | None = None
    zeroed_rows: int = 0  # raw files: end-of-episode action rows read as NaN / inf and set to 0

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def channels(self) -> int:
        return int(self.frames.shape[-1])

    @property
    def resolution(self) -> int:
        return int(self.frames.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def state_dim(self) -> int:
        return 0 if self.state is None else int(self.state.shape[1])

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_starts)

    def window_starts(self, num_frames: int, frameskip: int) -> np.ndarray:
        """(W,) int64 rows t whose window of num_frames frames every frameskip steps (and all its
        actions) lies inside t's episode; empty when no episode is long enough."""
        if num_frames < 1 or frameskip < 1:
            raise UserError(f"num_frames and frameskip must be >= 1, got {num_frames} and {frameskip}")
        span = num_frames * frameskip
        starts, ends = self.episode_starts[:-1], self.episode_starts[1:]
        counts = np.maximum(ends - starts - span + 1, 0)  # (E,) windows per episode
        if counts.sum() == 0:
            return np.zeros(0, dtype=np.int64)
        first = np.repeat(starts, counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        return (first + offset).astype(np.int64)

    def windows(self, starts: np.ndarray, num_frames: int, frameskip: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Frames (B, F, R, R, C) uint8, actions (B, F, frameskip * A) float32 raw, state (B, F, S) or None."""
        starts = np.asarray(starts, dtype=np.int64)
        B, F, A = len(starts), num_frames, self.action_dim
        rows = starts[:, None] + frameskip * np.arange(F)  # (B, F) frame rows
        frames = self.frames[rows.ravel()].reshape(B, F, *self.frames.shape[1:])
        action_rows = rows[:, :, None] + np.arange(frameskip)  # (B, F, fs)
        actions = self.actions[action_rows.ravel()].reshape(B, F, frameskip * A)
        state = None if self.state is None else self.state[rows.ravel()].reshape(B, F, -1)
        return frames, np.ascontiguousarray(actions, dtype=np.float32), state


def require_windows(ds: TrajectoryDataset, num_frames: int, frameskip: int) -> np.ndarray:
    """`ds.window_starts(...)`, or a one-line UserError naming the shortest episode when empty."""
    starts = ds.window_starts(num_frames, frameskip)
    if len(starts) == 0:
        lengths = ds.episode_lengths()
        if len(lengths) == 0:
            raise UserError(f"{ds.name or 'the dataset'} holds no episodes")
        shortest = int(np.argmin(lengths))
        raise UserError(
            f"{ds.name or 'the dataset'}: no episode is long enough for one window of {num_frames} frames every "
            f"{frameskip} steps ({num_frames * frameskip} steps, actions included); the longest has "
            f"{int(lengths.max())} steps, the shortest (episode {shortest}) {int(lengths[shortest])}; lower the "
            f"history, frameskip or predicted steps, or record longer episodes"
        )
    return starts


def split_episodes(num_episodes: int, val_fraction: float, seed: int, flag: str = "--val-fraction") -> dict[str, np.ndarray]:
    """Episode ids per split: a seeded random `val_fraction` of the episodes (at least one) as 'val'."""
    ids = np.arange(num_episodes)
    if val_fraction <= 0:
        return {"train": ids}
    n_val = max(1, int(round(num_episodes * val_fraction)))
    if n_val >= num_episodes:
        raise UserError(f"{flag} {val_fraction} of {num_episodes} episodes leaves none to train on; lower it or give more episodes")
    val = np.sort(np.random.default_rng(seed).permutation(num_episodes)[:n_val])
    return {"train": np.setdiff1d(ids, val), "val": val}


def load_trajectories(source: str | Path, split: str, val_fraction: float = 0.0) -> TrajectoryDataset:
    """One split of a prepared trajectory folder (memory-mapped), a trajectory .npz, an HDF5 file or
    a Lance dataset as stable-worldmodel writes them. A raw file is one split, 'train', unless
    `val_fraction` > 0 holds out that fraction of its episodes as 'val' (the episodes `lejepa data
    prepare FILE --val-fraction F` holds out, statistics from the rest); folders ignore it."""
    from lejepa_cli.data.formats import H5_SUFFIXES, LANCE_SUFFIX, is_trajectory_file
    from lejepa_cli.data.shards import is_trajectory_folder

    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"trajectory source {source} does not exist (give a folder from `lejepa world simulate`, a trajectory .npz, an .h5 file or a .lance dataset)")
    if path.is_dir() and path.suffix.lower() != LANCE_SUFFIX:
        if is_trajectory_folder(path):
            return _load_folder(path, split)
        from lejepa_cli.data.shards import is_prepared

        if is_prepared(path):
            raise UserError(f"{path} is an image dataset: use an image preset (e.g. --preset demo), not a world preset")
        raise UserError(f"{path} is not a trajectory dataset; make one with `lejepa world simulate NAME --out DIR` or `lejepa data prepare FILE --out DIR`")
    if path.suffix.lower() == ".npz" and not is_trajectory_file(path):
        from lejepa_cli.world.readers import read_trajectory_file

        read_trajectory_file(path)  # names what is missing: the frames
    if path.suffix.lower() not in (".npz", LANCE_SUFFIX, *H5_SUFFIXES):
        raise UserError(f"{path.name} is not a trajectory source: give a prepared trajectory folder, an .npz, an .h5/.hdf5 file or a .lance dataset")
    return _load_file(path, split, val_fraction)


def _load_folder(path: Path, split: str) -> TrajectoryDataset:
    from lejepa_cli.data.shards import ShardedImages, shard_checksums
    from lejepa_cli.world.shards import read_index

    index = read_index(path)
    if split not in index["splits"]:
        raise UserError(f"split '{split}' is not in {path} (it has: {', '.join(index['splits'])})")
    entry = index["splits"][split]
    folder = path / split
    R, C, A, S = (int(index[k]) for k in ("resolution", "channels", "action_dim", "state_dim"))
    for f in [s["file"] for s in entry["shards"]] + [entry[k]["file"] for k in ("actions", "episode_starts", "state") if entry.get(k)]:
        if not (folder / f).is_file():
            raise UserError(f"{folder / f} is missing; re-create the dataset with --overwrite")
    frames = ShardedImages([folder / s["file"] for s in entry["shards"]], [int(s["count"]) for s in entry["shards"]], (R, R, C),
                           checksums=shard_checksums(path, entry["shards"]))

    def array(key: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        try:
            a = load_npy(folder / entry[key]["file"], f"{key} array", mmap=True)  # never unpickled
        except UserError as e:
            raise UserError(f"{e}; re-create the dataset with --overwrite") from None
        if a.shape != shape or a.dtype != dtype:
            raise UserError(f"{folder / entry[key]['file']} holds {a.dtype}{a.shape}, expected {np.dtype(dtype)}{shape}; re-create the dataset")
        return a

    T = int(entry["steps"])
    if len(frames) != T:
        raise UserError(f"{path}/index.json is garbled: split '{split}' frame shards add up to {len(frames)}, not {T}")
    starts = np.asarray(array("episode_starts", (int(entry["episodes"]) + 1,), np.int64))
    if starts[0] != 0 or starts[-1] != T or np.any(np.diff(starts) <= 0):
        raise UserError(f"{folder / 'episode_starts.npy'} is not a list of increasing offsets from 0 to {T}; re-create the dataset")
    return TrajectoryDataset(
        frames=frames,
        actions=array("actions", (T, A), np.float32),
        episode_starts=starts,
        state=array("state", (T, S), np.float32) if entry.get("state") else None,
        state_names=index.get("state_names"),
        mean=tuple(index["mean"]), std=tuple(index["std"]),
        action_mean=np.asarray(index["action_mean"], dtype=np.float32).reshape(A),
        action_std=np.maximum(np.asarray(index["action_std"], dtype=np.float32).reshape(A), 1e-6),
        name=f"{path.name}/{split}", fingerprint=entry.get("fingerprint", ""),
        world=index.get("world"), world_options=index.get("world_options"),
    )


def _load_file(path: Path, split: str, val_fraction: float = 0.0) -> TrajectoryDataset:
    from lejepa_cli.world.readers import read_trajectory_file, source_fingerprint

    if val_fraction <= 0 and split != "train":
        raise UserError(f"{path.name} has one split, 'train'; for a '{split}' split add --set data.val_fraction=0.1, or run "
                        f"`lejepa data prepare {path} --out DIR --val-fraction 0.1` and use DIR")
    if val_fraction > 0 and split not in ("train", "val"):
        raise UserError(f"{path.name} split by data.val_fraction has the splits 'train' and 'val', not '{split}'")
    raw = read_trajectory_file(path)
    _, H, W, _ = raw.frames.shape
    if H != W:
        raise UserError(f"{path.name} has {H}x{W} frames; square frames are needed: run `lejepa data prepare {path} --out DIR --resolution {min(H, W)}`")
    if val_fraction > 0:
        return _carve_split(raw, path, split, val_fraction, source_fingerprint(path)[:16])
    mean, std = channel_stats(raw.frames)
    return TrajectoryDataset(
        frames=raw.frames, actions=raw.actions, episode_starts=raw.episode_starts, state=raw.state,
        state_names=raw.state_names, mean=tuple(mean), std=tuple(std),
        action_mean=raw.actions.mean(0) if len(raw.actions) else np.zeros(raw.actions.shape[1], np.float32),
        action_std=np.maximum(raw.actions.std(0), 1e-6).astype(np.float32),
        name=path.stem, fingerprint=source_fingerprint(path)[:16], zeroed_rows=raw.zeroed_rows,
    )


def _carve_split(raw, path: Path, split: str, val_fraction: float, fingerprint: str) -> TrajectoryDataset:
    """The 'train' or 'val' episodes of a raw file; pixel and action statistics from 'train' only,
    as a folder prepared with --val-fraction (seed 0) stores them."""
    from lejepa_cli.data.sources import IndexedImages

    starts = raw.episode_starts
    episodes = split_episodes(len(starts) - 1, val_fraction, 0, flag="data.val_fraction")

    def rows(ids: np.ndarray) -> np.ndarray:
        return np.concatenate([np.arange(starts[e], starts[e + 1]) for e in ids]).astype(np.int64)

    train_rows, part = rows(episodes["train"]), rows(episodes[split])
    mean, std = channel_stats(IndexedImages(raw.frames, train_rows))
    train_actions = raw.actions[train_rows]
    lengths = np.diff(starts)[episodes[split]]
    return TrajectoryDataset(
        frames=IndexedImages(raw.frames, part), actions=raw.actions[part],
        episode_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        state=None if raw.state is None else raw.state[part], state_names=raw.state_names, mean=tuple(mean), std=tuple(std),
        action_mean=train_actions.mean(0), action_std=np.maximum(train_actions.std(0), 1e-6).astype(np.float32),
        name=f"{path.stem}[{split} {val_fraction:g}]",
        fingerprint=hashlib.sha256(f"{fingerprint}:{split}:{val_fraction}".encode()).hexdigest()[:16],
        zeroed_rows=raw.zeroed_rows,
    )
