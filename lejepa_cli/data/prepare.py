"""`lejepa data prepare`: turn an image source into fixed-size uint8 shards (format: shards.py).

    from lejepa_cli.data.prepare import prepare, info
    prepare("~/data/imagenet/train", Path("prepared/in1k"), resolution=224, val_fraction=0.01)

The source is read by readers.py (which kinds of SOURCE it accepts are listed there) and each
image decoded by decode.py; this module splits, writes the shards, and keeps the resume journal.
Files that cannot be decoded are skipped and listed in out/skipped.jsonl; they never stop the
run. The output is deterministic (fixed file order, seeded split), and each completed shard is
journalled in out/.partial/, so a killed prepare re-run with the same arguments resumes and ends
byte-identical to a clean run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageFile

from lejepa_cli.data.dataset import channel_stats
from lejepa_cli.data import shards
from lejepa_cli.data.disk import require_space, tree_bytes
from lejepa_cli.data.decode import _can_spawn, _decode_chunk, _set_limits, _worker_init, decide_geometry
from lejepa_cli.data.formats import is_trajectory_file
from lejepa_cli.data.readers import KINDS, Items, Source, detect_source, open_source, source_fingerprint
from lejepa_cli.errors import UserError
from lejepa_cli.terminal import progress_bar

SHARD_BYTES = 256 << 20  # shards of at most 4096 images and ~256 MiB
PARTIAL = ".partial"
MAX_SKIPPED_IN_INDEX = 1000


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
    A trajectory file (.npz with frames + actions, or .h5/.hdf5) is not an image source: the CLI
    hands it to `lejepa_cli.world.prepare.prepare_trajectory_file`; here it is refused.
    """
    if fmt == "auto" and str(source) != "builtin" and is_trajectory_file(Path(source).expanduser()):
        raise UserError(f"{source} is a trajectory file (frames + actions), not images: prepare it with "
                        f"`lejepa data prepare {source} --out DIR` (or lejepa_cli.world.prepare.prepare_trajectory_file)")
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
        R, C = geometry
        size = shard_size or max(1, min(4096, SHARD_BYTES // (R * R * C)))
        total = sum(len(items) for items in split_items.values())
        require_space(out, total * R * R * C, f"the prepared dataset ({total} images of {R}x{R}x{C})",
                      replaces=tree_bytes(out))  # (a resumed prepare has written part of it)
        if state != "resume":
            (out / PARTIAL).mkdir(parents=True, exist_ok=True)
            shards.write_json(out / PARTIAL / "plan.json", {**plan, "geometry": list(geometry)})
        needs_decode = any(not items.decoded or (len(items) and items.payloads[0].shape != (R, R, C)) for items in split_items.values())
        records = {}
        with progress_bar(progress) as bar, _decode_pool(workers if needs_decode else 0, pixel_limit) as pool:
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
