"""CIFAR-10/100 in either official layout, read into arrays: the binary batches (cifar-10-batches-bin,
cifar-100-binary) or the "python version" pickles (cifar-10-batches-py, cifar-100-python), which
pickle_data.py reads without unpickling. readers.py turns them into a prepare source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli.errors import UserError


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


def cifar_binary(kind: str, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def cifar_python(kind: str, root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def cifar_binary_names(kind: str, root: Path) -> list[str] | None:
    f = root / ("batches.meta.txt" if kind == "cifar10" else "fine_label_names.txt")
    return [n.strip() for n in f.read_text().splitlines() if n.strip()] if f.is_file() else None


def cifar_python_names(kind: str, root: Path) -> list[str] | None:
    from lejepa_cli.data.pickle_data import read_pickled_data

    f = root / ("batches.meta" if kind == "cifar10" else "meta")
    if not f.is_file():
        return None
    names = _field(read_pickled_data(f), "label_names" if kind == "cifar10" else "fine_label_names", f)
    if not (isinstance(names, list) and all(isinstance(n, (bytes, str)) for n in names)):
        raise UserError(f"{f} is not a {kind} meta file: its class names are not a list of strings")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
