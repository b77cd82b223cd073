"""What a camera-robustness step costs beside a clean one (docs/world.md, "Training against the camera").

    python -m benchmarks.bench_world_camera                          # world-tworoom's sizes, one thread
    python -m benchmarks.bench_world_camera --preset world-push --threads 2
    python -m benchmarks.bench_world_camera --quick                  # batch 8, 2 rounds (a smoke test)
    python -m benchmarks --only world_camera                         # in the suite

Three steps of the same run, timed in turn (one step of each per round, medians over rounds):
- clean: the preset's step (`WorldRun.step`, then AdamW), every module training;
- whole windows: the robustness phase as it was first measured (`world.camera_views=1`, the
  dynamics frozen): every frame of every window also through a noisy camera, (V + 1) x B x T frames
  through the encoder;
- one frame: the same with `world.camera_frames=1`, a copy of one frame picked per window:
  B x T + V x B frames.
The runs and the step are profile_world_step's: windows of a simulated two-room folder (64 px) made
tensors as the batch loader makes them, `WorldRun.step`, the gradient clip if any, AdamW. Prints one JSON object: ms per step of each, and their ratios to the clean step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import describe
from benchmarks.profile_world_step import training_step, world_run

PHASE = ("world.camera_views=1", "world.camera_noise=0.2", "world.freeze_dynamics=true")
CASES = {"clean": (), "whole_windows": PHASE, "one_frame": (*PHASE, "world.camera_frames=1")}


def _step_seconds(run, cfg, step: int, rng: np.random.Generator) -> float:
    tic = time.perf_counter()
    training_step(run, cfg, step, rng)
    return time.perf_counter() - tic


def measure(preset: str = "world-tworoom", batch: int | None = None, rounds: int = 10, warmup: int = 2,
            threads: int = 1) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: world_run(preset, batch, Path(tmp) / "two-room", extra) for name, extra in CASES.items()}
        rng = np.random.default_rng(0)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(warmup + rounds):
            for name, (run, cfg) in runs.items():
                seconds = _step_seconds(run, cfg, r, rng)
                if r >= warmup:
                    times[name].append(seconds)
    ms = {name: round(1e3 * statistics.median(t), 1) for name, t in times.items()}
    cfg = runs["clean"][1]
    return {"benchmark": "bench_world_camera", "preset": preset, "batch": cfg.train.batch_size,
            "frames_per_window": cfg.world.history + cfg.world.num_preds + cfg.world.rollout_steps - 1,
            "threads": threads, "rounds": rounds, "step_ms": ms,
            "ratio_to_clean": {name: round(v / ms["clean"], 2) for name, v in ms.items() if name != "clean"},
            "machine": describe()}


def run(quick: bool = False, threads: int | None = None) -> dict:
    """The suite's entry (`python -m benchmarks`, `lejepa bench`)."""
    return measure(batch=8 if quick else None, rounds=2 if quick else 5, warmup=1, threads=threads or 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="world-tworoom")
    p.add_argument("--batch", type=int, default=None, help="windows per step (default: the preset's)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="batch 8, 2 rounds after 1 warm-up")
    a = p.parse_args()
    if a.quick:
        print(json.dumps(measure(a.preset, 8, rounds=2, warmup=1, threads=a.threads)))
    else:
        print(json.dumps(measure(a.preset, a.batch, a.rounds, threads=a.threads)))


if __name__ == "__main__":
    main()
