"""Where a world-model training step spends its time: torch.profiler shares per kind of op.

    python -m benchmarks.profile_world_step --preset lewm --batch 16      # LeWM's sizes, 224 px (~1 min)
    python -m benchmarks.profile_world_step --preset world-tworoom        # the two-room CPU preset
    python -m benchmarks.profile_world_step --preset lewm --table         # also torch's top-20 op table (stderr)

The step is the one `lejepa train` takes: windows drawn from a simulated two-room trajectory
folder (64 px frames) by the training Windows, made tensors as the batch loader makes them,
`WorldRun.step` (resize and normalise to the preset's frame size, encode, predict, world loss,
backward), the gradient clip of optim.grad_clip and AdamW. After --warmup steps, --steps steps
are profiled on the CPU (one thread unless --threads says otherwise).

Each op's self CPU time goes to one kind: the region it runs in when that region is labelled
(data: drawing the windows and making tensors, and the resize + normalise; SIGReg; clip;
optimizer: AdamW's step), in backward the region whose forward op made its autograd node, else by
the op's name:
GEMM / linear (mm, addmm, bmm, ...), conv / patch embed, attention (SDPA kernels, forward and
backward), layernorm, batchnorm, and the rest (elementwise: GELU, adds, copies, ...). The
shares add up to 1. bench_world_reference --profile uses the same accounting for both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.machine import describe

LABELS = {"data": "data gather + resize", "sigreg": "SIGReg", "clip": "gradient clip", "optimizer": "optimizer (AdamW)"}
GEMM = {"mm", "addmm", "bmm", "baddbmm", "addmv", "mv", "matmul", "linear", "dot", "_addmm_activation"}


def op_kind(name: str) -> str:
    """The kind of an unlabelled op from its name (aten::addmm -> GEMM / linear)."""
    base = name.split("::")[-1]
    if base in GEMM:
        return "GEMM / linear"
    if "conv" in base:
        return "conv / patch embed"
    if "scaled_dot_product" in base or "flash_attention" in base or "softmax" in base:
        return "attention (SDPA)"
    if "layer_norm" in base:
        return "layernorm"
    if "batch_norm" in base:
        return "batchnorm"
    return "elementwise / other"


def _labelled(event) -> str | None:
    node = event
    while node is not None:
        if node.name in LABELS:
            return LABELS[node.name]
        node = node.cpu_parent
    return None


def shares(events) -> tuple[dict[str, float], float]:
    """Fractions of the profiled self CPU time per kind (largest first) and the total seconds.

    An op counts to its innermost labelled region, or, in backward, to the region whose forward op
    created its autograd node (matched by sequence number); else to its name's kind."""
    cpu = [e for e in events if e.device_type.name == "CPU"]
    forward_label = {e.sequence_nr: label for e in cpu if e.sequence_nr >= 0 and not e.name.startswith("autograd::")
                     and (label := _labelled(e)) is not None}
    totals: dict[str, float] = {}
    for e in cpu:
        kind, node = _labelled(e), e
        while kind is None and node is not None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                kind = forward_label.get(node.sequence_nr)
                break
            node = node.cpu_parent
        kind = kind or op_kind(e.name)
        totals[kind] = totals.get(kind, 0.0) + e.self_cpu_time_total
    total = sum(totals.values())
    return {k: round(v / total, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}, total / 1e6


def profile_steps(step, steps: int, warmup: int, table: bool = False) -> dict:
    """Run `step()` warmup times, then profile `steps` calls: wall ms per step, self CPU s per step, shares."""
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps
    if table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    kinds, total = shares(prof.events())
    return {"profiled_steps": steps, "warmup_steps": warmup, "step_ms_profiled": round(1e3 * wall, 1),
            "self_cpu_s_per_step": round(total / steps, 3), "shares": kinds}


def world_run(preset: str, batch: int | None, folder: Path, overrides: tuple[str, ...] = ()):
    """(WorldRun, config) of `preset` on a small simulated two-room folder (simulated once per folder)."""
    from lejepa_cli.config import load_config
    from lejepa_cli.world.objective import build_world_run
    from lejepa_cli.world.prepare import simulate_dataset

    simulate_dataset("two-room", folder, episodes=8, steps=64, val_episodes=2, size=64, seed=0, progress=False)
    cfg = load_config(preset, [f"data.source={folder}", *([f"train.batch_size={batch}"] if batch else []), *overrides])
    return build_world_run(cfg, torch.device("cpu")), cfg


def training_step(run, cfg, step: int, rng: np.random.Generator) -> None:
    """One training step as the loop takes it, each labelled region in its record_function."""
    with record_function("data"):
        frames, actions = run.train_data.batch(rng.integers(0, len(run.train_data), cfg.train.batch_size))
        x = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3)
        y = torch.from_numpy(np.ascontiguousarray(actions, np.float32))
    run.step([x], [y], step, [step])
    if cfg.optim.grad_clip > 0:
        with record_function("clip"):
            torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.grad is not None], cfg.optim.grad_clip)
    with record_function("optimizer"):
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)


def profile_step(preset: str, batch: int | None = None, steps: int = 3, warmup: int = 2,
                 table: bool = False) -> dict:
    """Shares per kind over `steps` profiled training steps of `preset`, after `warmup` unprofiled ones."""
    import lejepa_cli.world.loss as world_loss_module
    from lejepa_cli.config import load_config

    batch = batch or load_config(preset).train.batch_size
    real_sigreg = world_loss_module.sigreg

    def labelled_sigreg(*args, **kwargs):
        with record_function("sigreg"):
            return real_sigreg(*args, **kwargs)

    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(world_loss_module, "sigreg", labelled_sigreg):
        run, cfg = world_run(preset, batch, Path(tmp) / "two-room")
        real_frames_in = run.frames_in

        def labelled_frames_in(frames):
            with record_function("data"):
                return real_frames_in(frames)

        run.frames_in = labelled_frames_in
        rng = np.random.default_rng(0)
        counter = iter(range(1 << 30))
        result = profile_steps(lambda: training_step(run, cfg, next(counter), rng), steps, warmup, table)
    w = cfg.world
    return {"preset": preset, "encoder": f"{cfg.model.arch}/{cfg.model.patch_size} at {w.frame_size} px",
            "batch_windows": batch, "frames_per_window": w.history + w.num_preds, "threads": torch.get_num_threads(),
            **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", action="append", help="world preset(s) (default: lewm and world-tworoom)")
    parser.add_argument("--batch", type=int, help="windows per step (default: 16 for lewm, else the preset's batch_size)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="also print torch's op table to stderr")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [profile_step(p, args.batch or (16 if p == "lewm" else None), args.steps, args.warmup, args.table)
             for p in args.preset or ["lewm", "world-tworoom"]]
    print(json.dumps({"benchmark": "profile_world_step", "machine": describe(torch.device("cpu")), "cases": cases}, indent=2))


if __name__ == "__main__":
    main()
