"""In-memory data sources and the one function that resolves `data.source` to a dataset.

`data.source` may be "builtin", a folder of IDX files (MNIST / Fashion-MNIST layout, gzipped
or not), an `.npz` file (keys in NPZ_KEYS_HELP), or a folder made by `lejepa data prepare`.

A source without a held-out split can have one carved off: `data.val_fraction` > 0 holds out
that fraction of the training images (the same ones every time: the choice is seeded by the
data's fingerprint, not by train.seed, so runs with different seeds are scored on the same
images); training then uses the rest. A source with its own held-out split is used as it is.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.config import DataConfig
from lejepa_cli.data import NPZ_KEYS_HELP  # noqa: F401  (documents _NPZ_KEYS; re-exported)
from lejepa_cli.data.builtin import builtin_dataset
from lejepa_cli.data.dataset import ImageDataset, channel_stats
from lejepa_cli.data import inputs
from lejepa_cli.errors import UserError

# IDX file stems per split: MNIST-family names use "train" and "t10k".
_IDX_PREFIX = {"train": "train", "val": "t10k", "test": "t10k"}


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UserError(f"{path} is not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(dims)) if dims else 0
    if len(raw) != header + count:
        raise UserError(f"{path} is truncated or padded: header says {dims}, file has {len(raw) - header} bytes of data")
    return np.frombuffer(raw, np.uint8, count, header).reshape(dims)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    for pattern in (f"{prefix}-{kind}-idx?-ubyte.gz", f"{prefix}-{kind}-idx?-ubyte", f"{prefix}-{kind}.idx?-ubyte*"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def is_idx_folder(folder: Path) -> bool:
    return folder.is_dir() and _find_idx(folder, "train", "images") is not None


def load_idx(folder: Path, split: str = "train") -> ImageDataset:
    """MNIST-family IDX folder; split "train" reads train-*, "val"/"test" read t10k-*."""
    prefix = _IDX_PREFIX.get(split)
    if prefix is None:
        raise UserError(f"IDX data has splits 'train' and 'val' (t10k), not '{split}'")
    images_path = _find_idx(folder, prefix, "images")
    if images_path is None:
        raise UserError(f"no {prefix}-images-idx3-ubyte[.gz] file in {folder}")
    images = _read_idx(images_path)
    if images.ndim != 3:
        raise UserError(f"{images_path} holds shape {images.shape}, expected (N, H, W) images")
    labels_path = _find_idx(folder, prefix, "labels")
    labels = _read_idx(labels_path).astype(np.int64) if labels_path else None
    if labels is not None and len(labels) != len(images):
        raise UserError(f"{labels_path} has {len(labels)} labels for {len(images)} images")
    images = np.ascontiguousarray(images[..., None])  # (N, H, W, 1)
    # Mean/std always from the train split so both splits normalise alike.
    train = images if prefix == "train" else _read_idx(_find_idx(folder, "train", "images"))[..., None]
    mean, std = channel_stats(train)
    digest = hashlib.sha256()
    for p in (images_path, labels_path):
        if p is not None:
            digest.update(p.name.encode() + p.read_bytes())
    names = None
    if labels is not None and "fashion" in str(folder).lower():
        names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    return ImageDataset(
        images=images, labels=labels, class_names=names, mean=mean, std=std,
        fingerprint=digest.hexdigest()[:16], name=folder.name,
        ids=[f"{images_path.name}:{i}" for i in range(len(images))],
    )


_NPZ_KEYS = {"train": (("x_train", "y_train"), ("images", "labels"), ("x", "y")), "val": (("x_test", "y_test"), ("x_val", "y_val"))}


def load_npz(path: Path, split: str = "train") -> ImageDataset:
    """Arrays in an .npz: (x_train, y_train[, x_val/x_test, y_val/y_test]), (images[, labels]) or (x[, y]).

    Images are uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; see NPZ_KEYS_HELP.
    """
    if split not in _NPZ_KEYS:
        raise UserError(f".npz data has splits 'train' and 'val', not '{split}'")
    arrays = inputs.load_npz(path)  # every member read now: a truncated or pickled one is one line here
    for x_key, y_key in _NPZ_KEYS[split]:
        if x_key in arrays:
            images = arrays[x_key]
            labels = arrays[y_key].astype(np.int64) if y_key in arrays else None
            break
    else:
        wanted = " or ".join(k for k, _ in _NPZ_KEYS[split])
        raise UserError(f"{path} has no '{wanted}' array for split '{split}' (found: {', '.join(arrays)})")
    train_images = arrays[_NPZ_KEYS["train"][0][0]] if split != "train" and "x_train" in arrays else images
    images, train_images = _to_nhwc(images, path), _to_nhwc(train_images, path)
    if labels is not None and labels.shape != (len(images),):
        raise UserError(f"{path}: labels have shape {labels.shape}, expected ({len(images)},)")
    mean, std = channel_stats(train_images)
    return ImageDataset(
        images=images, labels=labels, mean=mean, std=std,
        fingerprint=hashlib.sha256(path.read_bytes()).hexdigest()[:16], name=path.stem,
        ids=[f"{path.name}:{split}:{i}" for i in range(len(images))],
    )


def _to_nhwc(images: np.ndarray, path: Path) -> np.ndarray:
    if images.dtype != np.uint8:
        raise UserError(f"{path}: images must be uint8 (0-255), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(f"{path}: images must be (N, H, W[, C]), got shape {images.shape}")
    if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.shape[-1] not in (1, 3):
        raise UserError(f"{path}: images need 1 or 3 channels, got shape {images.shape}")
    return np.ascontiguousarray(images)


def has_split(cfg: DataConfig, split: str) -> bool:
    """Whether `data.source` holds `split` itself (cheap: reads names and headers, not images)."""
    if cfg.source == "builtin":
        return split in ("train", "val", "test")
    path = Path(cfg.source).expanduser()
    if path.is_file() and path.suffix == ".npz":
        try:
            names = set(inputs.npz_names(path))  # only the member list is read here
        except UserError:
            return False  # load_dataset says what is wrong with the file
        return any(x in names for x, _ in _NPZ_KEYS.get(split, ()))
    if path.is_dir() and (path / "index.json").is_file():
        from lejepa_cli.data.shards import read_index

        return split in read_index(path)["splits"]
    if is_idx_folder(path):
        prefix = _IDX_PREFIX.get(split)
        return prefix is not None and _find_idx(path, prefix, "images") is not None
    return False


class IndexedImages:
    """A subset of an `ImageArray` by index, read lazily (so a memory-mapped source stays mapped)."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, base: Any, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index), *base.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.base[self.index[index]]


def carve_held_out(full: ImageDataset, fraction: float, held_out: bool) -> ImageDataset:
    """The held-out part (`held_out`) or the rest of `full`, split by a permutation seeded from its fingerprint."""
    n_val = int(round(fraction * len(full)))
    if n_val < 1 or len(full) - n_val < 2:
        raise UserError(f"config key 'data.val_fraction' = {fraction} of {len(full)} images holds out {n_val} and leaves "
                        f"{len(full) - n_val} to train on: it needs at least 1 held out and 2 to train on")
    seed = int(hashlib.sha256(f"{full.fingerprint}:{len(full)}".encode()).hexdigest()[:16], 16)
    order = np.random.default_rng(seed).permutation(len(full))
    index = np.sort(order[:n_val] if held_out else order[n_val:])  # sorted: shards are read in file order
    role = "heldout" if held_out else "rest"
    images = full.images[index] if isinstance(full.images, np.ndarray) else IndexedImages(full.images, index)
    return ImageDataset(
        images=images, labels=None if full.labels is None else full.labels[index], class_names=full.class_names,
        mean=full.mean, std=full.std,  # the whole training source's: both parts normalise alike
        fingerprint=hashlib.sha256(f"{full.fingerprint}:{role}:{fraction}".encode()).hexdigest()[:16],
        name=f"{full.name}[{role} {fraction:g}]", ids=None if full.ids is None else [full.ids[i] for i in index],
    )


def load_dataset(cfg: DataConfig, split: str) -> ImageDataset:
    """Resolve `data.source` to the dataset of one split (carving a held-out split when data.val_fraction asks)."""
    if cfg.val_fraction > 0 and not has_split(cfg, cfg.eval_split):
        if split == cfg.train_split or not has_split(cfg, split):
            return carve_held_out(_load_source(cfg, cfg.train_split), cfg.val_fraction, held_out=split != cfg.train_split)
    return _load_source(cfg, split)


def held_out_note(cfg: DataConfig, train: ImageDataset, held_out: ImageDataset | None) -> str | None:
    """One line for the start of training when labelled data has no held-out split to evaluate on; else None."""
    if held_out is not None or train.labels is None:
        return None
    if has_split(cfg, cfg.eval_split):
        return f"the held-out split '{cfg.eval_split}' of {cfg.source} could not be read: no held-out evaluation in this run"
    return (f"{cfg.source} has no held-out split '{cfg.eval_split}': this run logs no kNN or online-probe accuracy "
            f"and `lejepa probe` will need --data; add one with --set data.val_fraction=0.1 (seeded, carved from "
            f"the training images), or an x_val/y_val array in the .npz, or a val split from `lejepa data prepare`")


def _load_source(cfg: DataConfig, split: str) -> ImageDataset:
    """The split as the source holds it."""
    source = cfg.source
    if source == "builtin":
        n = cfg.builtin_train if split == "train" else cfg.builtin_val
        return builtin_dataset(split, n=n, size=cfg.builtin_size)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data source '{source}' does not exist (give 'builtin', an IDX folder, an .npz or a prepared folder)")
    from lejepa_cli.data.formats import is_trajectory_source

    if is_trajectory_source(path):
        raise UserError(f"{source} is a trajectory dataset (episodes with actions): use a world preset (e.g. --preset world-tworoom), not an image preset")
    if path.is_file() and path.suffix == ".npz":
        return load_npz(path, split)
    if path.is_dir() and (path / "index.json").is_file():
        from lejepa_cli.data.shards import load_prepared

        return load_prepared(path, split)
    if is_idx_folder(path):
        return load_idx(path, split)
    raise UserError(
        f"data source '{source}' is not an IDX folder, an .npz file or a prepared folder; "
        f"run 'lejepa data prepare {source} --out DIR' first"
    )
