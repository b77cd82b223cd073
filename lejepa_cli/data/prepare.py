"""`lejepa data prepare`: turn an image source into fixed-size uint8 shards (format: shards.py).

    from lejepa_cli.data.prepare import prepare, info
    prepare("~/data/imagenet/train", Path("prepared/in1k"), resolution=224, val_fraction=0.01)

Sources (detected from what SOURCE is):
  - a folder of class sub-folders (ImageNet layout), or one with train/ and val/ folders of them
    (Imagenette layout; the official splits are kept);
  - any other folder: every image below it, unlabelled;
  - a file list: .txt (one path per line) or .csv (path[,label]), paths relative to the list;
  - an IDX folder (MNIST / Fashion-MNIST) and the CIFAR-10/100 folders, binary (cifar-10-batches-bin,
    cifar-100-binary) or "python version" (cifar-10-batches-py, cifar-100-python; their pickles are
    read by pickle_data.py, never unpickled): official train/test splits become train/val;
  - .npz / .npy arrays; Parquet files or a Hugging Face `save_to_disk` folder (needs pyarrow);
  - "builtin": the procedural shapes dataset.

Every image is decoded with Pillow (EXIF orientation applied; L/LA/P/RGBA/CMYK/16-bit converted),
the shorter side resized to `resolution` and centre-cropped. Files that cannot be decoded are
skipped and listed in out/skipped.jsonl; they never stop the run. The output is deterministic
(fixed file order, seeded split), and each completed shard is journalled in out/.partial/, so a
killed prepare re-run with the same arguments resumes and ends byte-identical to a clean run.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from lejepa_cli.data.dataset import channel_stats
from lejepa_cli.data import shards
from lejepa_cli.errors import UserError

IMAGE_EXTS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi",
}
# Formats Pillow may try. EPS is left out on purpose: opening it runs Ghostscript.
_WANTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA", "MPO", "AVIF", "QOI", "JPEG2000", "DIB")
GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
SHARD_BYTES = 256 << 20  # shards of at most 4096 images and ~256 MiB
PARTIAL = ".partial"
SMALL_SIDE = 64  # sources whose images all share one size <= this keep their size by default
DEFAULT_RESOLUTION = 256
MAX_SKIPPED_IN_INDEX = 1000
KINDS = (
    "image-folder", "split-folders", "unlabelled-folder", "file-list", "idx", "cifar10", "cifar100", "npz", "npy", "parquet", "builtin",
)


# ---------------------------------------------------------------------------------------------
# Sources: what to decode, in which order, with which labels


@dataclass
class Items:
    """The not-yet-decoded images of one split, in their fixed order.

    A payload is a file path (str), encoded image bytes, or a uint8 pixel array (H, W[, C]).
    """

    ids: list[str]
    labels: np.ndarray | None  # (N,) int64
    payloads: Sequence[Any]
    decoded: bool = False  # payloads are pixel arrays

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: np.ndarray) -> Items:
        return Items(
            ids=[self.ids[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            payloads=_Subset(self.payloads, idx),
            decoded=self.decoded,
        )


class _Subset:
    def __init__(self, base: Sequence[Any], idx: np.ndarray):
        self.base, self.idx = base, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.idx[i])]


@dataclass
class Source:
    kind: str
    path: str  # absolute path, or "builtin"
    fingerprint: str
    splits: dict[str, Items]  # {"train", "val"} for official splits, else {"all"}
    class_names: list[str] | None = None

    @property
    def official_splits(self) -> bool:
        return "all" not in self.splits


def detect_source(source: str | Path) -> tuple[str, Path | None]:
    """(kind, path) for a SOURCE argument; UserError when it is nothing prepare can read."""
    if str(source) == "builtin":
        return "builtin", None
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise UserError(f"source {source} does not exist (give an image folder, a .txt/.csv file list, .npz/.npy, .parquet or 'builtin')")
    if path.is_file():
        suffix = path.suffix.lower()
        kinds = {".txt": "file-list", ".csv": "file-list", ".npz": "npz", ".npy": "npy", ".parquet": "parquet", ".arrow": "parquet"}
        if suffix in kinds:
            return kinds[suffix], path
        if path.name.endswith((".tar", ".tar.gz", ".tgz", ".zip")):
            raise UserError(f"{path.name} is an archive: extract it first (or get standard datasets with `lejepa data fetch`)")
        raise UserError(f"cannot prepare {path.name}: expected a folder, a .txt/.csv file list, .npz, .npy or .parquet")
    names = {e.name for e in os.scandir(path) if not e.name.startswith(".")}
    from lejepa_cli.data.sources import is_idx_folder

    if is_idx_folder(path):
        return "idx", path
    if {"data_batch_1.bin", "data_batch_1"} & names:  # binary or python batches
        return "cifar10", path
    if {"train.bin", "test.bin"} <= names or {"train", "test", "meta"} <= names and (path / "meta").is_file():
        return "cifar100", path
    if any(n.endswith((".parquet", ".arrow")) for n in names) or "dataset_dict.json" in names:
        return "parquet", path
    dirs = {n for n in names if (path / n).is_dir()}
    top_images = {n for n in names - dirs if Path(n).suffix.lower() in IMAGE_EXTS}
    if not names:
        raise UserError(f"source folder {path} is empty")
    if dirs and not top_images:
        if "train" in dirs and dirs <= {"train", "val", "validation", "test"}:
            return "split-folders", path
        return "image-folder", path
    return "unlabelled-folder", path


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file below `root`, sorted by relative path; follows directory links once."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _stat_digest(root: Path, files: Sequence[Path], digest: Any = None) -> Any:
    """Hash of relative paths + sizes + mtimes: cheap, and changes when any file does."""
    digest = digest or hashlib.sha256()
    for f in files:
        try:
            st = f.stat()
            digest.update(f"{f.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{f.relative_to(root).as_posix()}\tmissing\n".encode())
    return digest


def _content_digest(files: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + shards.sha256_file(f).encode())
    return digest.hexdigest()


def _class_files(folder: Path) -> dict[str, list[Path]]:
    """{class folder name: its files, recursively} for the non-empty sub-folders of `folder`."""
    walks = {d: _walk(folder / d) for d in _sub_dirs(folder)}
    return {d: files for d, files in walks.items() if files}


def _class_items(root: Path, classes: dict[str, list[Path]], names: list[str]) -> Items:
    """Items of class folders; ids relative to `root`, labels index `names`."""
    ids, labels, paths = [], [], []
    for name, files in classes.items():
        ids += [f.relative_to(root).as_posix() for f in files]
        labels += [names.index(name)] * len(files)
        paths += [str(f) for f in files]
    return Items(ids, np.asarray(labels, dtype=np.int64), paths)


def _flat_items(root: Path, folder: Path) -> Items:
    files = _walk(folder)
    return Items([f.relative_to(root).as_posix() for f in files], None, [str(f) for f in files])


def _sub_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())


def _has_top_images(folder: Path) -> bool:
    return any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_EXTS for e in os.scandir(folder))


def _folder_source(kind: str, root: Path) -> Source:
    if kind == "unlabelled-folder":
        items = _flat_items(root, root)
        return Source(kind, str(root), _stat_digest(root, [root / i for i in items.ids]).hexdigest(), {"all": items})
    if kind == "image-folder":
        classes = _class_files(root)
        items = _class_items(root, classes, list(classes))
        return Source(kind, str(root), _stat_digest(root, [root / i for i in items.ids]).hexdigest(), {"all": items}, list(classes))
    # split-folders: train/ (+ val/ or validation/ or test/), each of class folders or flat
    split_dirs = {"train": "train"}
    for candidate in ("val", "validation", "test"):
        if (root / candidate).is_dir():
            split_dirs["val"] = candidate
            break
    labelled = all(_sub_dirs(root / d) and not _has_top_images(root / d) for d in split_dirs.values())
    classes = {d: _class_files(root / d) for d in split_dirs.values()} if labelled else {}
    names = sorted({c for per_split in classes.values() for c in per_split}) if labelled else None
    splits, digest = {}, hashlib.sha256()
    for split, d in split_dirs.items():
        items = _class_items(root, classes[d], names) if labelled else _flat_items(root, root / d)
        _stat_digest(root, [root / i for i in items.ids], digest)
        splits[split] = items
    return Source(kind, str(root), digest.hexdigest(), splits, names)


def _read_file_list(path: Path) -> tuple[list[str], list[str] | None]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".txt":
        rows = [[line.strip()] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    else:
        rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)]
        if rows and rows[0][0].strip().lower() in {"path", "file", "filename", "filepath", "image", "img"}:
            rows = rows[1:]
    paths = [r[0].strip() for r in rows]
    has_label = [len(r) > 1 and r[1].strip() != "" for r in rows]
    if not any(has_label):
        return paths, None
    if not all(has_label):
        row = has_label.index(False) + 1
        raise UserError(f"{path.name}: row {row} has no label while others do (give every row a label, or none)")
    return paths, [r[1].strip() for r in rows]


def _list_source(path: Path) -> Source:
    entries, raw_labels = _read_file_list(path)
    if not entries:
        raise UserError(f"file list {path} names no files")
    root = path.parent
    files = [Path(e) if Path(e).is_absolute() else root / e for e in entries]
    labels, names = None, None
    if raw_labels is not None:
        try:
            labels = np.asarray([int(v) for v in raw_labels], dtype=np.int64)
            if labels.min() < 0:
                raise UserError(f"{path.name}: labels must be >= 0 (found {labels.min()})")
        except ValueError:
            names = sorted(set(raw_labels))
            labels = np.asarray([names.index(v) for v in raw_labels], dtype=np.int64)
    digest = hashlib.sha256(path.read_bytes())
    for f in files:
        try:
            st = f.stat()
            digest.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{f}\tmissing\n".encode())
    items = Items(entries, labels, [str(f) for f in files])
    return Source("file-list", str(path), digest.hexdigest(), {"all": items}, names)


def _array_items(images: np.ndarray, labels: np.ndarray | None, tag: str) -> Items:
    return Items([f"{tag}:{i}" for i in range(len(images))], labels, images, decoded=True)


def _cifar_source(kind: str, root: Path) -> Source:
    """CIFAR-10/100 in either official layout: the binary batches or the "python version" pickles."""
    python = (root / ("data_batch_1" if kind == "cifar10" else "train")).is_file()
    splits = {}
    for split, (images, labels) in (_cifar_python if python else _cifar_binary)(kind, root).items():
        images = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> (N, 32, 32, 3)
        splits[split] = _array_items(images, labels.astype(np.int64), split)
    class_names = (_cifar_python_names if python else _cifar_binary_names)(kind, root)
    all_files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    return Source(kind, str(root), _content_digest(all_files), splits, class_names)


def _cifar_files(kind: str, python: bool) -> dict[str, list[str]]:
    ext = "" if python else ".bin"
    if kind == "cifar10":
        return {"train": [f"data_batch_{i}{ext}" for i in range(1, 6)], "val": [f"test_batch{ext}"]}
    return {"train": [f"train{ext}"], "val": [f"test{ext}"]}


def _cifar_file(kind: str, root: Path, name: str) -> Path:
    f = root / name
    if not f.is_file():
        raise UserError(f"{root} looks like {kind} data but has no {name}; fetch it again with `lejepa data fetch {kind}`")
    return f


def _cifar_binary(kind: str, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Records of label byte(s) + 3072 pixel bytes (CIFAR-100: coarse, fine; we keep the 100 fine labels)."""
    record, label_at = (1 + 3072, 0) if kind == "cifar10" else (2 + 3072, 1)
    splits = {}
    for split, names in _cifar_files(kind, python=False).items():
        chunks = []
        for name in names:
            f = _cifar_file(kind, root, name)
            raw = np.fromfile(f, dtype=np.uint8)
            if raw.size == 0 or raw.size % record:
                raise UserError(f"{f} is not a {kind} binary batch ({raw.size} bytes is not a multiple of {record})")
            chunks.append(raw.reshape(-1, record))
        raw = np.concatenate(chunks)
        splits[split] = (raw[:, record - 3072 :], raw[:, label_at])
    return splits


def _cifar_python(kind: str, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pickled dicts {data: (N, 3072) uint8, labels | fine_labels: [int]}, read without unpickling."""
    from lejepa_cli.data.pickle_data import read_pickled_data

    label_key = "labels" if kind == "cifar10" else "fine_labels"
    splits = {}
    for split, names in _cifar_files(kind, python=True).items():
        images, labels = [], []
        for name in names:
            f = _cifar_file(kind, root, name)
            batch = read_pickled_data(f)
            data, batch_labels = _field(batch, "data", f), _field(batch, label_key, f)
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
                raise UserError(f"{f} is not a {kind} python batch: 'data' is not an (N, 3072) uint8 array")
            batch_labels = np.asarray(batch_labels)
            if batch_labels.shape != (len(data),) or batch_labels.dtype.kind not in "iu" or (batch_labels < 0).any():
                raise UserError(f"{f} is not a {kind} python batch: '{label_key}' does not hold one class number per image")
            images.append(data)
            labels.append(batch_labels)
        splits[split] = (np.concatenate(images), np.concatenate(labels))
    return splits


def _field(d: Any, key: str, path: Path) -> Any:
    """d[key] for keys pickled as Python 2 str (bytes) or Python 3 str."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise UserError(f"{path} is not a CIFAR python batch: it has no '{key}' entry")


def _cifar_binary_names(kind: str, root: Path) -> list[str] | None:
    f = root / ("batches.meta.txt" if kind == "cifar10" else "fine_label_names.txt")
    return [n.strip() for n in f.read_text().splitlines() if n.strip()] if f.is_file() else None


def _cifar_python_names(kind: str, root: Path) -> list[str] | None:
    from lejepa_cli.data.pickle_data import read_pickled_data

    f = root / ("batches.meta" if kind == "cifar10" else "meta")
    if not f.is_file():
        return None
    names = _field(read_pickled_data(f), "label_names" if kind == "cifar10" else "fine_label_names", f)
    if not (isinstance(names, list) and all(isinstance(n, (bytes, str)) for n in names)):
        raise UserError(f"{f} is not a {kind} meta file: its class names are not a list of strings")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _idx_source(root: Path) -> Source:
    from lejepa_cli.data.sources import load_idx

    splits = {"train": load_idx(root, "train")}
    idx_files = sorted(p for p in root.iterdir() if "ubyte" in p.name)
    if any(p.name.startswith("t10k-images") for p in idx_files):
        splits["val"] = load_idx(root, "val")
    items = {s: Items(list(d.ids or []), d.labels, np.asarray(d.images), decoded=True) for s, d in splits.items()}
    return Source("idx", str(root), _content_digest(idx_files), items, splits["train"].class_names)


def _npz_source(path: Path) -> Source:
    from lejepa_cli.data.sources import load_npz

    train = load_npz(path, "train")
    with np.load(path, allow_pickle=False) as z:
        has_val = bool({"x_test", "x_val"} & set(z.files))
    fingerprint = _content_digest([path])
    if has_val:
        val = load_npz(path, "val")
        splits = {s: Items(list(d.ids or []), d.labels, np.asarray(d.images), decoded=True) for s, d in (("train", train), ("val", val))}
        return Source("npz", str(path), fingerprint, splits, train.class_names)
    items = Items(list(train.ids or []), train.labels, np.asarray(train.images), decoded=True)
    return Source("npz", str(path), fingerprint, {"all": items}, train.class_names)


def _npy_source(path: Path) -> Source:
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npy file ({str(e).splitlines()[0]})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
        raise UserError(f"{path}: expected uint8 images (N, H, W[, C]) with C in 1/3/4, got {images.dtype} {images.shape}")
    return Source("npy", str(path), _content_digest([path]), {"all": _array_items(images, None, path.name)})


def _builtin_source(size: int) -> Source:
    from lejepa_cli.config import DataConfig
    from lejepa_cli.data.builtin import builtin_dataset

    cfg = DataConfig()
    splits = {
        split: builtin_dataset(split, n=n, size=size)
        for split, n in (("train", cfg.builtin_train), ("val", cfg.builtin_val))
    }
    fingerprint = hashlib.sha256(f"builtin:{cfg.builtin_train}:{cfg.builtin_val}:{size}".encode()).hexdigest()
    items = {s: _array_items(np.asarray(d.images), d.labels, s) for s, d in splits.items()}
    return Source("builtin", "builtin", fingerprint, items, splits["train"].class_names)


class _ArrowImages:
    """Encoded images of one Arrow image column (struct{bytes, path} or binary), row by row."""

    def __init__(self, column: Any, base: Path):
        self.column, self.base = column, base

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> Any:
        value = self.column[i].as_py()
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            p = Path(value.get("path") or "")
            return str(p if p.is_absolute() else self.base / p)
        return value if value is not None else b""


def _parquet_source(path: Path) -> Source:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading Parquet / Hugging Face datasets needs pyarrow: pip install 'lejepa-cli[parquet]'") from None

    def read(f: Path) -> Any:
        if f.suffix == ".parquet":
            return pq.read_table(f)
        with pa.memory_map(str(f)) as source:  # HF save_to_disk writes Arrow IPC streams
            try:
                return pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                return pa.ipc.open_file(source).read_all()

    if path.is_file():
        groups = {"all": [path]}
    elif (path / "dataset_dict.json").is_file():  # HF DatasetDict: one folder per split
        split_names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        groups = {s: sorted((path / s).glob("*.arrow")) for s in split_names}
    else:  # a folder of parquet/arrow files; HF hub names them train-00000-of-00002.parquet
        files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".arrow"))
        groups = {}
        for f in files:
            groups.setdefault(f.name.split("-")[0].split(".")[0], []).append(f)
    val_name = next((n for n in ("validation", "val", "test") if n in groups), None)
    if "train" in groups:
        groups = {"train": groups["train"], **({"val": groups[val_name]} if val_name else {})}
    else:
        groups = {"all": [f for fs in groups.values() for f in fs]}
    def features(folder: Path) -> dict:  # HF keeps ClassLabel names in dataset_info.json
        for f in (folder / "dataset_info.json", (path if path.is_dir() else path.parent) / "dataset_info.json"):
            if f.is_file():
                return json.loads(f.read_text()).get("features") or {}
        return {}

    splits, class_names, all_files = {}, None, []
    for split, files in groups.items():
        if not files:
            raise UserError(f"{path}: split '{split}' has no .parquet/.arrow files")
        table = pa.concat_tables([read(f) for f in files])
        all_files += files
        names = table.column_names
        image_col = next((c for c in ("image", "img", "jpg", "png") if c in names), None)
        if image_col is None:
            image_col = next(
                (c for c in names if pa.types.is_binary(table.schema.field(c).type)
                 or (pa.types.is_struct(table.schema.field(c).type) and table.schema.field(c).type.get_field_index("bytes") >= 0)),
                None,
            )
        if image_col is None:
            raise UserError(f"{path}: no image column found (columns: {', '.join(names)})")
        label_col = next((c for c in ("label", "labels", "fine_label", "class") if c in names), None)
        labels = np.asarray(table.column(label_col).to_numpy(zero_copy_only=False), dtype=np.int64) if label_col else None
        if label_col and class_names is None:
            class_names = (features(files[0].parent).get(label_col) or {}).get("names")
        column = table.column(image_col).combine_chunks()
        tag = files[0].parent.name if split != "all" else path.name
        splits[split] = Items([f"{tag}:{i}" for i in range(len(column))], labels, _ArrowImages(column, files[0].parent))
    return Source("parquet", str(path), _content_digest(all_files), splits, class_names)


def open_source(kind: str, path: Path | None, builtin_size: int = 32) -> Source:
    """List (or load, for array sources) everything a source holds, with its fingerprint."""
    if kind in ("image-folder", "split-folders", "unlabelled-folder"):
        source = _folder_source(kind, path)
    elif kind == "file-list":
        source = _list_source(path)
    elif kind in ("cifar10", "cifar100"):
        source = _cifar_source(kind, path)
    elif kind == "idx":
        source = _idx_source(path)
    elif kind == "npz":
        source = _npz_source(path)
    elif kind == "npy":
        source = _npy_source(path)
    elif kind == "parquet":
        source = _parquet_source(path)
    elif kind == "builtin":
        source = _builtin_source(builtin_size)
    else:
        raise ValueError(kind)
    if sum(len(items) for items in source.splits.values()) == 0:
        raise UserError(f"source {path} holds no images")
    return source


def source_fingerprint(kind: str, path: Path) -> str:
    """The fingerprint `open_source` would give, without decoding or loading the arrays."""
    if kind in ("image-folder", "split-folders", "unlabelled-folder", "file-list"):
        return open_source(kind, path).fingerprint
    if kind in ("cifar10", "cifar100"):
        return _content_digest(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
    if kind == "idx":
        return _content_digest(sorted(p for p in path.iterdir() if "ubyte" in p.name))
    if kind in ("npz", "npy") or (kind == "parquet" and path.is_file()):
        return _content_digest([path])
    return open_source(kind, path).fingerprint


# ---------------------------------------------------------------------------------------------
# Decoding: one image -> (R, R, C) uint8, or a skip reason. Runs in the worker processes.


@functools.cache
def _safe_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin; keep those this Pillow build has
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


class Skip(Exception):
    """This file cannot become a training image; the message is the reason recorded."""


def _to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's convert() clips 16-bit values at 255 instead of scaling them, so scale here.
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return img


def _square(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """Any Pillow image -> (R, R, C) uint8: colour conversion, shorter side to R, centre crop."""
    img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels hold arbitrary colours; show them as a white background would.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    if (w, h) != (resolution, resolution):
        s = min(w, h)  # the centre square, cropped and resized in one resampling pass
        box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _array_image(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> L, L, RGB or RGBA image."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    mode = "L" if arr.ndim == 2 else {3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(arr, mode)


def decode(payload: Any, resolution: int, channels: int) -> np.ndarray:
    """One payload (path, bytes or pixel array) -> (R, R, C) uint8; raises Skip with a reason."""
    if isinstance(payload, np.ndarray):
        if payload.shape == (resolution, resolution, channels):
            return np.asarray(payload, dtype=np.uint8)
        if payload.shape == (resolution, resolution) and channels == 1:
            return np.asarray(payload, dtype=np.uint8)[..., None]
        return _square(_array_image(payload), resolution, channels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(payload, str):
                try:
                    if os.path.getsize(payload) == 0:
                        raise Skip("empty file")
                except (FileNotFoundError, NotADirectoryError):
                    raise Skip("missing file") from None
                fp: Any = payload
            else:
                if not payload:
                    raise Skip("empty file")
                fp = io.BytesIO(payload)
            with Image.open(fp, formats=_safe_formats()) as img:
                if img.format == "JPEG" and img.mode in ("RGB", "L"):
                    img.draft(img.mode, (resolution, resolution))  # DCT-domain downscale, >= R kept
                img = ImageOps.exif_transpose(img)
                return _square(img, resolution, channels)
    except Skip:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Skip(f"too large ({str(e).split(',')[0]})") from None
    except UnidentifiedImageError:
        raise Skip("not an image (or an unsupported format)") from None
    except Exception as e:  # Pillow raises many types on bad data; none may stop the run
        msg = " ".join(str(e).split())[:200]
        raise Skip(f"corrupt or truncated ({type(e).__name__}: {msg})") from None


def _decode_chunk(task: tuple[int, list[Any]], resolution: int, channels: int) -> tuple[int, list[np.ndarray | str]]:
    start, payloads = task
    results: list[np.ndarray | str] = []
    for payload in payloads:
        try:
            results.append(decode(payload, resolution, channels))
        except Skip as e:
            results.append(str(e))
    return start, results


def _set_limits(pixel_limit: int) -> None:
    Image.MAX_IMAGE_PIXELS = pixel_limit
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a skip, not a grey-padded image


def _worker_init(pixel_limit: int, main_pid: int) -> None:
    _set_limits(pixel_limit)
    # Pool workers outlive a SIGKILLed parent (they hold their own end of the task pipe); a
    # watchdog makes them exit instead of lingering.
    ppid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass
            if os.getppid() != ppid:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _can_spawn() -> bool:
    """Spawned workers re-import the main script by path; with `python - < script` there is none,
    and the pool would restart crashing workers forever."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def _probe(payload: Any) -> tuple[tuple[int, int], bool] | None:
    """(size, is_grey) from the image header only; None when it is not readable."""
    if isinstance(payload, np.ndarray):
        grey = payload.ndim == 2 or payload.shape[-1] == 1
        return (payload.shape[1], payload.shape[0]), grey
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fp = payload if isinstance(payload, str) else io.BytesIO(payload)
            with Image.open(fp, formats=_safe_formats()) as img:
                return img.size, img.mode in GREY_MODES
    except Exception:
        return None


def decide_geometry(splits: dict[str, Items], resolution: int | None) -> tuple[int, int]:
    """(resolution, channels): grey (1) only when every image is; the size kept only when all
    images already share one size <= 64 px, else 256. Stops reading headers once both are known."""
    sizes: set[tuple[int, int]] = set()
    grey, mixed = True, False
    for items in splits.values():
        if items.decoded and len(items):  # arrays: one shape for all
            probe = _probe(items.payloads[0])
            sizes.add(probe[0])
            grey = grey and probe[1]
            continue
        for i in range(len(items)):
            probe = _probe(items.payloads[i])
            if probe is None:
                continue
            sizes.add(probe[0])
            grey = grey and probe[1]
            mixed = len(sizes) > 1 or max(probe[0]) > SMALL_SIDE
            if not grey and (mixed or resolution is not None):
                break
        if not grey and (mixed or resolution is not None):
            break
    if resolution is None:
        one = len(sizes) == 1 and max(next(iter(sizes))) <= SMALL_SIDE
        resolution = min(next(iter(sizes))) if one else DEFAULT_RESOLUTION
    return int(resolution), 1 if grey and sizes else 3


# ---------------------------------------------------------------------------------------------
# Writing: shards, journal, resume


def _split_items(source: Source, val_fraction: float, seed: int) -> dict[str, Items]:
    if source.official_splits:
        return dict(source.splits)
    items = source.splits["all"]
    n_val = int(round(len(items) * val_fraction))
    if val_fraction > 0 and len(items) > 1:
        n_val = min(max(n_val, 1), len(items) - 1)
    if n_val == 0:
        return {"train": items}
    perm = np.random.default_rng(seed).permutation(len(items))
    # Each split keeps source order (sorted indices): shards then follow folder order.
    return {"train": items.subset(np.sort(perm[n_val:])), "val": items.subset(np.sort(perm[:n_val]))}


def _journal(out: Path, split: str, k: int) -> Path:
    return out / PARTIAL / f"{split}-{k:05d}.json"


def _completed(out: Path, split: str, n_items: int, shard_size: int, geometry: tuple[int, int]) -> list[dict]:
    """The journalled shards of a split that are intact on disk, in order."""
    R, C = geometry
    records: list[dict] = []
    end = 0
    while True:
        try:
            rec = json.loads(_journal(out, split, len(records)).read_text())
            ok = rec["start"] == end and rec["count"] == len(rec["kept"]) <= shard_size and end < rec["end"] <= n_items
        except (OSError, ValueError, KeyError, TypeError):
            break
        if ok and rec["count"]:
            try:
                shape = np.load(out / split / rec["file"], mmap_mode="r", allow_pickle=False).shape
                ok = shape == (rec["count"], R, R, C)
            except (OSError, ValueError):
                ok = False
        if not ok:
            break
        records.append(rec)
        end = rec["end"]
        if end == n_items:
            break
    return records


def _results(items: Items, start: int, geometry: tuple[int, int], pool: Any, chunk: int = 32) -> Iterator[tuple[int, np.ndarray | str]]:
    """(position, image or skip reason) for every item from `start`, in order."""
    tasks = ((s, [items.payloads[p] for p in range(s, min(s + chunk, len(items)))]) for s in range(start, len(items), chunk))
    fn = functools.partial(_decode_chunk, resolution=geometry[0], channels=geometry[1])
    for s, results in (pool.imap(fn, tasks) if pool is not None else map(fn, tasks)):
        yield from enumerate(results, start=s)


def _write_split(out: Path, split: str, items: Items, geometry: tuple[int, int], shard_size: int, pool: Any, advance: Any) -> list[dict]:
    R, C = geometry
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    records = _completed(out, split, len(items), shard_size, geometry)
    start = records[-1]["end"] if records else 0
    advance(start)
    if records and start == len(items):
        return records

    def commit(end: int) -> None:
        k = len(records)
        name = shards.shard_name(k) if fill else None
        sha = shards.write_array(folder / name, buf[:fill]) if fill else None
        rec = {"start": start, "end": end, "count": fill, "file": name, "sha256": sha, "kept": kept, "skipped": skipped}
        shards.write_json(_journal(out, split, k), rec)  # after the shard: journalled => complete
        records.append(rec)

    buf = np.empty((shard_size, R, R, C), dtype=np.uint8)  # (S, R, R, C)
    fill, kept, skipped = 0, [], []
    for p, result in _results(items, start, geometry, pool):
        if isinstance(result, str):
            skipped.append({"path": items.ids[p], "reason": result})
        else:
            buf[fill] = result
            fill += 1
            kept.append(p)
        advance(1)
        if fill == shard_size:
            commit(p + 1)
            fill, kept, skipped, start = 0, [], [], p + 1
    if start < len(items) or not records:
        commit(len(items))
    return records


def _finalise(
    out: Path, source: Source, plan: dict, split_items: dict[str, Items], records: dict[str, list[dict]], geometry: tuple[int, int]
) -> dict:
    R, C = geometry
    index_splits, skipped_all = {}, []
    for split, items in split_items.items():
        recs = records[split]
        kept = np.asarray([p for r in recs for p in r["kept"]], dtype=np.int64)
        skipped_all += [{"split": split, **s} for r in recs for s in r["skipped"]]
        if split != "train" and len(kept) == 0:  # an empty val split would only fail later, less clearly
            shutil.rmtree(out / split, ignore_errors=True)
            continue
        entry: dict[str, Any] = {
            "count": int(len(kept)),
            "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]} for r in recs if r["count"]],
            "labels": None,
            "ids": shards.IDS,
        }
        if items.labels is not None:
            sha = shards.write_array(out / split / shards.LABELS, items.labels[kept].astype(np.int64))
            entry["labels"] = {"file": shards.LABELS, "sha256": sha}
        shards.write_json(out / split / shards.IDS, [items.ids[p] for p in kept])
        digest = hashlib.sha256(json.dumps([entry["shards"], entry["labels"], R, C]).encode())
        entry["fingerprint"] = digest.hexdigest()[:16]
        index_splits[split] = entry
    lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped_all)
    shards.write_bytes(out / shards.SKIPPED, lines.encode("utf-8"))
    train = index_splits["train"]
    if train["count"] == 0:
        raise UserError(f"no decodable images in {source.path} ({len(skipped_all)} skipped, reasons in {out / shards.SKIPPED})")
    reader = shards.ShardedImages([out / "train" / s["file"] for s in train["shards"]], [s["count"] for s in train["shards"]], (R, R, C))
    mean, std = ([round(float(v), 6) for v in stats] for stats in channel_stats(reader))
    index = {
        "format": shards.FORMAT,
        "version": shards.VERSION,
        "resolution": R,
        "channels": C,
        "class_names": source.class_names,
        "num_classes": _num_classes(source.class_names, split_items),
        "mean": mean,
        "std": std,
        "splits": index_splits,
        "source": {"path": source.path, "kind": source.kind, "fingerprint": source.fingerprint, "plan": plan},
        "num_skipped": len(skipped_all),
        "skipped": skipped_all[:MAX_SKIPPED_IN_INDEX],  # all of them are in skipped.jsonl
    }
    shards.write_json(out / shards.INDEX, index)  # last: its presence means the folder is complete
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return index


def _num_classes(class_names: list[str] | None, split_items: dict[str, Items]) -> int:
    if class_names:
        return len(class_names)
    maxima = [int(items.labels.max()) for items in split_items.values() if items.labels is not None and len(items.labels)]
    return max(maxima, default=-1) + 1


def _wipe(out: Path) -> None:
    """Remove what a previous prepare wrote (and nothing else) before writing a new dataset."""
    ours = {shards.INDEX, shards.SKIPPED, PARTIAL}
    for entry in sorted(out.iterdir()):
        if entry.name in ours:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        elif entry.is_dir() and all(
            f.name.startswith("shard-") or f.name in (shards.LABELS, shards.IDS) or f.name.endswith(".tmp") for f in entry.iterdir()
        ):
            shutil.rmtree(entry)
    if any(out.iterdir()):
        raise UserError(f"{out} holds files that prepare did not write; choose an empty folder for --out")


def _check_out(out: Path, plan: dict, overwrite: bool) -> str:
    """'done', 'resume' or 'fresh' for an --out folder; refuses to clobber a different dataset."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    index_file, plan_file = out / shards.INDEX, out / PARTIAL / "plan.json"
    if {e.name for e in out.iterdir()} == {PARTIAL} and not plan_file.exists():
        shutil.rmtree(out / PARTIAL)  # killed before its plan was written: nothing to keep
        return "fresh"
    if index_file.exists():
        try:
            old = shards.read_index(out)["source"]["plan"]
        except (UserError, KeyError, TypeError):
            old = None
        if old == plan:
            return "done"
        if not overwrite:
            raise UserError(f"{out} already holds a different prepared dataset; pass --overwrite to replace it")
    elif plan_file.exists():
        try:
            old = {k: v for k, v in json.loads(plan_file.read_text()).items() if k != "geometry"}
        except (OSError, ValueError):
            old = None
        if old == plan:
            return "resume"
        if not overwrite:
            raise UserError(f"{out} holds an unfinished prepare of a different source or settings; re-run that one, or pass --overwrite")
    elif not overwrite:
        raise UserError(f"{out} is not empty and is not a prepared dataset; choose an empty folder for --out")
    _wipe(out)
    return "fresh"


def prepare(
    source: str | Path,
    out: Path,
    *,
    resolution: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 2,
    pixel_limit: int = 89_478_485,
    fmt: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    shard_size: int | None = None,
) -> dict:
    """Decode SOURCE into fixed-size uint8 shards under `out`; returns a summary dict.

    `fmt` forces a source kind (one of KINDS) instead of detecting it.
    `shard_size` (images per shard) defaults to 4096, fewer for large images (~256 MiB a shard).
    A trajectory file (.npz with frames + actions, or .h5/.hdf5) becomes a trajectory folder
    instead (world/build.py); its summary has kind "trajectories".
    """
    if fmt == "auto" and str(source) != "builtin":
        from lejepa_cli.world.files import is_trajectory_file

        if is_trajectory_file(Path(source).expanduser()):
            from lejepa_cli.world.build import prepare_trajectory_file

            return prepare_trajectory_file(source, out, resolution=resolution, val_fraction=val_fraction, seed=seed,
                                           overwrite=overwrite, progress=progress)
    t0 = time.perf_counter()
    out = Path(out).expanduser().resolve()
    if resolution is not None and not 8 <= resolution <= 4096:
        raise UserError(f"--resolution must be between 8 and 4096, got {resolution}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers < 0 or pixel_limit < 1 or (shard_size is not None and shard_size < 1):
        raise UserError("--workers must be >= 0, pixel_limit and shard_size >= 1")
    kind, path = detect_source(source)
    if fmt != "auto":
        if fmt not in KINDS:
            raise UserError(f"unknown source format '{fmt}' (choose from auto, {', '.join(KINDS)})")
        kind = fmt
    if path is not None and path.is_dir() and out.is_relative_to(path):
        raise UserError(f"--out {out} is inside the source folder {path}; choose a folder outside it")
    src = open_source(kind, path, builtin_size=resolution or 32)
    plan = {
        "source": src.path, "kind": src.kind, "fingerprint": src.fingerprint, "resolution": resolution,
        "val_fraction": val_fraction if not src.official_splits else 0.0, "seed": seed,
        "pixel_limit": pixel_limit, "shard_size": shard_size,
    }
    state = _check_out(out, plan, overwrite)
    if state == "done":
        shutil.rmtree(out / PARTIAL, ignore_errors=True)  # left if killed right after index.json
        index = shards.read_index(out)
        return _summary(out, index, resumed=False, up_to_date=True, seconds=time.perf_counter() - t0, decoded=0)
    if src.official_splits and val_fraction > 0:
        _console().print(f"[yellow]{src.path} has official train/val splits; --val-fraction {val_fraction} ignored[/]")
    split_items = _split_items(src, val_fraction, seed)
    old_limits = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    _set_limits(pixel_limit)
    try:
        if state == "resume":
            geometry = tuple(json.loads((out / PARTIAL / "plan.json").read_text())["geometry"])
        else:
            geometry = decide_geometry(split_items, resolution)
            (out / PARTIAL).mkdir(parents=True, exist_ok=True)
            shards.write_json(out / PARTIAL / "plan.json", {**plan, "geometry": list(geometry)})
        R, C = geometry
        size = shard_size or max(1, min(4096, SHARD_BYTES // (R * R * C)))
        needs_decode = any(not items.decoded or (len(items) and items.payloads[0].shape != (R, R, C)) for items in split_items.values())
        total = sum(len(items) for items in split_items.values())
        records = {}
        with _progress(progress) as bar, _decode_pool(workers if needs_decode else 0, pixel_limit) as pool:
            task = bar.add_task(f"prepare {Path(src.path).name}", total=total)
            for split, items in split_items.items():
                records[split] = _write_split(out, split, items, geometry, size, pool, lambda n: bar.advance(task, n))
        index = _finalise(out, src, plan, split_items, records, geometry)
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limits
    seconds = time.perf_counter() - t0
    return _summary(out, index, resumed=state == "resume", up_to_date=False, seconds=seconds, decoded=0 if state == "resume" else total)


@contextlib.contextmanager
def _decode_pool(workers: int, pixel_limit: int) -> Iterator[Any]:
    """A pool of decode processes (None: decode in this process)."""
    if workers > 0 and not _can_spawn():
        _console().print("[yellow]the main script came from stdin, which worker processes cannot re-import; decoding in this process[/]")
        workers = 0
    if workers == 0:
        yield None
        return
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, _worker_init, (pixel_limit, os.getpid()))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _progress(enabled: bool) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=_console(), disable=not enabled,
    )


def _summary(out: Path, index: dict, *, resumed: bool, up_to_date: bool, seconds: float, decoded: int) -> dict:
    return {
        "out": str(out),
        "source": index["source"]["path"],
        "kind": index["source"]["kind"],
        "splits": {s: e["count"] for s, e in index["splits"].items()},
        "resolution": index["resolution"],
        "channels": index["channels"],
        "num_classes": index["num_classes"],
        "class_names": index["class_names"],
        "mean": index["mean"],
        "std": index["std"],
        "skipped": index["num_skipped"],
        "skipped_file": str(out / shards.SKIPPED),
        "resumed": resumed,
        "up_to_date": up_to_date,
        "seconds": round(seconds, 3),
        "images_per_second": round(decoded / seconds, 1) if decoded and seconds > 0 else None,
    }


def info(path: str | Path, *, check_source: bool = True) -> dict:
    """Summary of a prepared folder; `source_status` says whether the source changed since
    ("unchanged", "changed", "missing", or "not checked")."""
    path = Path(path).expanduser()
    index = shards.read_index(path)
    src = index["source"]
    status = "not checked"
    if check_source:
        if src["kind"] == "builtin":
            status = "unchanged"  # generated deterministically from the recorded settings
        elif not Path(src["path"]).exists():
            status = "missing"
        else:
            try:
                now = source_fingerprint(src["kind"], Path(src["path"]))
            except UserError:
                now = None
            status = "unchanged" if now == src["fingerprint"] else "changed"
    return {
        "path": str(path),
        "splits": {s: e["count"] for s, e in index["splits"].items()},
        "shards": {s: len(e["shards"]) for s, e in index["splits"].items()},
        "resolution": index["resolution"],
        "channels": index["channels"],
        "num_classes": index["num_classes"],
        "class_names": index["class_names"],
        "labelled": any(e.get("labels") for e in index["splits"].values()),
        "mean": index["mean"],
        "std": index["std"],
        "num_skipped": index["num_skipped"],
        "skipped": index["skipped"],
        "source": src["path"],
        "kind": src["kind"],
        "fingerprint": src["fingerprint"],
        "source_status": status,
    }
