"""World-model speed: training frames/s and planning-style rollout frames/s, side by side in one run.

    python -m benchmarks.bench_world                 # the CPU world presets (about a minute)
    python -m benchmarks.bench_world --quick         # fewer repeats
    python -m benchmarks.bench_world --preset lewm   # LeWM's sizes (a GPU's job; slow on a CPU)

training: one optimizer step of the preset's world model (encode every window frame, predict,
world loss, backward, AdamW) on random uint8 windows at the simulator's 64 px, resized as
training resizes them; frames/s counts every encoded frame (batch x (history + num_preds)).
rollout: what a CEM planner asks of the model per iteration: 300 candidate action sequences,
horizon 5 skip-blocks, from one encoded history; frames/s = 300 x 5 / seconds, and the seconds
of a 30-iteration plan (LeWM's CEM) follow from it. Medians over repeats; JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.machine import default_device, describe, sync
from lejepa_cli.config import load_config
from lejepa_cli.data.loader import eval_transform
from lejepa_cli.optim import adamw, param_groups
from lejepa_cli.world.loss import world_loss
from lejepa_cli.world.objective import build_world_model

PRESETS = ("world-tworoom", "world-push", "world-balls")
ACTION_DIMS = {"world-balls": 0}  # passive world; the others act in 2-D
CANDIDATES, HORIZON, CEM_ITERATIONS = 300, 5, 30


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, oneDNN primitive caches)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(preset: str, repeats: int, device: torch.device, frame_side: int = 64) -> dict:
    cfg = load_config(preset)
    w = cfg.world
    action_dim = ACTION_DIMS.get(preset, 2)
    torch.manual_seed(0)
    model = build_world_model(cfg, 3, action_dim).to(device)
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg, device)
    b, t = cfg.train.batch_size, w.history + w.num_preds
    frames = torch.randint(0, 256, (b, t, 3, frame_side, frame_side), dtype=torch.uint8, device=device)
    actions = torch.randn(b, t, w.frameskip * action_dim, device=device)

    def train_step() -> None:
        x = eval_transform(frames.flatten(0, 1), w.frame_size, (0.5,) * 3, (0.25,) * 3).view(b, t, 3, *(w.frame_size,) * 2)
        z, p = model(x, actions, w.history)
        world_loss(z, p, num_preds=w.num_preds, lamb=cfg.loss.lamb, step=0, num_slices=cfg.loss.num_slices)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = _median_seconds(train_step, repeats, device)
    model.eval()
    context = torch.randn(CANDIDATES, w.history, w.latent_dim, device=device)
    ctx_actions = torch.randn(CANDIDATES, w.history, w.frameskip * action_dim, device=device)
    future = torch.randn(CANDIDATES, HORIZON - 1, w.frameskip * action_dim, device=device)
    rollout_s = _median_seconds(lambda: model.rollout(context, ctx_actions, future), repeats, device)
    return {
        "preset": preset, "encoder": f"{cfg.model.arch}/{cfg.model.patch_size} at {w.frame_size} px",
        "batch_windows": b, "frames_per_window": t,
        "train_step_ms": round(1e3 * step_s, 1), "train_frames_per_s": round(b * t / step_s, 1),
        "rollout_candidates": CANDIDATES, "rollout_horizon": HORIZON,
        "rollout_ms": round(1e3 * rollout_s, 2), "rollout_frames_per_s": round(CANDIDATES * HORIZON / rollout_s, 1),
        "cem_plan_s_estimate": round(CEM_ITERATIONS * rollout_s, 3),
    }


def run(quick: bool = False, threads: int | None = None, presets: tuple[str, ...] = PRESETS) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = default_device()
    repeats = 3 if quick else 10
    return {"benchmark": "world", "machine": describe(device), "repeats": repeats,
            "cases": [measure(p, repeats, device) for p in presets]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--preset", action="append", help="world preset(s) to measure (default: the CPU ones)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.threads, tuple(args.preset or PRESETS)), indent=2))


if __name__ == "__main__":
    main()
