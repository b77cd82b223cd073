"""Where a world-model planner goes wrong: the model's error along the planner's own action sequences.

    python -m benchmarks.plan_errors RUN                    # 20 problems of the run's world, its plan settings
    python -m benchmarks.plan_errors RUN --warm-blocks 2    # decide from a 3-frame context, not the start frame

For each problem (drawn as `lejepa world plan` draws them) one decision is taken from the start
frame, and four action sequences of the planner's horizon are compared:
- `plan`: what CEM chooses with the world model's latent cost (the first decision of `world plan`);
- `oracle_plan`: what the same CEM chooses with the simulator's true dynamics and state cost;
- `explore`: the world's own exploration policy (the training data's actions);
- `random`: uniform actions.
Each sequence is rolled out by the predictor and executed in the simulator (frames rendered and
encoded). Per block of `frameskip` steps it reports the latent error of the rollout, the error of
the "nothing changes" guess beside it, and the goal distance three ways: true (simulator), as read
from the predicted latents and as read from the encoded real frames (a ridge probe of the state fitted on
simulated episodes). A planner exploits its model when the predicted goal distance of its own
plan falls while the true one does not; the cost itself is at fault when even the real frames'
read-out misjudges the distance. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.machine import describe
from lejepa_cli.config import PlanConfig
from lejepa_cli.probes import ridge_probe
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.world.plan import cem, draw_problems, model_cost, oracle_cost
from lejepa_cli.world.plan_settings import search
from lejepa_cli.world.sim import World, observe, simulate

SEQUENCES = ("plan", "oracle_plan", "explore", "random")


def fit_state_probe(model: WorldModelExport, world: World, episodes: int = 80, steps: int = 60, seed: int = 5):
    """The probes' ridge (lejepa_cli.probes.ridge_probe) from latent to full state, fitted on simulated episodes
    (half of them random walks, so the agent is also seen away from what it pushes). Returns a function
    latents (..., D) -> states (..., S)."""
    chunks = list(simulate(world, episodes, steps, seed, stream=3, wander=0.5))
    z = torch.cat([model.encode(c.frames) for c in chunks]).cpu().numpy()
    s = np.concatenate([c.state for c in chunks])
    return lambda lat: ridge_probe(z, s, lat.reshape(-1, lat.shape[-1]).cpu().numpy()).reshape(*lat.shape[:-1], -1)


def explore(world: World, state: np.ndarray, steps: int, rng: np.random.Generator) -> np.ndarray:
    """The world's exploration policy run `steps` steps from `state`: its actions (N, steps, A)."""
    memory, actions = world.explore_init(rng, state), []
    for _ in range(steps):
        actions.append(world.explore(state, memory, rng))
        state = world.step(state, actions[-1])
    return np.stack(actions, 1)


def context(model: WorldModelExport, world: World, starts: np.ndarray, warm_blocks: int, rng: np.random.Generator):
    """The decision's state and context: latents (N, h, D) and the blocks between them (N, h - 1, A'),
    after `warm_blocks` blocks of the exploration policy from the start (0: the start frame alone)."""
    fs, a, n = model.frameskip, world.action_dim, len(starts)
    state = world.set_state(starts)
    z = model.encode(observe(world, world.render(state), None, rng))[:, None]
    b = z.new_zeros(n, 0, fs * a)
    if warm_blocks:
        b = torch.from_numpy(explore(world, state, warm_blocks * fs, rng).reshape(n, warm_blocks, fs * a)).float().to(z)
        latents, states = execute(model, world, state, b, rng)
        z, state = torch.cat([z, latents], 1), states[:, -1]
    z = z[:, -model.history:]
    return state, z, b[:, b.shape[1] - (z.shape[1] - 1):]


def execute(model: WorldModelExport, world: World, state: np.ndarray, blocks: torch.Tensor, rng: np.random.Generator):
    """Run (N, K, A') blocks in the simulator: encoded frames (N, K, D) and states (N, K, S) at each block's end."""
    fs, a = model.frameskip, world.action_dim
    acts = blocks.cpu().numpy().reshape(len(state), -1, a).astype(np.float64)
    latents, states, frame = [], [], None
    for t in range(acts.shape[1]):
        state = world.step(state, acts[:, t])
        if (t + 1) % fs == 0:
            frame = observe(world, world.render(state), frame, rng)
            latents.append(model.encode(frame))
            states.append(state.copy())
    return torch.stack(latents, 1), np.stack(states, 1)


def sequences(model, world, state, z_hist, b_hist, z_goal, goals, settings: PlanConfig, seed: int, rng):
    """The four action sequences (N, K, A') of SEQUENCES, K the planner's horizon in blocks."""
    fs, a, n = model.frameskip, world.action_dim, len(state)
    cfg = search(settings, fs)
    shape = (n, cfg.horizon, fs * a)
    plan = cem(model_cost(model, z_hist, b_hist, z_goal, settings.cost), n, fs * a, cfg,
               torch.Generator().manual_seed(seed), init_mean=z_hist.new_zeros(shape))
    oracle = cem(oracle_cost(world, state, goals, fs, settings.cost), n, fs * a, cfg, torch.Generator().manual_seed(seed))
    explore_blocks = torch.from_numpy(explore(world, state, cfg.horizon * fs, rng).reshape(shape)).float()
    random_blocks = torch.from_numpy(rng.uniform(-1.0, 1.0, shape)).float()
    return dict(zip(SEQUENCES, (plan, oracle, explore_blocks, random_blocks)))


def diagnose(model: WorldModelExport, world: World, *, problems: int = 20, seed: int = 0,
             settings: PlanConfig | None = None, warm_blocks: int = 0) -> dict:
    """The per-block figures of the module docstring, for each of SEQUENCES (means over problems)."""
    settings = settings or PlanConfig()
    rng = np.random.default_rng(seed)
    read_state = fit_state_probe(model, world)
    starts, goals = draw_problems(world, problems, seed, settings.goal_offset)
    state, z_hist, b_hist = context(model, world, starts, warm_blocks, rng)
    z_goal = model.encode(world.render(goals))
    per_block = lambda x: [round(float(v), 4) for v in np.asarray(x).mean(0)]  # noqa: E731 (N, K) -> K means
    out = {}
    for name, blocks in sequences(model, world, state, z_hist, b_hist, z_goal, goals, settings, seed, rng).items():
        pred = model.rollout_candidates(z_hist, b_hist, blocks[:, None].to(z_hist))[:, 0]  # (N, K, D)
        real, states = execute(model, world, state, blocks, rng)
        k = real.shape[1]
        goal_of = lambda x: world.goal_distance(x.reshape(-1, x.shape[-1]), np.repeat(goals, k, 0)).reshape(-1, k)  # noqa: E731
        pred_cost, real_cost = ((pred - z_goal[:, None]) ** 2).sum(-1), ((real - z_goal[:, None]) ** 2).sum(-1)
        chosen = pred_cost.argmin(1, keepdim=True)  # the block a `min` cost credits
        true_goal = goal_of(states)
        out[name] = {
            "latent_err": per_block(((pred - real) ** 2).mean(-1)),
            "copy_err": per_block(((z_hist[:, -1:] - real) ** 2).mean(-1)),
            "goal_distance_true": per_block(true_goal),
            "goal_distance_read_from_prediction": per_block(goal_of(read_state(pred))),
            "goal_distance_read_from_frames": per_block(goal_of(read_state(real))),
            "predicted_cost_min": round(float(pred_cost.min(1).values.mean()), 3),
            "realised_cost_there": round(float(real_cost.gather(1, chosen).mean()), 3),
            "true_goal_distance_there": round(float(np.take_along_axis(true_goal, chosen.cpu().numpy(), 1).mean()), 4),
        }
    start_distance = float(world.goal_distance(state, goals).mean())
    return {"world": world.name, "problems": problems, "seed": seed, "warm_blocks": warm_blocks,
            "horizon_blocks": search(settings, model.frameskip).horizon, "start_goal_distance": round(start_distance, 4),
            "sequences": out}


def main() -> None:
    from lejepa_cli.world.runs import open_world_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a world run folder, checkpoint or export")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-blocks", type=int, default=0, help="exploration blocks before the decision (context frames)")
    args = parser.parse_args()
    used = open_world_run(args.run)
    world = used.require_world("plan")
    report = diagnose(used.model, world, problems=args.problems, seed=args.seed, settings=used.plan,
                      warm_blocks=args.warm_blocks)
    print(json.dumps({"run": args.run, "settings": "the run's plan section", **report, "machine": describe()}, indent=1))


if __name__ == "__main__":
    main()
