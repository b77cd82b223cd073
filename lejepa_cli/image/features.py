"""Features of a frozen encoder over a dataset, with an on-disk cache (what `lejepa probe` reads).

Features are cached under $LEJEPA_CACHE_DIR/features (default ~/.cache/lejepa/features) as
safetensors + a JSON description, keyed by a digest of the encoder's weights, the data
fingerprint and the transform, so probing the same encoder and data again skips extraction.
The cache is an optimisation: a cache folder that cannot be written (read-only disk, no
permission, disk full) costs one yellow warning and the probe runs uncached.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file
from torch import nn

from lejepa_cli._version import __version__
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.image.evaluate import extract_features
from lejepa_cli.image.corruptions import describe, make_corruption


def cache_root() -> Path:
    """$LEJEPA_CACHE_DIR, else ~/.cache/lejepa."""
    return Path(os.environ.get("LEJEPA_CACHE_DIR") or Path.home() / ".cache" / "lejepa").expanduser()


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey data for an RGB encoder (repeat) or RGB data for a grey one (luma)."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1)
    luma = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


@dataclass
class FeatureSource:
    """An encoder ready to extract features from, with what makes its features unique."""

    encoder: nn.Module
    digest: str
    device: torch.device
    batch_size: int = 256
    cache_dir: Path | None = None  # None: no disk cache
    progress: bool = False
    extractions: int = field(default=0)  # passes over data actually run (not served from cache)

    @property
    def info(self) -> dict[str, Any]:
        return self.encoder.lejepa_info

    @property
    def autocast(self) -> torch.dtype | None:
        """bf16 autocast on CUDA (as training uses), full fp32 elsewhere."""
        return torch.bfloat16 if self.device.type == "cuda" else None

    def features(self, dataset: ImageDataset, *, kind: str = "probe", corruption: tuple[str, int] | None = None,
                 max_images: int | None = None, label: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features (N, F) float32 on the CPU and labels (N,) of `dataset`.

        kind "probe" reads `probe_features`, "embedding" the embedding h (`forward`).
        """
        info = self.info
        channels = int(info["channels"])
        spec = {
            "encoder": self.digest, "kind": kind,
            "data": {"name": dataset.name, "fingerprint": dataset.fingerprint, "size": len(dataset),
                     "channels": dataset.channels, "resolution": dataset.resolution},
            "transform": {"eval": "resize-bilinear-antialias", "size": int(info["image_size"]),
                          "mean": [float(m) for m in info["mean"]], "std": [float(s) for s in info["std"]],
                          "channels": channels, "corruption": describe(*corruption) if corruption else None},
            "max_images": max_images, "precision": str(self.autocast).removeprefix("torch.") if self.autocast else "fp32",
            "version": __version__,  # the extraction code itself may change between versions
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]
        # Without a fingerprint two different datasets could share a key: such data is never cached.
        cacheable = self.cache_dir is not None and bool(dataset.fingerprint)
        path = self.cache_dir / f"{key}.safetensors" if cacheable else None
        if path is not None and path.is_file():
            try:
                tensors = load_file(str(path))
                return tensors["features"], tensors.get("labels")
            except Exception:  # a damaged cache entry is recomputed, not fatal
                path.unlink(missing_ok=True)

        corrupt = make_corruption(*corruption) if corruption else None

        def transform(x: torch.Tensor) -> torch.Tensor:
            x = match_channels(x, channels)
            return corrupt(x) if corrupt is not None else x

        fn = self.encoder.probe_features if kind == "probe" else self.encoder.forward
        total = len(dataset) if max_images is None else min(len(dataset), max_images)
        with self._progress(f"features {label or dataset.name}", total) as advance:
            feats, labels = extract_features(
                fn, dataset, size=int(info["image_size"]), device=self.device, mean=info["mean"], std=info["std"],
                batch_size=self.batch_size, max_images=max_images, transform=transform, on_batch=advance,
                autocast_dtype=self.autocast,
            )
        self.extractions += 1
        if path is not None and self.cache_dir is not None:
            try:
                _save_features(path, feats, labels, spec)
            except OSError as e:  # read-only or full disk: keep the features, stop caching
                warn_uncached(self.cache_dir, e.strerror or str(e))
                self.cache_dir = None
        return feats, labels

    def _progress(self, description: str, total: int):
        if not self.progress:
            return nullcontext(lambda n: None)
        return _ProgressBar(description, total)


class _ProgressBar:
    def __init__(self, description: str, total: int):
        from lejepa_cli.logs import console

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True)
        self.task = self.bar.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self.bar.start()
        return lambda n: self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _save_features(path: Path, feats: torch.Tensor, labels: torch.Tensor | None, spec: dict[str, Any]) -> None:
    """safetensors for the arrays, a JSON sidecar saying what they are; both written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"features": feats.contiguous()}
    if labels is not None:
        tensors["labels"] = labels.contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"spec": json.dumps(spec)})
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    tmp = side.with_name(f".{side.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({**spec, "shape": list(feats.shape)}, indent=1))
    os.replace(tmp, side)


def warn_uncached(folder: Path, reason: str) -> None:
    """The one warning for a cache folder that cannot be written."""
    from lejepa_cli.logs import console

    console.print(f"[yellow]feature cache {folder} is not writable ({reason}): running without the cache "
                  "(set LEJEPA_CACHE_DIR to a writable folder, or pass --no-cache)[/]", highlight=False, soft_wrap=True)


def usable_cache_dir(folder: Path) -> Path | None:
    """`folder` (created) when cache files can be written in it; else None, after one warning."""
    from lejepa_cli.outputs import writable_folder

    try:
        folder.mkdir(parents=True, exist_ok=True)
        reason = writable_folder(folder)
    except OSError as e:
        reason = e.strerror or str(e)
    if reason is not None:
        warn_uncached(folder, reason)
        return None
    return folder
