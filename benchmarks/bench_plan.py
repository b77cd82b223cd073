"""Planning speed: seconds per decision of the world-model planner, the default settings beside LeWM's CEM, on 1 and 2 threads.

    python -m benchmarks.bench_plan            # world-tworoom's model, 20 episodes planned together (a few minutes)
    python -m benchmarks.bench_plan --quick    # 4 episodes, one repeat

The model is the world-tworoom preset's (ViT-Nano/8 at 32 px, 3-block predictor, frameskip 2) at
random init: a decision costs the same whatever the weights. A decision is what `lejepa world
plan` times: one CEM search per episode, the episodes planned together as one batch (its default
20), seconds divided by the episodes; the process CPU seconds beside them. Settings: the `default` profile (PlanConfig: 150 x 5, horizon
40 steps = 20 blocks here) and the `lewm` profile (300 x 30, horizon 25 steps = 13 blocks here),
both as `--planner` gives them. Medians over repeats; the machine's load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from benchmarks.machine import describe
from lejepa_cli.config import PlanConfig, load_config
from lejepa_cli.world.catalog import make_world
from lejepa_cli.world.export import WorldModelExport, model_spec
from lejepa_cli.world.objective import build_world_model
from lejepa_cli.world.plan import draw_problems, run_episodes
from lejepa_cli.world.plan_settings import PROFILES, describe as describe_settings, search

PRESET, WORLD = "world-tworoom", "two-room"


def random_model(overrides: tuple[str, ...] = ()) -> WorldModelExport:
    """The preset's world model at random init (seed 0), wrapped as `world plan` loads one, on the CPU."""
    cfg = load_config(PRESET, list(overrides))
    torch.manual_seed(0)
    action_dim = make_world(WORLD, size=16).action_dim
    spec = {**model_spec(cfg.to_dict(), action_dim), "action_mean": [0.0] * action_dim, "action_std": [1.0] * action_dim,
            "world": WORLD, "state_names": None}
    return WorldModelExport(build_world_model(cfg, 3, action_dim), spec, (0.5,) * 3, (0.25,) * 3)


def seconds_per_decision(model: WorldModelExport, settings: PlanConfig, episodes: int, repeats: int,
                         threads: int) -> tuple[float, float]:
    """Medians over `repeats` of one decision for `episodes` problems at once, per episode, on `threads`
    threads: wall seconds (what `world plan` reports) and process CPU seconds (all threads; on a busy
    machine the wall time waits for a core, the CPU time does not)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        world = make_world(WORLD, size=64)
        starts, goals = draw_problems(world, episodes, 0, settings.goal_offset)
        cfg = search(settings, model.frameskip)
        wall, cpu = [], []
        for r in range(repeats):
            c0 = time.process_time()
            wall.append(run_episodes("model", world, starts, goals, model=model, frameskip=model.frameskip,
                                     budget=model.frameskip, cfg=cfg, seed=r)["seconds_per_decision"])
            cpu.append((time.process_time() - c0) / episodes)  # the decision, plus one render and two encodes
        return statistics.median(wall), statistics.median(cpu)
    finally:
        torch.set_num_threads(before)


def run(quick: bool = False, threads: int | None = None, overrides: tuple[str, ...] = (),
        profiles: dict[str, PlanConfig] | None = None, episodes: int | None = None) -> dict:
    """The planning row of the suite: each profile (default: `default` and `lewm`) on 1 and 2 threads.
    `threads` is ignored, as both counts are the point; `overrides` shrink the model (tests)."""
    profiles = profiles or {name: PROFILES[name] for name in ("default", "lewm")}
    episodes, repeats = episodes or (4 if quick else 20), 1 if quick else 3
    model = random_model(overrides)
    first = next(iter(profiles.values()))
    seconds_per_decision(model, first, 1, 1, torch.get_num_threads())  # warm-up (allocator, kernel caches)
    cases = []
    for name, settings in profiles.items():
        row = {"profile": name, "settings": describe_settings(settings, model.frameskip)}
        for n in (1, 2):
            wall, cpu = seconds_per_decision(model, settings, episodes, repeats, n)
            tag = f"{n}_thread{'s' if n > 1 else ''}"
            row[f"s_per_decision_{tag}"], row[f"cpu_s_per_decision_{tag}"] = round(wall, 4), round(cpu, 4)
        cases.append(row)
    return {"benchmark": "plan", "machine": describe(torch.device("cpu")), "model": f"{PRESET}, random init",
            "episodes_planned_together": episodes, "repeats": repeats, "cases": cases,
            "load_average_after_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))


if __name__ == "__main__":
    main()
