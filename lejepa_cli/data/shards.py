"""The on-disk format of a prepared dataset, and its memory-mapped reader.

`lejepa data prepare SOURCE --out DIR` (prepare.py) writes:

    DIR/index.json                 format + version, splits (counts, shards with sha256), resolution,
                                   channels, class names, train mean/std, source path + fingerprint,
                                   skipped files; written last, so its presence means "complete"
    DIR/skipped.jsonl              one {"path", "reason"} line per file that could not be decoded
    DIR/{split}/shard-00000.npy    (n, R, R, C) uint8 in np.save format, so np.load(mmap_mode="r")
                                   maps it without reading it; no pickle anywhere
    DIR/{split}/labels.npy         (N,) int64, absent for unlabelled data
    DIR/{split}/ids.json           the source path (or array row) of every image, in order

`load_prepared(DIR, "train")` returns an `ImageDataset` whose `images` is a `ShardedImages`
reader: batches are gathered from the memory-mapped shards, so a dataset larger than RAM
trains without being loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np

from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.errors import UserError

FORMAT = "lejepa-prepared"
TRAJECTORY_FORMAT = "lejepa-trajectories"  # world/store.py's folders: refused here with a pointer
VERSION = 1
INDEX = "index.json"
SKIPPED = "skipped.jsonl"
LABELS = "labels.npy"
IDS = "ids.json"


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


# ---------------------------------------------------------------------------------------------
# Writing: every file goes to a hidden temp name first and is renamed into place, so a reader
# (or a resumed prepare) never sees half a file.


class _HashingWriter:
    """File wrapper that hashes what passes through; numpy streams the array in chunks to it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        return self._f.write(data)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    try:  # make the rename itself durable; not possible on every filesystem
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_array(path: Path, array: np.ndarray) -> str:
    """np.save `array` to `path` atomically; returns the sha256 of the file bytes."""
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        np.lib.format.write_array(w, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)
    return w.sha.hexdigest()


def write_bytes(path: Path, data: bytes) -> str:
    """Write `data` to `path` atomically; returns its sha256."""
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def dumps_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (a resumed prepare must write the same bytes as a clean one)."""
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def write_json(path: Path, obj: Any) -> str:
    return write_bytes(path, dumps_json(obj))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha.update(block)
    return sha.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


class ShardedImages:
    """(N, R, R, C) uint8 images spread over memory-mapped .npy shards; satisfies `ImageArray`.

    `reader[idx]` with an int64 array gathers a (B, R, R, C) numpy batch. Indices are sorted
    before reading so each shard is visited once and in file order, then scattered back into the
    caller's order, so random and sequential batches cost about the same. Pickling (to a
    DataLoader worker) sends only the paths; the worker maps the shards itself.

    `checksums` (the index's sha256 per shard; None for a shard without one) makes each shard be
    hashed when it is first opened, before any of its images is used: a changed or corrupt shard
    stops the reader with one line naming it. That reads every shard once per process, at the
    speed benchmarks/bench_verify.py measures (docs/guarantees.md states it).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: Sequence[str | Path], counts: Sequence[int], image_shape: Sequence[int],
                 checksums: Sequence[str | None] | None = None):
        if len(paths) != len(counts) or (checksums is not None and len(checksums) != len(paths)):
            raise ValueError("one count (and checksum) per shard")
        self._paths = [str(p) for p in paths]
        self._counts = [int(c) for c in counts]
        self._checksums = list(checksums) if checksums is not None else [None] * len(self._paths)
        self._offsets = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)]).astype(np.int64)
        self.shape = (int(self._offsets[-1]), *(int(s) for s in image_shape))
        self._maps: list[np.ndarray | None] | None = None  # filled shard by shard on first use

    def _shard(self, k: int) -> np.ndarray:
        """Shard k, memory-mapped (and checked against its checksum) on first use."""
        if self._maps is None:
            self._maps = [None] * len(self._paths)
        if self._maps[k] is None:
            path, count, expected = self._paths[k], self._counts[k], self._checksums[k]
            if expected is not None and sha256_file(Path(path)) != expected:
                raise UserError(f"shard {path} does not match its checksum in index.json (changed or corrupt since "
                                f"it was written): restore it or re-create the dataset with --overwrite")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read shard {path} ({e}); run `lejepa data info --verify`") from None
            if arr.dtype != np.uint8 or arr.shape != (count, *self.shape[1:]):
                raise UserError(
                    f"shard {path} holds {arr.dtype}{tuple(arr.shape)}, expected uint8"
                    f"{(count, *self.shape[1:])}; re-run prepare with --overwrite"
                )
            self._maps[k] = arr
        return self._maps[k]

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedImages(shape={self.shape}, shards={len(self._paths)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def __getitem__(self, index: Any) -> np.ndarray:
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {index} out of range for {n} images")
            s = int(np.searchsorted(self._offsets, i, side="right")) - 1
            return np.array(self._shard(s)[i - self._offsets[s]])
        if isinstance(index, slice):
            index = np.arange(*index.indices(n))
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} images")
            idx = np.flatnonzero(idx)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise IndexError("index with an int, a slice or a 1-D integer array")
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        out = np.empty((idx.size, *self.shape[1:]), dtype=np.uint8)  # (B, R, R, C)
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self._offsets, sorted_idx, side="right") - 1
        shards, starts = np.unique(shard_of, return_index=True)
        ends = np.append(starts[1:], idx.size)
        for s, a, b in zip(shards, starts, ends):
            out[order[a:b]] = self._shard(int(s))[sorted_idx[a:b] - self._offsets[s]]
        return out


_UNVERIFIED: set[str] = set()  # datasets already reported as having no checksums


def shard_checksums(dataset: Path, entries: Sequence[dict]) -> list[str | None]:
    """The sha256 of each shard entry of an index, for `ShardedImages(checksums=...)`. A dataset
    written before shards carried checksums still loads, unverified, and says so once."""
    sums = [e.get("sha256") or None for e in entries]
    if None in sums and str(dataset) not in _UNVERIFIED:
        _UNVERIFIED.add(str(dataset))
        from lejepa_cli.terminal import make_console

        make_console(stderr=True).print(
            f"[yellow]warning: {dataset} has shards without checksums (written by an older lejepa): they are read "
            f"without verification; re-create it with --overwrite to add them", highlight=False, soft_wrap=True)
    return sums


def read_index(path: Path) -> dict:
    """The parsed index.json of a prepared folder; UserError naming the folder when it is not one."""
    path = Path(path)
    index_file = path / INDEX
    if not index_file.is_file():
        if not path.exists():
            raise UserError(f"prepared dataset {path} does not exist; create it with `lejepa data prepare SOURCE --out {path}`")
        raise UserError(f"{path} is not a prepared dataset (no {INDEX}); create it with `lejepa data prepare SOURCE --out {path}`")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{index_file} is garbled ({e}); re-run prepare with --overwrite") from None
    if isinstance(index, dict) and index.get("format") == TRAJECTORY_FORMAT:
        raise UserError(f"{path} is a trajectory dataset (episodes with actions): use a world preset (e.g. --preset world-tworoom), not an image preset")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{index_file} is not a lejepa prepared-dataset index; re-run prepare with --overwrite")
    if index.get("version") != VERSION:
        raise UserError(f"{path} was prepared with format version {index.get('version')}, this tool reads {VERSION}; re-run prepare")
    try:
        for split in index["splits"].values():
            [(s["file"], int(s["count"])) for s in split["shards"]]  # sha256: absent in old datasets
        int(index["resolution"]), int(index["channels"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{index_file} is garbled (missing or bad field {e}); re-run prepare with --overwrite") from None
    return index


def is_prepared(path: str | Path) -> bool:
    """True when `path` is a complete prepared folder (its index.json exists and parses)."""
    try:
        read_index(Path(path))
    except UserError:
        return False
    return True


def load_prepared(path: str | Path, split: str = "train", *, ids: bool = False) -> ImageDataset:
    """Memory-map one split of a prepared folder as an ImageDataset (ids only on request: for
    ImageNet they are a 1.3M-entry list that training never needs)."""
    path = Path(path)
    index = read_index(path)
    splits = index["splits"]
    if split not in splits:
        raise UserError(f"split '{split}' is not in {path} (it has: {', '.join(splits) or 'none'})")
    entry = splits[split]
    R, C = int(index["resolution"]), int(index["channels"])
    folder = path / split
    paths = [folder / s["file"] for s in entry["shards"]]
    for p in paths:
        if not p.is_file():
            raise UserError(f"shard {p} is missing; re-run prepare (it resumes) or use --overwrite")
    images = ShardedImages(paths, [int(s["count"]) for s in entry["shards"]], (R, R, C),
                           checksums=shard_checksums(path, entry["shards"]))
    if len(images) != int(entry["count"]):
        raise UserError(f"{path}/index.json is garbled: split '{split}' shards add up to {len(images)}, not {entry['count']}")
    labels = None
    if entry.get("labels"):
        try:
            labels = np.load(folder / entry["labels"]["file"], allow_pickle=False).astype(np.int64)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read labels of split '{split}' in {path} ({e})") from None
        if labels.shape != (len(images),):
            raise UserError(f"labels of split '{split}' in {path} have shape {labels.shape}, expected ({len(images)},)")
    id_list = None
    if ids and entry.get("ids"):
        id_list = json.loads((folder / entry["ids"]).read_text(encoding="utf-8"))
    return ImageDataset(
        images=images,
        labels=labels,
        class_names=index.get("class_names"),
        mean=tuple(index["mean"]),
        std=tuple(index["std"]),
        fingerprint=entry.get("fingerprint", ""),
        name=f"{path.name}/{split}",
        ids=id_list,
    )


def verify(path: str | Path) -> list[str]:
    """Re-read every file of a prepared folder; returns the problems found (empty when intact)."""
    path = Path(path)
    try:
        index = read_index(path)
    except UserError as e:
        return [str(e)]
    problems: list[str] = []
    R, C = int(index["resolution"]), int(index["channels"])
    for split, entry in index["splits"].items():
        folder = path / split
        total = 0
        for s in entry["shards"]:
            f = folder / s["file"]
            if not f.is_file():
                problems.append(f"{split}/{s['file']}: missing")
                continue
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
                shape = arr.shape
                del arr
            except (OSError, ValueError) as e:
                problems.append(f"{split}/{s['file']}: unreadable ({e})")
                continue
            if shape != (int(s["count"]), R, R, C):
                problems.append(f"{split}/{s['file']}: shape {shape}, expected {(int(s['count']), R, R, C)}")
            if not s.get("sha256"):
                problems.append(f"{split}/{s['file']}: no checksum in index.json (written by an older lejepa)")
            elif sha256_file(f) != s["sha256"]:
                problems.append(f"{split}/{s['file']}: checksum mismatch (file changed or corrupt)")
            total += int(s["count"])
        if total != int(entry["count"]):
            problems.append(f"{split}: shards hold {total} images, index says {entry['count']}")
        for key in ("labels",):
            meta = entry.get(key)
            if not meta:
                continue
            f = folder / meta["file"]
            if not f.is_file():
                problems.append(f"{split}/{meta['file']}: missing")
            elif sha256_file(f) != meta["sha256"]:
                problems.append(f"{split}/{meta['file']}: checksum mismatch")
            else:
                labels = np.load(f, allow_pickle=False)
                if labels.shape != (int(entry["count"]),):
                    problems.append(f"{split}/{meta['file']}: {labels.shape[0]} labels for {entry['count']} images")
                names = index.get("class_names")
                if names and labels.size and (labels.min() < 0 or labels.max() >= len(names)):
                    problems.append(f"{split}/{meta['file']}: label outside 0..{len(names) - 1}")
        if entry.get("ids"):
            f = folder / entry["ids"]
            try:
                n_ids = len(json.loads(f.read_text(encoding="utf-8")))
                if n_ids != int(entry["count"]):
                    problems.append(f"{split}/{entry['ids']}: {n_ids} ids for {entry['count']} images")
            except (OSError, ValueError) as e:
                problems.append(f"{split}/{entry['ids']}: unreadable ({e})")
    return problems


def is_trajectory_folder(path: str | Path) -> bool:
    """True when `path` holds a trajectory index.json (complete or not: it is written last)."""
    index_file = Path(path) / INDEX
    if not index_file.is_file():
        return False
    try:
        return json.loads(index_file.read_text(encoding="utf-8")).get("format") == TRAJECTORY_FORMAT
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
