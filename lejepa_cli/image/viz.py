"""`lejepa viz RUN`: training curves and PCA feature maps of a run's encoder, as PNG files.

    written = write_viz("runs/demo", Path("viz"), num_images=6)   # [training_curves.png, pca_maps.png]

The figures themselves are drawn in plots.py; this module joins them to the probe's loaders (the
probe writes figures too, so plots.py cannot import the probe back).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lejepa_cli import dist
from lejepa_cli.data.sources import load_dataset
from lejepa_cli.image.plots import (
    VIZ_PLOTS, check_image_count, find_metrics, load_image_files, pca_feature_maps, plot_pca_maps, plot_training_curves,
    sample_images,
)
from lejepa_cli.image.probe import load_probe_encoder, probe_data_config
from lejepa_cli.outputs import check_output_folder


def write_viz(source: str | Path, out: Path, *, images: Sequence[Path] = (), num_images: int = 6,
              data: str | None = None, split: str = "val", device: str = "auto", overwrite: bool = False) -> list[Path]:
    """`lejepa viz`: training curves (when the run's metrics.jsonl is found) and PCA feature maps
    of `images` (files) or of `num_images` images of the encoder's data. Files in `out` that this
    tool did not draw are replaced only with `overwrite`."""
    if images:
        check_image_count(len(images), "--image (the number of files)")
    else:
        check_image_count(num_images, "--num-images")
    check_output_folder(out, "--out", files=VIZ_PLOTS, overwrite=overwrite)  # before the work, not after it
    dev = dist.select_device(device)
    encoder = load_probe_encoder(source, device=dev)
    written = []
    metrics = find_metrics(source)
    if metrics is not None:
        written.append(plot_training_curves(metrics, out / "training_curves.png"))
    if images:
        pixels = load_image_files(images, int(encoder.lejepa_info["channels"]))
    else:
        pixels = sample_images(load_dataset(probe_data_config(encoder.lejepa_info, data), split), num_images)
    maps = pca_feature_maps(encoder, pixels, device=dev)
    written.append(plot_pca_maps(pixels, maps, out / "pca_maps.png"))
    return written
