"""The on-disk format of a prepared trajectory dataset (written by `lejepa world simulate` and by
`lejepa data prepare` from a trajectory .npz / HDF5 file), its writer and its index reader.

    DIR/index.json                    format "lejepa-trajectories" + version, resolution, channels,
                                      action/state dims and state names, world name + options,
                                      TRAIN pixel mean/std and action mean/std, per split: steps,
                                      episodes, files with sha256, fingerprint; written last, so its
                                      presence means "complete"
    DIR/{split}/frames-00000.npy      (n, R, R, C) uint8 frame shards (whole episodes, np.save format,
                                      memory-mapped when read; no pickle anywhere)
    DIR/{split}/actions.npy           (T, A) float32 raw actions; a_t acts between frame t and t + 1
    DIR/{split}/state.npy             (T, S) float32 true state (absent when the source has none)
    DIR/{split}/episode_starts.npy    (E + 1,) int64 offsets: episode e is rows [starts[e], starts[e+1])

Image datasets use a different format name ("lejepa-prepared", data/shards.py), so neither
reader can mistake one for the other.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.data import shards
from lejepa_cli.data.shards import is_trajectory_folder  # noqa: F401  (detection lives with the data layer)
from lejepa_cli.data.dataset import channel_stats
from lejepa_cli.errors import UserError

FORMAT = shards.TRAJECTORY_FORMAT
VERSION = 1
ACTIONS, STATE, STARTS = "actions.npy", "state.npy", "episode_starts.npy"
SHARD_BYTES = 256 << 20


def frame_shard(k: int) -> str:
    return f"frames-{k:05d}.npy"


class TrajectoryWriter:
    """Streams episodes into a trajectory folder; `finish` writes index.json last."""

    def __init__(self, out: Path, resolution: int, channels: int, action_dim: int, state_names: list[str] | None):
        self.out = Path(out)
        self.resolution, self.channels, self.action_dim = resolution, channels, action_dim
        self.state_names = state_names
        self.splits: dict[str, dict[str, Any]] = {}
        self._split: str | None = None

    def begin(self, split: str) -> None:
        (self.out / split).mkdir(parents=True, exist_ok=True)
        self.splits[split] = {"shards": [], "actions": [], "state": [], "lengths": []}
        self._split = split

    def add(self, frames: np.ndarray, actions: np.ndarray, state: np.ndarray | None, lengths: list[int]) -> None:
        """Whole episodes: frames (n, R, R, C) uint8, actions (n, A), state (n, S), sum(lengths) = n."""
        entry = self.splits[self._split]
        per_shard = max(1, SHARD_BYTES // max(1, frames[0].nbytes))
        for a in range(0, len(frames), per_shard):  # one add usually makes one shard
            part = frames[a : a + per_shard]
            name = frame_shard(len(entry["shards"]))
            sha = shards.write_array(self.out / self._split / name, part)
            entry["shards"].append({"file": name, "count": len(part), "sha256": sha})
        entry["actions"].append(np.asarray(actions, dtype=np.float32).reshape(len(frames), self.action_dim))
        if self.state_names is not None:
            entry["state"].append(np.asarray(state, dtype=np.float32))
        entry["lengths"].extend(int(n) for n in lengths)

    def _close_split(self, split: str) -> tuple[dict, np.ndarray]:
        entry = self.splits[split]
        folder = self.out / split
        actions = np.concatenate(entry["actions"]) if entry["actions"] else np.zeros((0, self.action_dim), np.float32)
        starts = np.concatenate([[0], np.cumsum(entry["lengths"])]).astype(np.int64)
        record = {
            "steps": int(starts[-1]), "episodes": len(entry["lengths"]), "shards": entry["shards"],
            "actions": {"file": ACTIONS, "sha256": shards.write_array(folder / ACTIONS, actions)},
            "episode_starts": {"file": STARTS, "sha256": shards.write_array(folder / STARTS, starts)},
            "state": None,
        }
        if self.state_names is not None:
            record["state"] = {"file": STATE, "sha256": shards.write_array(folder / STATE, np.concatenate(entry["state"]))}
        digest = hashlib.sha256()
        for s in record["shards"]:
            digest.update(s["sha256"].encode())
        for key in ("actions", "episode_starts", "state"):
            digest.update((record[key] or {}).get("sha256", "-").encode())
        record["fingerprint"] = digest.hexdigest()[:16]
        return record, actions

    def finish(self, source: dict, world: str | None = None, world_options: dict | None = None) -> dict:
        """Write the split arrays, the train statistics and finally index.json; returns the index."""
        records, train_actions = {}, None
        for split in self.splits:
            records[split], actions = self._close_split(split)
            if split == "train":
                train_actions = actions
        train = records["train"]
        from lejepa_cli.data.shards import ShardedImages

        frames = ShardedImages([self.out / "train" / s["file"] for s in train["shards"]], [s["count"] for s in train["shards"]],
                               (self.resolution, self.resolution, self.channels))
        mean, std = channel_stats(frames)
        index = {
            "format": FORMAT, "version": VERSION, "kind": "trajectories",
            "resolution": self.resolution, "channels": self.channels,
            "action_dim": self.action_dim, "state_dim": len(self.state_names or []), "state_names": self.state_names,
            "world": world, "world_options": world_options,
            "mean": mean, "std": std,
            "action_mean": train_actions.mean(0).tolist() if len(train_actions) else [0.0] * self.action_dim,
            "action_std": np.maximum(train_actions.std(0), 1e-6).tolist() if len(train_actions) else [1.0] * self.action_dim,
            "splits": records, "source": source,
        }
        shards.write_json(self.out / shards.INDEX, index)
        return index


def read_index(path: Path) -> dict:
    """The parsed index.json of a trajectory folder; UserError naming the folder when it is not one."""
    path = Path(path)
    index_file = path / shards.INDEX
    if not index_file.is_file():
        raise UserError(f"{path} is not a prepared trajectory dataset (no {shards.INDEX}); make one with "
                        f"`lejepa world simulate NAME --out {path}` or `lejepa data prepare FILE --out {path}`")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{index_file} is garbled ({e}); re-create the dataset with --overwrite") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        if isinstance(index, dict) and index.get("format") == shards.FORMAT:
            raise UserError(f"{path} is an image dataset: use an image preset (e.g. --preset demo), not a world preset")
        raise UserError(f"{index_file} is not a lejepa trajectory index; re-create the dataset with --overwrite")
    if index.get("version") != VERSION:
        raise UserError(f"{path} was written with trajectory format version {index.get('version')}, this tool reads {VERSION}")
    try:
        int(index["resolution"]), int(index["channels"]), int(index["action_dim"]), int(index["state_dim"])
        for entry in index["splits"].values():
            int(entry["steps"]), int(entry["episodes"]), entry["actions"]["file"], entry["episode_starts"]["file"]
            [(s["file"], int(s["count"])) for s in entry["shards"]]  # sha256: absent in old datasets
        if "train" not in index["splits"]:
            raise KeyError("splits.train")
        len(index["mean"]), len(index["std"]), len(index["action_mean"]), len(index["action_std"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{index_file} is garbled (missing or bad field {e}); re-create the dataset with --overwrite") from None
    return index


def prepare_out(out: Path, plan: dict, overwrite: bool) -> bool:
    """Make `out` ready for a new dataset; True when it already holds exactly this one (done).

    Refuses a non-empty folder that is not a trajectory dataset, and a different dataset
    unless `overwrite`; with it, deletes only what a trajectory writer puts there. The files
    of an interrupted write (no index.json yet) are replaced without asking.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return False
    index = None
    if is_trajectory_folder(out):
        try:
            index = read_index(out)
        except UserError:
            index = None
    if index is not None and index.get("source", {}).get("plan") == plan:
        return True
    unfinished = not (out / shards.INDEX).exists() and all(_is_ours(entry) for entry in out.iterdir())
    if not overwrite and not unfinished:  # an interrupted write is useless without its index: start again
        what = "a different trajectory dataset" if index is not None else "files that are not a trajectory dataset"
        raise UserError(f"--out {out} already holds {what}; pass --overwrite to replace it, or choose an empty folder")
    if index is None and not is_trajectory_folder(out):
        ours = all(_is_ours(entry) for entry in out.iterdir())
        if not ours:
            raise UserError(f"--out {out} holds files that lejepa did not write; choose an empty folder")
    (out / shards.INDEX).unlink(missing_ok=True)  # first: from here on the folder reads as incomplete
    for entry in out.iterdir():
        if _is_ours(entry):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if any(out.iterdir()):
        raise UserError(f"--out {out} holds files that lejepa did not write; choose an empty folder")
    return False


def _is_ours(entry: Path) -> bool:
    if entry.is_file():
        return entry.name == shards.INDEX
    names = {ACTIONS, STATE, STARTS}
    return all(f.is_file() and (f.name in names or f.name.startswith(("frames-", ".frames-", ".actions", ".state", ".episode_starts")))
               for f in entry.iterdir())


def verify(path: Path) -> list[str]:
    """Re-read every file of a trajectory folder; returns the problems found (empty when intact)."""
    try:
        index = read_index(path)
    except UserError as e:
        return [str(e)]
    problems = []
    R, C = index["resolution"], index["channels"]
    for split, entry in index["splits"].items():
        folder = Path(path) / split
        files = [(s["file"], s.get("sha256")) for s in entry["shards"]]
        files += [(entry[k]["file"], entry[k].get("sha256")) for k in ("actions", "episode_starts", "state") if entry.get(k)]
        for name, sha in files:
            f = folder / name
            if not f.is_file():
                problems.append(f"{split}/{name}: missing")
            elif not sha:
                problems.append(f"{split}/{name}: no checksum in index.json (written by an older lejepa)")
            elif shards.sha256_file(f) != sha:
                problems.append(f"{split}/{name}: checksum mismatch (file changed or corrupt)")
        for s in entry["shards"]:
            f = folder / s["file"]
            if f.is_file():
                try:
                    shape = np.load(f, mmap_mode="r", allow_pickle=False).shape
                except (OSError, ValueError) as e:
                    problems.append(f"{split}/{s['file']}: unreadable ({e})")
                    continue
                if shape != (int(s["count"]), R, R, C):
                    problems.append(f"{split}/{s['file']}: shape {shape}, expected {(int(s['count']), R, R, C)}")
    return problems
