"""ResNet-Micro training-step throughput on 28 px views: memory format and stem stride, side by side.

    python -m benchmarks.bench_resnet_stem              # batch 128, 2 x 28 px + 4 x 14 px views
    python -m benchmarks.bench_resnet_stem --quick      # batch 32, 2 rounds

Times one forward + backward of backbone + projector, built from the `fmnist` preset (its model,
projector and view sizes; 1 channel) with only the memory format and `model.stem_stride` changed
and the views and head pinned to what the stem stride was chosen with: 2 global + 4 local views,
no widening head (the recipe has changed both since). The variants run interleaved, round by
round, so machine noise hits all alike; prints one JSON object: median images/s per variant and
the ratios to the contiguous stride-1 baseline. This is what chose channels-last ResNets on the CPU and the
`fmnist` recipe's `model.stem_stride: 2`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.machine import describe
from lejepa_cli.config import load_config
from lejepa_cli.models import build_backbone_from_config, build_projector_from_config

# The recipe as the stored result measured it (its views and head have changed since).
MEASURED_RECIPE = ("views.global_views=2", "views.local_views=4", "model.head_width=0")

VARIANTS = {  # name: (channels_last, stem_stride)
    "contiguous_stride1": (False, 1),
    "channels_last_stride1": (True, 1),
    "channels_last_stride2": (True, 2),
}


def build(channels_last: bool, stem_stride: int, batch: int) -> tuple:
    """The `fmnist` preset's backbone, projector and views (1 channel), at this layout and stem stride."""
    cfg = load_config("fmnist", [f"model.stem_stride={stem_stride}", *MEASURED_RECIPE])
    torch.manual_seed(0)
    backbone = build_backbone_from_config(cfg, in_chans=1)
    projector = build_projector_from_config(cfg, backbone.embed_dim)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    backbone = backbone.to(memory_format=fmt)
    v = cfg.views
    globals_ = torch.randn(v.global_views * batch, 1, v.global_size, v.global_size).contiguous(memory_format=fmt)
    locals_ = torch.randn(v.local_views * batch, 1, v.local_size, v.local_size).contiguous(memory_format=fmt)
    return backbone, projector, globals_, locals_


def step_seconds(backbone, projector, globals_, locals_) -> float:
    start = time.perf_counter()
    z = projector(torch.cat([backbone(globals_), backbone(locals_)]))
    z.pow(2).mean().backward()  # a stand-in loss: the cost is in the encoder, not the loss
    return time.perf_counter() - start


def run(quick: bool, threads: int | None = None, batch: int | None = None, rounds: int | None = None) -> dict:
    """Median images/s of each variant on the CPU, timed round-robin, and the ratios to the baseline."""
    if threads:
        torch.set_num_threads(threads)
    batch = batch or (32 if quick else 128)
    rounds = rounds or (2 if quick else 5)
    runs = {name: build(*spec, batch) for name, spec in VARIANTS.items()}
    for run_ in runs.values():
        step_seconds(*run_)  # warm-up: oneDNN picks its kernels on the first call
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, run_ in runs.items():
            times[name].append(step_seconds(*run_))
    img_s = {name: round(batch / statistics.median(t), 1) for name, t in times.items()}
    base = img_s["contiguous_stride1"]
    return {
        "machine": describe(torch.device("cpu")), "batch": batch, "rounds": rounds,
        "images_per_s": img_s,
        "ratio_to_contiguous_stride1": {name: round(v / base, 2) for name, v in img_s.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 32, 2 rounds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.threads), indent=2))


if __name__ == "__main__":
    main()
