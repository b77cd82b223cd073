"""Raw image sources for `lejepa data prepare`: what to decode, in which order, with which labels.

    from lejepa_cli.data.readers import detect_source, open_source
    source = open_source(*detect_source("~/data/imagenet/train"))  # Source: splits of Items, fingerprint

Sources (detected from what SOURCE is):
  - a folder of class sub-folders (ImageNet layout), or one with train/ and val/ folders of them
    (Imagenette layout; the official splits are kept);
  - any other folder: every image below it, unlabelled;
  - a file list: .txt (one path per line) or .csv (path[,label]), paths relative to the list;
  - an IDX folder (MNIST / Fashion-MNIST) and the CIFAR-10/100 folders, binary (cifar-10-batches-bin,
    cifar-100-binary) or "python version" (cifar-10-batches-py, cifar-100-python), read by cifar.py
    (the pickles by pickle_data.py, never unpickled): official train/test splits become train/val;
  - .npz / .npy arrays; Parquet files or a Hugging Face `save_to_disk` folder (needs pyarrow);
  - "builtin": the procedural shapes dataset.

Nothing is decoded here (decode.py does that): folders and lists give file paths, Parquet gives
encoded bytes, array sources give pixel arrays. Each source has a fingerprint (paths, sizes and
mtimes for folders and lists; the contents' hash for array, IDX, CIFAR and Parquet files) that
`lejepa data info` compares to tell whether the source changed after it was prepared.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lejepa_cli.data import shards
from lejepa_cli.data.cifar import cifar_binary, cifar_binary_names, cifar_python, cifar_python_names
from lejepa_cli.data.inputs import load_npy, npz_names
from lejepa_cli.errors import UserError

IMAGE_EXTS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi",
}
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
    if not path.is_dir():  # a pipe, socket or device: never opened (reading a pipe waits forever)
        raise UserError(f"source {source} is not a regular file or folder (a pipe, socket or device)")
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


def _stat_digest(root: Path | None, files: Sequence[Path], digest: Any = None) -> Any:
    """Hash of paths (relative to `root`; as given without one) + sizes + mtimes: cheap, and changes when any file does."""
    digest = digest or hashlib.sha256()
    for f in files:
        name = f.relative_to(root).as_posix() if root is not None else str(f)
        try:
            st = f.stat()
            digest.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{name}\tmissing\n".encode())
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
    digest = _stat_digest(None, files, hashlib.sha256(path.read_bytes()))  # the list's own bytes, then its files
    items = Items(entries, labels, [str(f) for f in files])
    return Source("file-list", str(path), digest.hexdigest(), {"all": items}, names)


def _array_items(images: np.ndarray, labels: np.ndarray | None, tag: str) -> Items:
    return Items([f"{tag}:{i}" for i in range(len(images))], labels, images, decoded=True)


def _cifar_source(kind: str, root: Path) -> Source:
    """CIFAR-10/100 in either official layout: the binary batches or the "python version" pickles."""
    python = (root / ("data_batch_1" if kind == "cifar10" else "train")).is_file()
    splits = {}
    for split, (images, labels) in (cifar_python if python else cifar_binary)(kind, root).items():
        images = np.ascontiguousarray(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> (N, 32, 32, 3)
        splits[split] = _array_items(images, labels.astype(np.int64), split)
    class_names = (cifar_python_names if python else cifar_binary_names)(kind, root)
    all_files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    return Source(kind, str(root), _content_digest(all_files), splits, class_names)


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
    has_val = bool({"x_test", "x_val"} & set(npz_names(path)))
    fingerprint = _content_digest([path])
    if has_val:
        val = load_npz(path, "val")
        splits = {s: Items(list(d.ids or []), d.labels, np.asarray(d.images), decoded=True) for s, d in (("train", train), ("val", val))}
        return Source("npz", str(path), fingerprint, splits, train.class_names)
    items = Items(list(train.ids or []), train.labels, np.asarray(train.images), decoded=True)
    return Source("npz", str(path), fingerprint, {"all": items}, train.class_names)


def _npy_source(path: Path) -> Source:
    images = load_npy(path, mmap=True)
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
