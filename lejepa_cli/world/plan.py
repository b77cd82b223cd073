"""Model-predictive control towards a goal image: the cross-entropy method (CEM) in latent space.

    from lejepa_cli.world.plan import plan
    report = plan(model, world, episodes=20)          # model = load_world_model(...), world = make_world(...)
    report["success_rate"], report["random_success_rate"], report["oracle_success_rate"]
    plan(model, world, settings=PlanConfig(horizon=25))   # settings: a run's `plan:` section (lejepa_cli.config)

The planner knows only a cost of an action sequence. With the world model the cost is the
squared distance between the predicted final latent (encode the last H window frames, roll the
predictor out over the candidate's blocks) and the goal image's latent; with cost "min", the
smallest such distance after any of the candidate's blocks. With the simulator's
true dynamics (`oracle`) it is the squared distance of the simulated final state to the goal
state: the same planner with perfect dynamics, the ceiling of what this planner can do. A
random policy is the floor. Receding horizon: plan `horizon` environment steps as
ceil(horizon / frameskip) blocks of `frameskip` steps, execute the first block, observe, replan,
until the goal is reached or `budget` steps are spent. Every tensor of the search lives on the
model's device (its latents' device); the sampling noise is drawn on the CPU and moved there.
Episodes are planned together as one batch (their candidates are independent rows).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from lejepa_cli.errors import UserError
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.config import PlanConfig
from lejepa_cli.world.plan_settings import COSTS, GOAL_OFFSET, CEMConfig, describe, search  # noqa: F401  (re-exported: the planner's settings)
from lejepa_cli.world.sim import World, observe

PLANNERS = ("model", "random", "oracle")
MIN_GOAL_DISTANCE = 0.2  # arena units (side 1): four success radii of two-room


def coloured_noise(shape: tuple[int, ...], beta: float, generator: torch.Generator) -> torch.Tensor:
    """Standard-normal samples (..., K, A) whose power along K falls as 1 / f^beta (beta 0: white)."""
    white = torch.randn(shape, generator=generator)
    k = shape[-2]
    if beta == 0 or k < 2:
        return white
    spectrum = torch.fft.rfft(white, dim=-2)
    freqs = torch.fft.rfftfreq(k)
    freqs[0] = freqs[1]  # the mean gets the lowest frequency's weight, not an infinite one
    coloured = torch.fft.irfft(spectrum * freqs.pow(-beta / 2)[:, None], n=k, dim=-2)
    return coloured / coloured.std(dim=-2, keepdim=True).clamp_min(1e-8)


def reduce_cost(distances: torch.Tensor, how: str) -> torch.Tensor:
    """Per-block goal distances (..., K) -> one cost per candidate (...)."""
    return distances[..., -1] if how == "final" else distances.min(-1).values


def cem(cost: Callable[[torch.Tensor], torch.Tensor], batch: int, dim: int, cfg: CEMConfig,
        generator: torch.Generator, init_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise cost over sequences in [-1, 1]^(horizon x dim), `batch` problems at once.

    cost: candidates (B, C, horizon, dim) -> (B, C). Each iteration samples C candidates from a
    Gaussian per problem, step and dimension, keeps the `elites` cheapest and refits the Gaussian
    to them. Returns the final mean (B, horizon, dim), on init_mean's device (the CPU without one):
    the noise is drawn on the CPU from `generator` and moved there, so every device draws the same.
    """
    shape = (batch, cfg.horizon, dim)
    mean = torch.zeros(shape) if init_mean is None else init_mean.clone()
    std = torch.full_like(mean, cfg.init_std)
    for _ in range(cfg.iterations):
        noise = coloured_noise((batch, cfg.candidates, cfg.horizon, dim), cfg.noise_beta, generator).to(mean)
        samples = (mean[:, None] + std[:, None] * noise).clamp(-1.0, 1.0)  # (B, C, K, A)
        samples[:, 0] = mean  # the current mean competes too, so a good plan is never lost
        costs = cost(samples)  # (B, C)
        best = costs.topk(cfg.elites, dim=1, largest=False).indices  # (B, E)
        elite = samples.gather(1, best[:, :, None, None].expand(-1, -1, cfg.horizon, dim))  # (B, E, K, A)
        mean = elite.mean(1)
        std = elite.std(1, unbiased=False).clamp_min(cfg.min_std)
    return mean


def model_cost(model: WorldModelExport, z_hist: torch.Tensor, b_hist: torch.Tensor, z_goal: torch.Tensor, how: str = "final"):
    """Cost of candidates for the world model: context latents (B, h, D), the h - 1 blocks between them, goal (B, D)."""

    def cost(samples: torch.Tensor) -> torch.Tensor:  # samples (B, C, K, A'); the first block acts from z_hist's last latent
        pred = model.rollout_candidates(z_hist, b_hist, samples)  # (B, C, K, D), the shared context computed once
        return reduce_cost(((pred - z_goal[:, None, None]) ** 2).sum(-1), how)  # from (B, C, K)

    return cost


def oracle_cost(world: World, state: np.ndarray, goal: np.ndarray, frameskip: int, how: str = "final"):
    """Cost of candidates with the simulator's dynamics: squared distance of the simulated state to the goal."""

    def cost(samples: torch.Tensor) -> torch.Tensor:
        b, c, k, _ = samples.shape
        acts = samples.cpu().numpy().reshape(b * c, k * frameskip, world.action_dim)  # blocks -> steps
        s, goals = np.repeat(state, c, axis=0), np.repeat(goal, c, axis=0)  # (B*C, S)
        d = np.empty((b * c, k))
        for t in range(k * frameskip):
            s = world.step(s, acts[:, t])  # rng=None: no random pushes in the planner's model
            if (t + 1) % frameskip == 0:
                d[:, t // frameskip] = world.goal_distance(s, goals) ** 2
        return reduce_cost(torch.from_numpy(d).float().view(b, c, k), how).to(samples)

    return cost


def check_goal_images(world: World, images: np.ndarray, n: int) -> np.ndarray:
    """Goal images must be uint8 (n or 1, R, R, 3) at the world's frame size R."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    want = (world.size, world.size, 3)
    if images.ndim != 4 or images.shape[1:] != want or images.dtype != np.uint8 or len(images) not in (1, n):
        raise UserError(f"goal images must be uint8 of shape {want} (the world's frames), got {images.dtype} {images.shape[-3:]}")
    return np.broadcast_to(images, (n, *want)).copy()


def run_episodes(kind: str, world: World, starts: np.ndarray, goals: np.ndarray | None, *, model: WorldModelExport | None,
                 frameskip: int, budget: int, cfg: CEMConfig, seed: int, goal_images: np.ndarray | None = None,
                 record: bool = False) -> dict:
    """Run one planner (`model`, `random` or `oracle`) from `starts` (N, S) towards `goals` (N, S) for `budget` steps.

    Returns success (N,) bool, steps (N,) steps to success (-1: not reached), seconds_per_decision,
    final_cost (N,) (the model's latent cost of its final frame, model planner only) and, with
    record, frames (T, R, R, 3) of episode 0.
    """
    if kind not in PLANNERS:
        raise UserError(f"unknown planner '{kind}' (choose from {', '.join(PLANNERS)})")
    cfg.check()
    n, a = len(starts), world.action_dim
    if a == 0:
        raise UserError(f"world {world.name} has no actions: there is nothing to plan")
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    state = world.set_state(starts)
    if goal_images is None:
        goal_images = world.render(goals)
    done = np.zeros(n, bool)
    steps = np.full(n, -1)
    frame = observe(world, world.render(state), None, rng)
    recorded = [frame[0]] if record else []
    like = torch.zeros(0)  # the planner's tensors follow the model's latents (its device); the CPU without a model
    if kind == "model":
        z_goal = like = model.encode(goal_images)  # (N, D)
        z_hist = model.encode(frame)[:, None]  # (N, 1, D)
        b_hist = like.new_zeros(n, 0, frameskip * a)
    plan_seconds, decisions, t = 0.0, 0, 0
    mean = like.new_zeros(n, cfg.horizon, frameskip * a)  # warm start: last plan shifted by one block
    while t < budget and not (goals is not None and done.all()):
        live = np.flatnonzero(~done)
        tic = time.perf_counter()
        if kind == "random":
            block = torch.from_numpy(rng.uniform(-1, 1, (len(live), frameskip * a))).float()
        else:
            if kind == "model":
                cost = model_cost(model, z_hist[live], b_hist[live], z_goal[live], cfg.cost)
            else:
                cost = oracle_cost(world, state[live], goals[live], frameskip, cfg.cost)
            plan_ = cem(cost, len(live), frameskip * a, cfg, gen, init_mean=mean[live])
            block = plan_[:, 0]  # (n_live, fs * A)
            mean[live] = torch.cat([plan_[:, 1:], torch.zeros_like(plan_[:, :1])], dim=1)
        acts = block.cpu().numpy().reshape(len(live), frameskip, a).astype(np.float64)  # waits for the device
        plan_seconds += time.perf_counter() - tic
        decisions += len(live)
        for j in range(frameskip):
            if t >= budget:
                break
            state[live] = world.step(state[live], acts[:, j], rng)
            t += 1
            if goals is not None:
                reached = world.success(state, goals) & ~done
                steps[reached] = t
                done |= reached
            frame = observe(world, world.render(state), frame, rng)
            if record and 0 in live:
                recorded.append(frame[0])
        if kind == "model":
            z_hist = torch.cat([z_hist, model.encode(frame)[:, None]], dim=1)[:, -model.history:]
            full = like.new_zeros(n, frameskip * a)
            full[live] = block
            b_hist = torch.cat([b_hist, full[:, None]], dim=1)
            b_hist = b_hist[:, b_hist.shape[1] - (z_hist.shape[1] - 1):]  # the blocks between the kept latents
    out = {"success": done, "steps": steps, "seconds_per_decision": plan_seconds / decisions if decisions else 0.0,
           "final_state": state}
    if kind == "model":
        out["final_cost"] = ((model.encode(frame) - z_goal) ** 2).sum(-1).cpu().numpy()
    if record:
        out["frames"] = np.stack(recorded)
        out["goal_image"] = goal_images[0]
    return out


def summarise(result: dict, world: World | None = None, goals: np.ndarray | None = None) -> dict:
    """success_rate, mean_steps, seconds_per_decision, and the world's own scores of the final states
    (mean; Push-T: coverage and the block's, angle's and agent's errors against the goal)."""
    success, steps = result["success"], result["steps"]
    out = {"success_rate": float(success.mean()) if len(success) else 0.0,
           "mean_steps": float(steps[success].mean()) if success.any() else None,
           "seconds_per_decision": float(result["seconds_per_decision"])}
    if world is not None and goals is not None:
        out.update({k: float(np.mean(v)) for k, v in world.scores(result["final_state"], goals).items()})
    return out


def draw_problems(world: World, episodes: int, seed: int, goal_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Start and goal states (N, S) from their own seed stream (held out from any training data's streams).

    goal_offset > 0 (LeWM's protocol): the goal is where the world's exploration policy, run from
    the start, is `goal_offset` steps later, so every goal is reachable in about that many steps.
    goal_offset 0: goals anywhere (`world.sample_goal`), which on two-room often means the far
    side of the wall. Either way goals lie at least MIN_GOAL_DISTANCE from the start (a goal
    reached before acting tests nothing); problems that fail it are drawn again.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    starts, goals = world.reset(rng, episodes), np.empty((episodes, world.state_dim))
    todo = np.arange(episodes)
    for _ in range(100):
        if goal_offset > 0:
            starts[todo] = world.reset(rng, len(todo))
            state, memory = starts[todo].copy(), world.explore_init(rng, starts[todo])
            for _ in range(goal_offset):
                state = world.step(state, world.explore(state, memory, rng), rng)
            goals[todo] = state
        else:
            goals[todo] = world.sample_goal(rng, len(todo))
        # Also redrawn: goals the start already meets (Push-T: a block the policy did not move enough).
        todo = np.flatnonzero((world.goal_distance(starts, goals) < MIN_GOAL_DISTANCE) | world.success(starts, goals))
        if not len(todo):
            break
    return starts, goals


def plan(model: WorldModelExport, world: World, *, episodes: int = 20, seed: int = 0, settings: PlanConfig | None = None,
         planners: tuple[str, ...] = PLANNERS, record: bool = False) -> dict:
    """Plan towards goal images of held-out goal states with each planner; the report of issue 20's `plan`.

    settings: a `plan:` section (candidates, iterations, elites, horizon in environment steps, cost,
    noise_beta, budget, goal_offset); None: the library's defaults. `plan_settings.saved_settings`
    reads a run's own. Keys: success_rate, random_success_rate, oracle_success_rate (fractions of
    `episodes`), seconds_per_decision (the world model's), mean_steps / random_mean_steps /
    oracle_mean_steps (steps to success of the successful episodes), random_ / oracle_seconds_per_decision,
    `cem` (the settings, with horizon_blocks), `world_scores` (the names of the world's own scores of the
    final states, each reported per planner like success_rate) and `video` (frames of episode 0 and its
    goal image) with record.
    """
    settings = settings or PlanConfig()
    budget, goal_offset = settings.budget, settings.goal_offset
    if episodes < 1 or budget < 1:
        raise UserError(f"--episodes and --budget must be >= 1, got {episodes} and {budget}")
    world.require_state_setting("world plan")
    cfg = search(settings, model.frameskip)
    starts, goals = draw_problems(world, episodes, seed, goal_offset)
    report: dict = {"episodes": episodes, "budget": budget, "world": world.name, "frameskip": model.frameskip,
                    "goal_offset": goal_offset, "cem": describe(settings, model.frameskip)}
    report["world_scores"] = list(world.scores(starts[:0], goals[:0]))  # their names: the world's own scores
    for kind in planners:
        result = run_episodes(kind, world, starts, goals, model=model, frameskip=model.frameskip, budget=budget,
                              cfg=cfg, seed=seed, record=record and kind == "model")
        prefix = "" if kind == "model" else f"{kind}_"
        for key, value in summarise(result, world, goals).items():
            report[f"{prefix}{key}"] = value
        if "frames" in result:
            report["video"] = {"frames": result["frames"], "goal": result["goal_image"], "success": bool(result["success"][0])}
    return report


def save_strip(frames: np.ndarray, goal: np.ndarray, out, every: int = 1) -> None:
    """A PNG strip (frames every `every` steps, then a gap, then the goal) or, for .gif, an animation with the goal beside."""
    from PIL import Image

    from lejepa_cli.outputs import OWN_SOFTWARE, atomic_output

    gap = np.full((frames.shape[1], max(2, frames.shape[1] // 8), 3), 255, np.uint8)
    with atomic_output(out) as tmp:  # the format follows the extension, which tmp keeps
        if str(out).lower().endswith(".gif"):
            pics = [Image.fromarray(np.concatenate([f, gap, goal], axis=1)) for f in frames]
            pics[0].save(tmp, save_all=True, append_images=pics[1:], duration=120, loop=0, comment=OWN_SOFTWARE)
            return
        strip = Image.fromarray(np.concatenate([*frames[::every], gap, goal], axis=1))
        if str(out).lower().endswith(".png"):
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("Software", OWN_SOFTWARE)
            strip.save(tmp, pnginfo=info)
        else:
            strip.save(tmp)
