"""Embeddings of a dataset under a trained encoder: `lejepa embed ENCODER DATA --out FILE`.

    lejepa embed exports/demo photos/ --out emb.npy          # emb.npy (N, D) + emb.ids.json
    lejepa embed runs/demo prepared/in1k --split val --out emb.parquet

ENCODER is anything `load_encoder` reads (export folder, checkpoint, run folder). DATA is a
prepared folder (`lejepa data prepare`) or any source prepare reads (image folder with or
without class sub-folders, file list, IDX, .npz, builtin ...); raw sources are decoded batch by
batch as prepare decodes them (shorter side to the encoder's image size, centre crop). Images
are normalised with the encoder's training mean/std, never the new data's.

Files a raw source holds that cannot be decoded are skipped, as `lejepa data prepare` skips
them, and listed in FILE.skipped.jsonl beside the output.

Outputs, one row per decodable image in the source's order:
  .npy      float32 (N, D), plus FILE.ids.json: {"ids", "labels" (or null), "class_names", ...}
  .parquet  columns id, label (when known), embedding (fixed-size list of float32); needs pyarrow
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from lejepa_cli import dist
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.data.disk import require_space, tree_bytes
from lejepa_cli.errors import UserError
from lejepa_cli.image.evaluate import extract_features
from lejepa_cli.export import load_encoder
from lejepa_cli.outputs import atomic_output, check_output_file

FEATURES = ("embedding", "probe")
SUFFIXES = (".npy", ".parquet")


class DecodedOnRequest:
    """The ImageArray protocol over undecoded source items: each batch is decoded when indexed.

    A file that cannot be decoded is skipped as `lejepa data prepare` skips it: its row is
    filled with zeros, its position and reason are recorded in `skipped`, and `embed` drops
    the row before writing.
    """

    def __init__(self, items: Any, size: int, channels: int):
        self.items = items
        self.shape = (len(items), size, size, channels)
        self.skipped: dict[int, str] = {}  # position -> reason

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        from lejepa_cli.data.decode import Skip, decode

        out = np.zeros((len(index), *self.shape[1:]), np.uint8)  # (B, R, R, C)
        for j, i in enumerate(np.asarray(index).tolist()):
            try:
                out[j] = decode(self.items.payloads[i], self.shape[1], self.shape[3])
            except Skip as e:
                self.skipped[i] = str(e)
        return out


def open_data(data: str | Path, split: str | None, *, size: int, channels: int) -> ImageDataset:
    """A prepared folder's split (memory-mapped) or a raw source's images decoded at `size`."""
    from lejepa_cli.data.formats import is_trajectory_file
    from lejepa_cli.data.shards import is_prepared, is_trajectory_folder, load_prepared

    path = Path(data).expanduser()
    if is_trajectory_folder(path) or is_trajectory_file(path):
        raise UserError(f"{data} is a trajectory dataset (episodes with actions), not images: `lejepa embed` embeds "
                        f"images (a prepared image folder, an image folder, an IDX folder, an .npz or builtin)")
    if is_prepared(data):
        dataset = load_prepared(data, split or "train", ids=True)
        if dataset.channels != channels:
            raise UserError(f"{data} has {dataset.channels}-channel images; the encoder takes {channels}")
        return dataset
    from lejepa_cli.data.readers import detect_source, open_source

    source = open_source(*detect_source(data))
    name = split or ("all" if "all" in source.splits else "train")
    if name not in source.splits:
        if "all" not in source.splits:
            raise UserError(f"{data} has splits {', '.join(source.splits)}, not '{name}'")
        name = "all"  # a source without official splits: every image
    items = source.splits[name]
    return ImageDataset(images=DecodedOnRequest(items, size, channels), labels=items.labels,
                        class_names=source.class_names, name=str(data), ids=list(items.ids))


def embed(
    encoder: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    features: str = "embedding",
    batch_size: int = 256,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the `features` ("embedding": h; "probe": what linear probes read) of every image of
    `data` to `out` (.npy + .ids.json, or .parquet); returns a summary."""
    out = Path(out)
    if features not in FEATURES:
        raise UserError(f"--features {features} is not allowed: expected one of {', '.join(FEATURES)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise UserError(f"--batch-size must be a whole number >= 1, got {batch_size!r}")
    check_output_file(out, "--out", overwrite=overwrite, suffixes=SUFFIXES)  # before the work: a read-only disk fails now, not after it
    for side in (ids_path(out), skipped_path(out)):  # written beside it: the same rule
        check_output_file(side, "--out", overwrite=overwrite)
    if out.suffix.lower() == ".parquet":
        _require_pyarrow()
    dev = dist.select_device(device)  # errors name --device, the option the user gave
    model = load_encoder(encoder, dev)
    info = model.lejepa_info
    dataset = open_data(data, split, size=info["image_size"], channels=info["channels"])
    if len(dataset) == 0:
        raise UserError(f"{data} holds no images to embed" + (f" in split '{split}'" if split else ""))
    fn = model if features == "embedding" else model.probe_features
    dim = model.embed_dim if features == "embedding" else model.feature_dim
    require_space(out, len(dataset) * dim * 4, f"the embeddings ({len(dataset)} x {dim} float32)",
                  replaces=tree_bytes(out) if overwrite else 0)
    kwargs = dict(size=info["image_size"], device=dev, mean=info["mean"], std=info["std"], batch_size=batch_size)
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("embed", total=len(dataset))
            feats, labels = extract_features(fn, dataset, on_batch=lambda n: bar.advance(task, n), **kwargs)
    else:
        feats, labels = extract_features(fn, dataset, **kwargs)
    ids = dataset.ids if dataset.ids is not None else [str(i) for i in range(len(dataset))]
    array = feats.numpy().astype(np.float32, copy=False)  # (N, D)
    labels_np = None if labels is None else labels.numpy()
    skipped = getattr(dataset.images, "skipped", {})
    skip_file = skipped_path(out)
    if skipped:  # rows of undecodable files are dropped; the files are listed beside the output
        if len(skipped) == len(ids):
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_skipped(skip_file, ids, skipped)
            raise UserError(f"no decodable images in {data} ({len(skipped)} skipped, reasons in {skip_file})")
        keep = np.array([i not in skipped for i in range(len(ids))])
        array, ids = array[keep], [x for x, k in zip(ids, keep) if k]
        labels_np = None if labels_np is None else labels_np[keep]
    sidecar = {"ids": ids, "labels": None if labels_np is None else labels_np.tolist(),
               "class_names": dataset.class_names, "encoder": str(encoder), "data": str(data),
               "features": features, "count": len(ids), "dim": int(array.shape[1]), "step": info.get("step"),
               "skipped": len(skipped)}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        _write_npy(out, array, sidecar)
    else:
        _write_parquet(out, array, ids, labels_np)
    if skipped:
        _write_skipped(skip_file, dataset.ids or [], skipped)
    else:
        skip_file.unlink(missing_ok=True)  # a list left by the output this one replaced
    return {"out": str(out), "rows": len(ids), "dim": int(array.shape[1]), "labels": labels_np is not None,
            "features": features, "device": str(dev), "skipped": len(skipped),
            "skipped_file": str(skip_file) if skipped else None}


def ids_path(out: Path) -> Path:
    """emb.npy -> emb.ids.json"""
    return out.with_suffix(".ids.json")


def skipped_path(out: Path) -> Path:
    """emb.npy -> emb.skipped.jsonl: one {"path", "reason"} line per file that could not be decoded."""
    return out.with_suffix(".skipped.jsonl")


def _write_skipped(path: Path, ids: list[str], skipped: dict[int, str]) -> None:
    lines = "".join(json.dumps({"path": ids[i], "reason": reason}, ensure_ascii=False) + "\n"
                    for i, reason in sorted(skipped.items()))
    with atomic_output(path) as tmp:
        tmp.write_text(lines)


def _write_npy(out: Path, array: np.ndarray, sidecar: dict[str, Any]) -> None:
    with atomic_output(out) as tmp, atomic_output(ids_path(out)) as meta_tmp:  # both, or neither
        with open(tmp, "wb") as f:  # a file object, so np.save adds no second .npy suffix
            np.save(f, array)
        meta_tmp.write_text(json.dumps(sidecar) + "\n")


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise UserError("writing .parquet needs pyarrow: pip install 'lejepa-cli[parquet]', or use --out FILE.npy") from None


def _write_parquet(out: Path, array: np.ndarray, ids: list[str], labels: np.ndarray | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, d = array.shape
    columns = {"id": pa.array(ids, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.int64())
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(array).reshape(-1)), d)
    with atomic_output(out) as tmp:
        pq.write_table(pa.table(columns), str(tmp))

