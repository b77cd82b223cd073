"""The data path: prepared shards + batched views against a conventional per-image pipeline.

    python -m benchmarks.bench_loader            # full sizes (a few minutes on an idle 2-core CPU)
    python -m benchmarks.bench_loader --quick    # fewer images and steps
    python -m benchmarks.bench_loader --workers 4
    python -m benchmarks.bench_loader --device cuda   # views on the GPU (default: the GPU when present)

Prints one JSON object. Per case (a view recipe from a shipped preset, on generated images of a
typical size), images/s of
  (a) ours: `lejepa data prepare` shards read by memory map through the training loader
      (`StepSampler` + `BatchLoader`: uint8 batches, pinned and non-blocking to a GPU), views made
      by `make_views` on whole batches on the device;
  (b) conventional: a torch DataLoader whose workers open each file with Pillow and run
      torchvision's per-image transforms (reimplemented on Pillow exactly as torchvision's PIL
      backend does them: crop+resize, mirror, ImageEnhance, HSV hue shift, GaussianBlur, solarize),
      then ToTensor + Normalize, the batch then copied to the device;
on the same images, the same cores (torch threads = DataLoader workers = --workers) and the same
view recipe, with the ratio (a) / (b). Preparing is a one-off cost and is reported separately.

Then the fraction of training-step time spent waiting for data, from real `train()` runs on the
prepared shards (`data_wait` in metrics.jsonl), for the `vit-s` preset (224 px) and the `demo`
preset (32 px), on the same device. Target (issue 3): (a) >= 5x (b); data wait < 5% of the step.
The design targets an accelerator: on a CPU the views share the cores with everything else.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from benchmarks.machine import default_device, describe, sync
from lejepa_cli.config import ViewsConfig, load_config
from lejepa_cli.data.loader import BatchLoader, StepSampler, pins_memory
from lejepa_cli.data.prepare import prepare
from lejepa_cli.data.shards import load_prepared
from lejepa_cli.image.views import make_views

# name: (preset whose views are used, source image size (w, h), stored resolution, images, quick images, batch)
CASES = {
    "imagenet_like_500x375_to_vit-s_views": ("vit-s", (500, 375), 256, 512, 96, 32),
    "cifar_like_32px_to_demo_views": ("demo", (32, 32), None, 4096, 1024, 256),
}


# ---- images ------------------------------------------------------------------------------------


def write_images(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """`n` smooth random RGB images (JPEG when large, PNG when small, as such data usually ships)."""
    rng = np.random.default_rng(seed)
    w, h = size
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.float32)
        for _ in range(4):  # a few coloured sinusoid blobs: compressible, not constant
            (fx, fy), phase = rng.uniform(0.5, 6, 2) / max(w, h), rng.uniform(0, 2 * np.pi)
            img += rng.uniform(0, 1, 3) * (0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))[..., None]
        img = img / img.max() * 255 + rng.normal(0, 8, img.shape)
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        path = folder / (f"{i:06d}.jpg" if w > 64 else f"{i:06d}.png")
        pil.save(path, quality=90) if w > 64 else pil.save(path)
        paths.append(path)
    return paths


# ---- (b) the conventional per-image pipeline --------------------------------------------------


class PilMultiCrop:
    """torchvision's PIL-backend transforms, per image, once per view (DINO-style multi-crop)."""

    def __init__(self, cfg: ViewsConfig, mean, std):
        self.cfg = cfg
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    @staticmethod
    def _crop_box(w: int, h: int, scale, ratio, rng) -> tuple[int, int, int, int]:
        area = w * h
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):  # torchvision RandomResizedCrop.get_params
            target = area * rng.uniform(*scale)
            ar = math.exp(rng.uniform(*log_r))
            cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x, y, x + cw, y + ch
        s = min(w, h)
        return (w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2

    @staticmethod
    def _hue(img: Image.Image, f: float) -> Image.Image:  # torchvision F_pil.adjust_hue
        h, s, v = img.convert("HSV").split()
        np_h = np.array(h, dtype=np.uint8)
        with np.errstate(over="ignore"):
            np_h += np.uint8(int(f * 255) % 256)
        return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")

    def _view(self, img: Image.Image, size: int, scale, rng) -> torch.Tensor:
        c = self.cfg
        box = self._crop_box(img.width, img.height, scale, c.ratio, rng)
        v = img.crop(box).resize((size, size), Image.BILINEAR)
        if rng.random() < c.flip_p:
            v = ImageOps.mirror(v)
        if rng.random() < c.jitter_p:
            ops = [
                lambda x: ImageEnhance.Brightness(x).enhance(rng.uniform(1 - c.brightness, 1 + c.brightness)),
                lambda x: ImageEnhance.Contrast(x).enhance(rng.uniform(1 - c.contrast, 1 + c.contrast)),
                lambda x: ImageEnhance.Color(x).enhance(rng.uniform(1 - c.saturation, 1 + c.saturation)),
                lambda x: self._hue(x, rng.uniform(-c.hue, c.hue)),
            ]
            for k in rng.permutation(4):
                v = ops[k](v)
        if rng.random() < c.grayscale_p:
            v = v.convert("L").convert("RGB")
        if rng.random() < c.blur_p:
            v = v.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*c.blur_sigma)))
        if rng.random() < c.solarize_p:
            v = ImageOps.solarize(v, threshold=c.solarize_threshold)
        x = torch.from_numpy(np.asarray(v, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> list[torch.Tensor]:
        c = self.cfg
        return ([self._view(img, c.global_size, c.global_scale, rng) for _ in range(c.global_views)]
                + [self._view(img, c.local_size, c.local_scale, rng) for _ in range(c.local_views)])


class FileDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], transform: PilMultiCrop, seed: int = 0):
        self.paths, self.transform, self.seed = paths, transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        with Image.open(self.paths[i]) as f:
            img = ImageOps.exif_transpose(f).convert("RGB")
        return self.transform(img, np.random.default_rng([self.seed, i]))


def conventional_images_per_s(
    paths, cfg: ViewsConfig, mean, std, batch: int, workers: int, batches: int, device: torch.device = torch.device("cpu"),
) -> float:
    loader = torch.utils.data.DataLoader(
        FileDataset(paths, PilMultiCrop(cfg, mean, std)), batch_size=batch, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0), pin_memory=pins_memory(device),  # as our loader does
    )
    it = iter(loader)
    next(it)  # workers started and warm
    t0 = time.perf_counter()
    done = 0
    while done < batches:
        try:
            views = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        for view in views:
            view.to(device, non_blocking=True)
        done += 1
    sync(device)
    seconds = time.perf_counter() - t0
    del it, loader
    return batch * batches / seconds


# ---- (a) ours ----------------------------------------------------------------------------------


def ours_images_per_s(
    prepared: Path, cfg: ViewsConfig, batch: int, batches: int, device: torch.device = torch.device("cpu"),
) -> float:
    data = load_prepared(prepared, "train")
    loader = BatchLoader(data, StepSampler(len(data), batch, seed=0), device)
    g = torch.Generator(device).manual_seed(0)
    it = loader.iterate(0, batches + 1)
    try:
        _, _, b = next(it)
        make_views(b.inputs, cfg, mean=data.mean, std=data.std, generator=g)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _, _, b in it:
            make_views(b.inputs, cfg, mean=data.mean, std=data.std, generator=g)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        loader.close()
    return batch * batches / seconds


# ---- data wait inside real training -----------------------------------------------------------


def training_data_wait(prepared: Path, preset: str, batch: int, steps: int, work: Path, device: torch.device) -> dict:
    """Median data-wait fraction of a real `train()` run on prepared shards (first window dropped)."""
    from lejepa_cli.train import train

    out = work / f"run-{preset}"
    cfg = load_config(preset, [
        f"data.source={prepared}", f"train.batch_size={batch}", f"train.steps={steps}",
        f"train.save_every={steps}", "log.every=1", "train.online_probe=false", f"train.device={device}",
    ])
    train(cfg, out, overwrite=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "data_wait" in r][1:]
    return {
        "preset": preset, "device": str(device), "batch": batch, "steps_measured": len(rows),
        "data_wait_fraction": round(statistics.median(r["data_wait"] for r in rows), 4),
        "images_per_s": round(statistics.median(r["images_per_s"] for r in rows), 1),
    }


def run(quick: bool, threads: int | None = None, workers: int | None = None, device: str | None = None) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = workers or threads or cores
    torch.set_num_threads(workers)  # (a) gets the same cores as (b)'s workers
    dev = torch.device(device) if device else default_device()
    gpu = dev.type != "cpu"
    result: dict = {"machine": describe(dev), "device": str(dev), "workers_and_threads": workers, "cases": {}, "data_wait": {}}
    with tempfile.TemporaryDirectory(prefix="lejepa-bench-loader-") as tmp:
        work = Path(tmp)
        for name, (preset, size, resolution, n, n_quick, batch) in CASES.items():
            n = n_quick if quick else n
            batch = min(batch, n // 2)
            batches = max(2, (n // batch) - 1) * (3 if gpu else 1)  # a GPU needs longer to time (epochs repeat)
            cfg = load_config(preset).views
            t0 = time.perf_counter()
            paths = write_images(work / name / "images", n, size)
            t1 = time.perf_counter()
            prepare(work / name / "images", work / name / "prepared", resolution=resolution, workers=workers, progress=False)
            t2 = time.perf_counter()
            data = load_prepared(work / name / "prepared", "train")
            ours = ours_images_per_s(work / name / "prepared", cfg, batch, batches, dev)
            conv = conventional_images_per_s(paths, cfg, data.mean, data.std, batch, workers, batches, dev)
            result["cases"][name] = {
                "preset_views": preset, "images": n, "source_size": list(size), "stored_resolution": resolution,
                "views": f"{cfg.global_views}x{cfg.global_size} + {cfg.local_views}x{cfg.local_size}",
                "batch": batch, "batches_timed": batches,
                "ours_images_per_s": round(ours, 1), "conventional_images_per_s": round(conv, 1),
                "ratio": round(ours / conv, 2),
                "prepare_seconds_one_off": round(t2 - t1, 1), "write_images_seconds": round(t1 - t0, 1),
            }
            print(f"[bench_loader] {name}: ours {ours:.0f} img/s, conventional {conv:.0f} img/s", file=sys.stderr)
        steps = 4 if quick else 8
        vit_batch = (16 if quick else 64) if gpu else (4 if quick else 8)  # a CPU step at 224 px takes seconds per image
        for key, case, preset, batch, n_steps in (
            ("vit-s_224px", "imagenet_like_500x375_to_vit-s_views", "vit-s", vit_batch, 4 * steps if gpu else steps),
            ("demo_32px", "cifar_like_32px_to_demo_views", "demo", 256 if gpu else 64, 4 * steps),
        ):
            try:  # one failing case must not lose the figures already measured
                result["data_wait"][key] = training_data_wait(work / case / "prepared", preset, batch, n_steps, work, dev)
            except Exception as e:  # noqa: BLE001 - reported in the JSON
                result["data_wait"][key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[bench_loader] data wait {key}: {result['data_wait'][key]}", file=sys.stderr)
    waits = [d.get("data_wait_fraction") for d in result["data_wait"].values()]
    result["targets"] = {
        "ratio_at_least": 5.0, "data_wait_below": 0.05,
        "ratio_met": all(c["ratio"] >= 5 for c in result["cases"].values()),
        "data_wait_met": all(w is not None and w < 0.05 for w in waits),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers = torch threads (default: cores)")
    parser.add_argument("--device", default=None, help="where views and training run (default: cuda when present, else cpu)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, workers=args.workers, device=args.device), indent=2))


if __name__ == "__main__":
    main()
