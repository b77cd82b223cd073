"""World-model speed: training frames/s and planning-style rollout frames/s, side by side in one run.

    python -m benchmarks.bench_world                 # the CPU world presets (about a minute)
    python -m benchmarks.bench_world --quick         # fewer repeats
    python -m benchmarks.bench_world --preset lewm --batch 16   # LeWM's sizes (slow on a CPU; its batch needs a GPU)

training: one optimizer step of the preset's world model (encode every window frame, predict,
world loss, backward, gradient clip where the preset clips, AdamW) on random uint8 windows at the simulator's 64 px, resized as
training resizes them; frames/s counts every encoded frame (batch x (history + num_preds)).
rollout: what a CEM planner asks of the model per iteration (LeWM's CEM: 300 candidate action
sequences, horizon 5 skip-blocks, from one encoded history), two ways side by side: `plain`, the
context copied to every candidate and `WorldModel.rollout` run on it (what `world plan` did before
world/rollout.py), and `shared`, `rollout_candidates` (the shared context computed once, AdaLN once
per action block, the last block for the newest position only). frames/s = 300 x 5 / seconds; the
seconds of one 30-iteration decision follow from it. With --threads 1 --threads 2 each case is
measured at each thread count in the same run. Medians over repeats; JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.profiler import record_function

from benchmarks.machine import default_device, describe, sync
from lejepa_cli.config import load_config
from lejepa_cli.data.loader import eval_transform
from lejepa_cli.optim import adamw, param_groups
from lejepa_cli.world.loss import world_loss
from lejepa_cli.world.objective import build_world_model
from lejepa_cli.world.rollout import rollout_candidates

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


def world_train_step(model, optimizer: torch.optim.Optimizer, cfg, frames: torch.Tensor, actions: torch.Tensor,
                     step: int = 0) -> torch.Tensor:
    """One optimizer step as `lejepa train` takes it (WorldRun.step, then the loop's update): forward
    on normalised frames (B, T, C, R, R), world loss, backward, gradient clip (optim.grad_clip > 0), AdamW."""
    w, loss_cfg = cfg.world, cfg.loss
    z, p = model(frames, actions, w.history)
    with record_function("sigreg"):  # the profile's label (profile_world_step); the prediction MSE beside it is tiny
        loss = world_loss(z, p, num_preds=w.num_preds, lamb=loss_cfg.lamb, step=step, num_slices=loss_cfg.num_slices,
                          t_max=loss_cfg.t_max, num_knots=loss_cfg.num_knots)["loss"]
    loss.backward()
    if cfg.optim.grad_clip > 0:
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], cfg.optim.grad_clip)
    with record_function("optimizer"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure(preset: str, repeats: int, device: torch.device, frame_side: int = 64, batch: int | None = None) -> dict:
    cfg = load_config(preset)
    w = cfg.world
    action_dim = ACTION_DIMS.get(preset, 2)
    torch.manual_seed(0)
    model = build_world_model(cfg, 3, action_dim).to(device)
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg, device)
    b, t = batch or cfg.train.batch_size, w.history + w.num_preds  # LeWM's 224 px batch needs a GPU's memory: pass --batch
    frames = torch.randint(0, 256, (b, t, 3, frame_side, frame_side), dtype=torch.uint8, device=device)
    actions = torch.randn(b, t, w.frameskip * action_dim, device=device)

    def train_step() -> None:
        x = eval_transform(frames.flatten(0, 1), w.frame_size, (0.5,) * 3, (0.25,) * 3).view(b, t, 3, *(w.frame_size,) * 2)
        world_train_step(model, optimizer, cfg, x, actions)

    step_s = _median_seconds(train_step, repeats, device)
    model.eval()
    a = w.frameskip * action_dim
    context = torch.randn(1, w.history, w.latent_dim, device=device)  # one problem, as in a decision
    past = torch.randn(1, w.history - 1, a, device=device)
    candidates = torch.randn(1, CANDIDATES, HORIZON, a, device=device)

    def plain() -> None:
        ctx = context.expand(CANDIDATES, -1, -1)
        acts = torch.cat([past.expand(CANDIDATES, -1, -1), candidates[0, :, :1]], 1)
        model.rollout(ctx, acts, candidates[0, :, 1:])

    plain_s = _median_seconds(plain, repeats, device)
    shared_s = _median_seconds(lambda: rollout_candidates(model, context, past, candidates), repeats, device)
    return {
        "preset": preset, "threads": torch.get_num_threads(),
        "encoder": f"{cfg.model.arch}/{cfg.model.patch_size} at {w.frame_size} px",
        "batch_windows": b, "frames_per_window": t,
        "train_step_ms": round(1e3 * step_s, 1), "train_frames_per_s": round(b * t / step_s, 1),
        "rollout_candidates": CANDIDATES, "rollout_horizon": HORIZON,
        "rollout_plain_ms": round(1e3 * plain_s, 2), "rollout_shared_ms": round(1e3 * shared_s, 2),
        "rollout_frames_per_s": round(CANDIDATES * HORIZON / shared_s, 1),
        "cem_decision_plain_s": round(CEM_ITERATIONS * plain_s, 3),
        "cem_decision_shared_s": round(CEM_ITERATIONS * shared_s, 3),
        "shared_speedup": round(plain_s / shared_s, 2),
    }


def run(quick: bool = False, threads: int | list[int] | None = None, presets: tuple[str, ...] = PRESETS,
        batch: int | None = None, reference: bool = False) -> dict:
    """The presets' cases at each thread count; with `reference`, also LeWM's own code beside ours at
    the lewm preset's sizes (bench_world_reference: ours only, saying why, without stable_worldmodel)."""
    device = default_device()
    repeats = 3 if quick else 10
    cases = []
    thread_counts = ([threads] if isinstance(threads, int) else threads) or [torch.get_num_threads()]
    for n in thread_counts:
        torch.set_num_threads(n)
        cases += [measure(p, repeats, device, batch=batch) for p in presets]
    doc = {"benchmark": "world", "machine": describe(device), "repeats": repeats, "cases": cases}
    if reference:
        from benchmarks import bench_world_reference  # it imports this module's world_train_step

        doc["reference"] = bench_world_reference.run(thread_counts, batch or 16, repeats=1 if quick else 3)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, action="append", help="CPU threads (repeatable: each case at each)")
    parser.add_argument("--batch", type=int, help="training windows per step (default: the preset's batch_size)")
    parser.add_argument("--preset", action="append", help="world preset(s) to measure (default: the CPU ones)")
    parser.add_argument("--reference", action="store_true",
                        help="also time stable-worldmodel's LeWM and CEM beside ours at LeWM's sizes (bench_world_reference)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.threads, tuple(args.preset or PRESETS), args.batch, args.reference), indent=2))


if __name__ == "__main__":
    main()
