"""Violation of expectation: does the world model's prediction error spike at impossible events?

    from lejepa_cli.world.surprise import surprise
    report = surprise(model, world, episodes=20)
    report["auroc"]["teleport"]        # event frames against normal frames, 0.5 = blind, 1 = perfect

Held-out episodes are simulated with the exploration policy, then replayed twice with the same
actions and the same random draws: once clean, once with one impossible event at a known window
frame k (chosen per episode, after a full history):
- `teleport`: the world's main object (`world.surprise_object`: two-room's agent, push's block,
  balls' first ball, Push-T's block) jumps to a random free position at least `world.teleport_jump`
  away (0.3 of the arena), and moves on from there (only where the world's states can be set);
- `colour`: frame k alone is rendered with every colour's hue rotated by 120 degrees;
- `pass_through` (two-room): the agent crosses the wall away from the door, x -> 1 - x.
Surprise of frame t + 1 = ||p_t - z_{t+1}||^2, the predictor's error from the history ending at t.
AUROC: the event frames (frame k of every event episode) against every frame of the clean
replays with a full history.

A run evaluated on stored trajectories (world/episodes.py: trained on a file, or `--data FILE`)
has no simulator to replay: its held-out episodes are edited instead (frame_edits.py): a
`teleport` splices in another episode from frame k on, `colour` rotates frame k's hue by 120
degrees, `frozen` repeats the window frame before k. The scoring is the same (`score_events`).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.probes import average_ranks
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.world.episodes import as_source
from lejepa_cli.world.frame_edits import DATA_EVENTS, HUE_EVENT, data_events
from lejepa_cli.world.sim import World, observe, simulate
from lejepa_cli.world.runs import blocks, encode_episodes, one_step_surprise, require_window_frames, window_count, window_frames

EVENT_STREAM = 103  # seed stream of the held-out episodes (apart from the dataset's 0 and 1)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2), via ranks."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    ranks = average_ranks(np.concatenate([pos, neg])) + 1.0  # 1-based, ties averaged
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def event_kinds(world: World) -> tuple[str, ...]:
    if world.name == "two-room":
        return ("teleport", "colour", "pass_through")
    return ("teleport", "colour") if world.surprise_object else ("colour",)


def teleport(world: World, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move the main object of each row to a fresh free position at least `world.teleport_jump` away (the farthest of 16 draws)."""
    cols = [world.column(name) for name in world.surprise_object]
    if not cols:
        raise UserError(f"no teleport events are defined for world {world.name}")
    old = state[:, cols]
    draws = np.stack([world.reset(rng, len(state))[:, cols] for _ in range(16)], axis=1)  # (B, 16, C)
    far = np.linalg.norm(draws - old[:, None], axis=-1)  # (B, 16)
    ok = far >= world.teleport_jump
    pick = np.where(ok.any(1), ok.argmax(1), far.argmax(1))  # first far-enough draw, else the farthest
    out = state.copy()
    out[:, cols] = draws[np.arange(len(state)), pick]
    return out


def pass_through(world: World, state: np.ndarray) -> np.ndarray:
    """two-room: mirror the agent across the wall (x -> 1 - x), moved off the door's height so it crosses wall."""
    o = world.options
    out = state.copy()
    x, y = world.column("agent_x"), world.column("agent_y")
    out[:, x] = 1.0 - state[:, x]
    clear = o["door"] / 2 + o["radius"] + 0.02
    near_door = np.abs(state[:, y] - o["door_y"]) < clear
    off = np.where(state[:, y] >= o["door_y"], o["door_y"] + clear, o["door_y"] - clear)
    out[:, y] = np.where(near_door, np.clip(off, o["radius"], 1 - o["radius"]), state[:, y])
    return out


def replay(world: World, starts: np.ndarray, actions: np.ndarray, seed: int, kind: str | None = None,
           event_step: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Replay actions (N, T, A) from starts (N, S); with `kind`, inject that event at step event_step (N,).

    Every random draw (pushes, pixel noise, dropped frames) comes from a generator seeded by `seed`
    and does not depend on the state, so a clean and an event replay differ only where the event
    acts. Returns frames (N, T, R, R, 3) and states (N, T, S).
    """
    n, steps = actions.shape[:2]
    rng, event_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    recolour = world.with_options(hue_shift=(world.options["hue_shift"] + HUE_EVENT) % 360)
    state = world.set_state(starts)
    frames = np.empty((n, steps, world.size, world.size, 3), np.uint8)
    states = np.empty((n, steps, world.state_dim))
    previous = None
    for t in range(steps):
        hit = np.zeros(n, bool) if kind is None else event_step == t
        if hit.any() and kind == "teleport":
            state[hit] = teleport(world, state[hit], event_rng)
        elif hit.any() and kind == "pass_through":
            state[hit] = pass_through(world, state[hit])
        clean = world.render(state)
        if hit.any() and kind == "colour":
            clean[hit] = recolour.render(state[hit])
        previous = observe(world, clean, previous, rng)
        frames[:, t], states[:, t] = previous, state
        state = world.step(state, actions[:, t], rng)
    return frames, states


def require_event_frames(model: WorldModelExport, steps: int) -> None:
    """Episodes of `steps` steps must give a full history, an event frame and one after it."""
    h = model.history
    require_window_frames(model, steps, h + 2, f"surprise needs at least history + 2 = {h + 2}")


def surprise(model: WorldModelExport, world: Any, *, episodes: int = 20, steps: int | None = None, seed: int = 0,
             kinds: tuple[str, ...] | None = None, plot: str | None = None) -> dict:
    """Surprise AUROC per event kind on `episodes` held-out episodes; optionally a PNG of one episode.

    `world`: a World (or SimulatedEpisodes), whose events are replayed in the simulator, or
    StoredEpisodes (world/episodes.py), whose events are edits of the recorded frames (frame_edits.py).
    Keys: auroc (kind -> AUROC), mean_event_surprise (kind -> mean surprise at event frames),
    mean_normal_surprise, episodes, steps, event_frames (kind -> the window frame k of each episode).
    """
    source = as_source(world)
    if episodes < 1:
        raise UserError(f"--episodes must be >= 1, got {episodes}")
    steps = source.resolve_steps(steps)
    require_event_frames(model, steps)
    if source.kind == "stored":
        return _stored_surprise(model, source, episodes, steps, seed, kinds, plot)
    world = source.world
    kinds = kinds or event_kinds(world)
    bad = [k for k in kinds if k not in event_kinds(world)]
    if bad:
        raise UserError(f"event '{bad[0]}' is not defined for world {world.name} (it has: {', '.join(event_kinds(world))})")
    fs = model.frameskip
    chunks = list(simulate(world, episodes, steps, seed, EVENT_STREAM))  # the exploration policy's actions
    actions = np.concatenate([c.actions.reshape(c.episodes, steps, -1) for c in chunks]).astype(np.float64)
    starts = np.concatenate([c.state.reshape(c.episodes, steps, -1)[:, 0] for c in chunks])
    k = draw_event_frames(model, episodes, steps, seed)
    clean_frames, _ = replay(world, starts, actions, seed)
    events = ((kind, replay(world, starts, actions, seed, kind, k * fs)[0], actions) for kind in kinds)
    report = score_events(model, clean_frames, actions, events, k, plot, world.name)
    return {"episodes": episodes, "steps": steps, "world": world.name, **report}


def _stored_surprise(model: WorldModelExport, source, episodes: int, steps: int, seed: int,
                     kinds: tuple[str, ...] | None, plot: str | None) -> dict:
    """surprise() on stored trajectories: the events are edits of the held-out episodes' frames."""
    test = source.episodes("events", episodes, steps, seed)
    kinds = kinds or stored_event_kinds(test.frames)
    k = draw_event_frames(model, len(test), steps, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6]))
    edits = data_events(test.frames, test.actions, k * model.frameskip, kinds, rng, model.frameskip)
    report = score_events(model, test.frames, test.actions, ((kind, f, a) for kind, (f, a) in edits.items()), k, plot,
                          source.name)
    return {"episodes": len(test), "steps": steps, "data": source.name, "split": source.split, **report}


def stored_event_kinds(frames: np.ndarray) -> tuple[str, ...]:
    """The events defined on stored frames; the colour event only for RGB frames."""
    return DATA_EVENTS if frames.shape[-1] == 3 else tuple(k for k in DATA_EVENTS if k != "colour")


def draw_event_frames(model: WorldModelExport, n: int, steps: int, seed: int) -> np.ndarray:
    """(n,) the event's window frame k per episode: after a full history, not the last."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    return rng.integers(model.history, window_count(steps, model.frameskip) - 1, n)


def score_events(model: WorldModelExport, clean: np.ndarray, actions: np.ndarray,
                 events: Iterable[tuple[str, np.ndarray, np.ndarray]], k: np.ndarray, plot: str | None = None,
                 title: str = "") -> dict:
    """AUROC of the surprise at frame k of each event episode against every clean frame with a full history.

    clean frames (N, T, ...) and actions (N, T, A); events: (kind, frames, actions) of the same shapes.
    """
    fs, h, n = model.frameskip, model.history, len(clean)
    act_blocks = blocks(actions.astype(np.float32), fs)
    base = one_step_surprise(model, encode_episodes(model, window_frames(clean, fs)), act_blocks).numpy()  # (N, L-1)
    normal = base[:, h - 1 :]  # frames h .. L-1 with a full history
    report: dict = {"auroc": {}, "mean_event_surprise": {}, "mean_normal_surprise": float(normal.mean()), "event_frames": {}}
    curves = {}
    for kind, frames, acts in events:
        z = encode_episodes(model, window_frames(frames, fs))
        s = one_step_surprise(model, z, blocks(np.asarray(acts, np.float32), fs)).numpy()  # (N, L-1)
        event = s[np.arange(n), k - 1]  # surprise of frame k
        report["auroc"][kind] = auroc(event, normal)
        report["mean_event_surprise"][kind] = float(event.mean())
        report["event_frames"][kind] = [int(v) for v in k]
        curves[kind] = s[0]
    if plot:
        plot_surprise(curves, base[0], int(k[0]), plot, title)
    return report


def plot_surprise(curves: dict[str, np.ndarray], clean: np.ndarray, event_frame: int, out: str, title: str) -> None:
    """Surprise along episode 0 (window frames 1 .. L-1) for each event kind and the clean replay, event marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(1, len(clean) + 1)
    ax.plot(x, clean, color="black", lw=2, label="clean")
    for kind, curve in curves.items():
        ax.plot(x, curve, lw=1.2, label=kind)
    ax.axvline(event_frame, color="red", ls="--", lw=1, label=f"event (frame {event_frame})")
    ax.set_xlabel("window frame")
    ax.set_ylabel("surprise ||p - z||^2")
    ax.set_yscale("log")
    ax.set_title(f"{title}: surprise along one held-out episode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from lejepa_cli.outputs import save_figure

    try:
        save_figure(fig, out, dpi=100)
    finally:
        plt.close(fig)
