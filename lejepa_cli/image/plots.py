"""PNG plots of a run and of a probe: training curves, eigenvalue spectrum, shift table, PCA maps.

    lejepa viz runs/demo --out plots/                # curves + PCA feature maps of a few images
    lejepa probe CKPT --plots plots/                 # also the spectrum and the shift plot

    from lejepa_cli.image.plots import plot_training_curves
    plot_training_curves(Path("runs/demo/metrics.jsonl"), Path("curves.png"))

Drawn with matplotlib's object API (no pyplot, no global backend switch), so importing this
module changes nothing for a user's own plotting.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from lejepa_cli.errors import UserError
from lejepa_cli.data.inputs import IMAGE_FORMATS, reading, require_file
from lejepa_cli.data.loader import eval_transform
from lejepa_cli.image.limits import MAX_PCA_IMAGES
from lejepa_cli.outputs import save_figure
from lejepa_cli.terminal import plural

if TYPE_CHECKING:
    from lejepa_cli.data.dataset import ImageDataset
    from lejepa_cli.image.features import FeatureSource


PCA_COLUMNS = 8  # image / map pairs per row
# The files each command may write in its plot folder (checked before the work).
VIZ_PLOTS = ("training_curves.png", "pca_maps.png")
PROBE_PLOTS = ("training_curves.png", "spectrum.png", "shift.png", "shift_adapted.png", "pca_maps.png")


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, out: Path) -> Path:
    """The figure as a PNG at `out`, atomically, marked as this tool's (a later run may replace it)."""
    return save_figure(fig, out, format="png")


# ---- training curves -------------------------------------------------------------------------------


def find_metrics(source: str | Path | None) -> Path | None:
    """metrics.jsonl of the run a checkpoint (run/checkpoints/step-*.safetensors) or run folder belongs to."""
    if source is None:  # an untrained encoder of a preset: no run
        return None
    path = Path(source)
    for candidate in (path / "metrics.jsonl", path.parent.parent / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


def plot_training_curves(metrics: Path, out: Path) -> Path:
    """One panel per logged quantity (loss parts, lr, evaluation scores) against the step."""
    records = [r for r in read_metrics(metrics) if "step" in r]
    keys = ["loss", "pred", "sigreg", "loss_scaled", "lr", "probe_acc", "knn_top1", "online_probe_top1"]
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        raise UserError(f"{metrics} holds no training metrics to plot")
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(3.2 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, key in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        steps, values = zip(*pts)
        ax.plot(steps, values, marker="o" if len(pts) < 20 else None, markersize=3)
        if min(values) > 0 and max(values) / min(values) > 30:  # log only where it spans decades
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(f"training curves: {metrics.parent.name}")
    return _save(fig, out)


# ---- conditions and shift ----------------------------------------------------------------------------


def plot_spectrum(spectra: dict[str, Sequence[float]], out: Path) -> Path:
    """Covariance eigenvalues, each divided by their mean (flat at 1 for an isotropic sample), log scale."""
    fig = _figure(6, 4)
    ax = fig.subplots()
    for label, eigs in spectra.items():
        lam = np.asarray(eigs, dtype=np.float64)
        if lam.sum() <= 0:
            continue
        rel = lam / lam.mean()
        keep = rel > 1e-9 * rel.max()  # with fewer samples than dimensions the tail is exactly 0
        ax.plot(np.arange(1, len(lam) + 1)[keep], rel[keep], label=label)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="isotropic")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / mean")
    ax.set_title("covariance spectrum")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_shift(shift: dict[str, Any], out: Path) -> Path:
    """Linear and kNN top-1 per corruption against severity, clean accuracy as severity 0."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, title in ((axes[0], "linear_top1", "linear probe"), (axes[1], "knn_top1", f"kNN (k={shift['knn_k']})")):
        for name, per in shift["corruptions"].items():
            sevs = [0] + [int(s) for s in per]
            accs = [shift["clean"][metric]] + [per[s][metric] for s in per]
            ax.plot(sevs, [100 * a for a in accs], marker="o", label=name)
        ax.set_title(title)
        ax.set_xticks(range(0, 1 + max((len(per) for per in shift["corruptions"].values()), default=0)))
        ax.set_xlabel("severity (0 = clean)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 %")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"robustness under shift ({plural(shift['images'], 'image')})")
    return _save(fig, out)


def plot_shift_adaptation(shift: dict[str, Any], out: Path) -> Path:
    """Clean, corrupted and adapted top-1 side by side per corruption and severity (bars), linear and kNN."""
    adapted = shift["adapted"]
    rows = [(name, sev) for name, per in shift["corruptions"].items() for sev in per]
    fig = _figure(max(8, 0.5 * len(rows) + 2), 6)
    axes = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(rows))
    for ax, metric, title in ((axes[0], "linear_top1", "linear probe"), (axes[1], "knn_top1", f"kNN (k={shift['knn_k']})")):
        before = [shift["corruptions"][n][s][metric] for n, s in rows]
        after = [adapted["corruptions"][n][s][metric] for n, s in rows]
        ax.axhline(100 * shift["clean"][metric], color="grey", linestyle="--", linewidth=1, label="clean")
        ax.bar(x - 0.2, [100 * a for a in before], width=0.4, label="corrupted")
        ax.bar(x + 0.2, [100 * a for a in after], width=0.4, label=f"adapted ({adapted['method']})")
        ax.set_title(title)
        ax.set_ylabel("top-1 %")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(x, [f"{n} {s}" for n, s in rows], rotation=60, ha="right", fontsize=8)
    fig.suptitle(f"label-free adaptation under shift ({shift['images']} images)")
    return _save(fig, out)


# ---- PCA feature maps ------------------------------------------------------------------------------


@torch.no_grad()
def pca_feature_maps(encoder: nn.Module, images: np.ndarray, *, device: torch.device | str = "cpu") -> np.ndarray:
    """RGB maps (B, g, g, 3) in [0, 1]: the first three principal components of the patch tokens
    of all B images together (so colours are comparable across images), one pixel per token."""
    info = encoder.lejepa_info
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # (B, C, H, W) uint8
    if x.shape[1] != int(info["channels"]):
        from lejepa_cli.image.features import match_channels

        x = match_channels(x, int(info["channels"]))
    x = eval_transform(x, int(info["image_size"]), info["mean"], info["std"])
    tokens = encoder.patch_tokens(x).float().cpu()  # (B, L, D)
    b, length, d = tokens.shape
    g = math.isqrt(length)
    if g * g != length:
        raise UserError(f"patch tokens of length {length} are not a square grid")
    flat = tokens.reshape(b * length, d).double()
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    comps = (flat @ v[: min(3, d)].T).numpy()  # (B*L, <=3)
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    return rgb.reshape(b, g, g, 3)


def plot_pca_maps(images: np.ndarray, maps: np.ndarray, out: Path) -> Path:
    """Each image above its PCA feature map, at most PCA_COLUMNS pairs per row."""
    b = len(images)
    cols = min(b, PCA_COLUMNS)
    rows = math.ceil(b / cols)
    fig = _figure(1.8 * cols, 3.8 * rows)
    axes = fig.subplots(2 * rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i in range(b):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        img = images[i]
        top.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        bottom.imshow(maps[i], interpolation="nearest")
        top.set_frame_on(True)
        bottom.set_frame_on(True)
    for r in range(rows):
        axes[2 * r, 0].set_ylabel("image")
        axes[2 * r + 1, 0].set_ylabel("PCA of patches")
    return _save(fig, out)


def load_image_files(paths: Sequence[Path], channels: int) -> np.ndarray:
    """Image files -> (B, S, S, C) uint8, each resized to the first one's size (square)."""
    from PIL import Image

    out = []
    size = None
    for p in paths:
        require_file(p, "an image (--image)")  # never opens a pipe or a folder
        with reading(p, "image", f"cannot read image {p}"), Image.open(p, formats=IMAGE_FORMATS) as im:  # never EPS (Ghostscript)
            im = im.convert("L" if channels == 1 else "RGB")
            size = size or min(max(im.size), 512)
            out.append(np.asarray(im.resize((size, size), Image.BILINEAR)).reshape(size, size, channels))
    return np.stack(out)


def sample_images(dataset: "ImageDataset", count: int) -> np.ndarray:
    """`count` evenly spaced images (B, H, W, C) uint8 of a dataset."""
    check_image_count(count, "--num-images")
    if len(dataset) == 0:
        raise UserError(f"{dataset.name or 'the data'} holds no images to show")
    index = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(np.int64)
    return np.asarray(dataset.batch(index)[0])


def check_image_count(count: Any, option: str) -> None:
    """PCA maps are drawn for 1 to MAX_PCA_IMAGES images (more makes a figure nobody can read,
    and took minutes to draw)."""
    if not (isinstance(count, numbers.Integral) and not isinstance(count, bool) and 1 <= count <= MAX_PCA_IMAGES):
        raise UserError(f"{option} must be between 1 and {MAX_PCA_IMAGES}, got {count!r}")


# ---- bundles used by the commands ------------------------------------------------------------------


def write_probe_plots(folder: Path, report: dict[str, Any], src: "FeatureSource", evaluation: "ImageDataset",
                      source: str | Path, num_images: int = 6) -> list[Path]:
    """Everything `lejepa probe --plots DIR` draws; returns the files written."""
    written = []
    metrics = find_metrics(source)
    if metrics is not None and not report.get("random_init"):
        written.append(plot_training_curves(metrics, folder / "training_curves.png"))
    cond = report.get("conditions")
    if cond:
        spectra = {"embedding h": cond["eigenvalues"]}
        if "projector" in cond:
            spectra["projector z"] = cond["projector"]["eigenvalues"]
        written.append(plot_spectrum(spectra, folder / "spectrum.png"))
    if report.get("shift"):
        written.append(plot_shift(report["shift"], folder / "shift.png"))
        if report["shift"].get("adapted"):
            written.append(plot_shift_adaptation(report["shift"], folder / "shift_adapted.png"))
    images = sample_images(evaluation, num_images)
    maps = pca_feature_maps(src.encoder, images, device=src.device)
    written.append(plot_pca_maps(images, maps, folder / "pca_maps.png"))
    return written
