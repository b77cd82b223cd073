"""Throughput of `make_views` against kornia.augmentation running the same recipe on the same batches.

    python -m benchmarks.bench_views            # full sizes
    python -m benchmarks.bench_views --quick    # smaller batches, fewer repeats
    python -m benchmarks.bench_views --device cuda:0
    python -m benchmarks.bench_views --device cpu --threads 2
    python -m benchmarks.bench_views --hue 0    # without the hue step, where our YIQ rotation differs

Prints one JSON object: the machine, and per case the images/s of ours and of kornia (input images
per second, all views of each included) and the ratio ours / kornia. Cases (docs/method.md section 2):
(a) 32 px images -> 2 x 32 px + 6 x 16 px views, batch 256; (b) 256 px images -> 2 x 224 + 6 x 96,
batch 32. Kornia gets the float batch repeated once per view, which is how its per-sample
pipeline is fed multi-crop; the time to make that copy counts, as ours counts its own conversion.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Callable

import torch

from benchmarks.machine import describe
from lejepa_cli.config import ViewsConfig
from lejepa_cli.image.views import make_views

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CASES = {  # name: (image side, global size, local size, batch, quick batch)
    "a_32px_2x32_6x16": (32, 32, 16, 256, 64),
    "b_256px_2x224_6x96": (256, 224, 96, 32, 8),
}


def _kornia_recipe(cfg: ViewsConfig, size: int, scale: tuple[float, float], device: torch.device) -> Callable:
    import kornia.augmentation as K

    radius = min(math.ceil(3 * cfg.blur_sigma[1]), (size - 1) // 2)  # the kernel make_views uses
    thr = cfg.solarize_threshold / 255
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=scale, ratio=cfg.ratio),
        K.RandomHorizontalFlip(p=cfg.flip_p),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.jitter_p),
        K.RandomGrayscale(p=cfg.grayscale_p),
        K.RandomGaussianBlur((2 * radius + 1, 2 * radius + 1), cfg.blur_sigma, p=cfg.blur_p),
        K.RandomSolarize(thresholds=(thr, thr), additions=(0.0, 0.0), p=cfg.solarize_p),
        K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
    ).to(device)


def _time_pair(
    a: Callable[[], object], b: Callable[[], object], device: torch.device, repeats: int
) -> tuple[float, float]:
    """Median seconds per call of a and of b, after a warm-up call each.

    The calls alternate, so a machine shared with other jobs slows both alike.
    """
    sync = torch.accelerator.synchronize if device.type != "cpu" else (lambda: None)
    times: tuple[list[float], list[float]] = ([], [])
    for rep in range(repeats + 1):
        for fn, out in ((a, times[0]), (b, times[1])):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if rep:  # the first round is the warm-up
                out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def run(quick: bool, device: str | None = None, threads: int | None = None, hue: float | None = None) -> dict:
    """Benchmark every case on `device` (default: the current accelerator, else the CPU).

    `hue` overrides the recipe's hue jitter; 0 takes the hue step out of both pipelines (kornia skips
    a step whose factors are all neutral), which isolates our cheaper YIQ hue from the rest.
    """
    import kornia

    if threads:
        torch.set_num_threads(threads)

    dev = torch.device(device) if device else (torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu"))
    result: dict = {
        "machine": {**describe(dev), "kornia": kornia.__version__},
        "quick": quick,
        "hue": ViewsConfig.hue if hue is None else hue,
        "cases": {},
    }
    repeats = 3 if quick else 11
    for name, (side, gsize, lsize, batch, quick_batch) in CASES.items():
        n = quick_batch if quick else batch
        cfg = ViewsConfig(global_size=gsize, local_size=lsize, hue=result["hue"])
        data_gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n, 3, side, side), generator=data_gen, dtype=torch.uint8).to(dev)
        gen = torch.Generator(device=dev).manual_seed(0)

        torch.manual_seed(0)  # kornia draws from the global RNG
        glob = _kornia_recipe(cfg, gsize, cfg.global_scale, dev)
        loc = _kornia_recipe(cfg, lsize, cfg.local_scale, dev)

        def kornia_views() -> tuple[torch.Tensor, torch.Tensor]:
            x = images.float().div_(255)
            g = glob(x.repeat(cfg.global_views, 1, 1, 1)).view(cfg.global_views, n, 3, gsize, gsize)
            lv = loc(x.repeat(cfg.local_views, 1, 1, 1)).view(cfg.local_views, n, 3, lsize, lsize)
            return g, lv

        ours, theirs = _time_pair(
            lambda: make_views(images, cfg, mean=MEAN, std=STD, generator=gen), kornia_views, dev, repeats
        )
        result["cases"][name] = {
            "batch": n,
            "ours_images_per_s": round(n / ours, 1),
            "kornia_images_per_s": round(n / theirs, 1),
            "ours_over_kornia": round(theirs / ours, 2),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer repeats")
    parser.add_argument("--device", default=None, help="torch device (default: accelerator if any, else cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--hue", type=float, default=None, help="hue jitter for both pipelines (default: recipe's)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.device, args.threads, args.hue), indent=2))


if __name__ == "__main__":
    main()
