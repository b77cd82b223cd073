"""Writing prepared trajectory folders: from a built-in world (`lejepa world simulate`) and from
a user's trajectory file (`lejepa data prepare FILE.npz|FILE.h5`). Format: shards.py.

Both are deterministic (seeded simulation, seeded split by episode) and refuse to replace a
folder holding something else unless told to; re-running with the same arguments on a
finished folder does nothing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from lejepa_cli.data.disk import require_space, tree_bytes
from lejepa_cli.errors import UserError
from lejepa_cli.terminal import progress_bar
from lejepa_cli.world.shards import TrajectoryWriter, prepare_out
from lejepa_cli.world.trajectories import split_episodes  # noqa: F401  (here since the first release; used below)

MAX_EPISODES = 1_000_000
FILE_CHUNK_BYTES = 64 << 20  # frames read from a source file at a time


def simulate_dataset(
    name: str, out: Path, *, episodes: int, steps: int, val_episodes: int = 0, size: int = 64, seed: int = 0,
    sets: list[str] | None = None, overwrite: bool = False, progress: bool = True,
    env_kwargs: list[str] | str | dict | None = None, policy: str | None = None, action_noise: float = 0.0,
    wander: float = 0.0,
) -> dict:
    """Simulate a world (built-in, or `gym:ENV_ID` with `env_kwargs` and a `policy` module:function)
    into a trajectory folder; returns a summary dict. `action_noise` and `wander` change the
    data-collection policy (world.sim.simulate); they are recorded in the source's plan, not in the
    world options a run rebuilds."""
    from lejepa_cli.world.catalog import make_world
    from lejepa_cli.world.sim import check_collection, simulate

    t0 = time.perf_counter()
    if not 1 <= episodes <= MAX_EPISODES or not 0 <= val_episodes <= MAX_EPISODES:
        raise UserError(f"--episodes must be in [1, {MAX_EPISODES}] and --val-episodes in [0, {MAX_EPISODES}], got {episodes} and {val_episodes}")
    if not 1 <= steps <= 100_000:
        raise UserError(f"--steps must be in [1, 100000], got {steps}")
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {seed}")
    check_collection(action_noise, wander)
    extra = {k: v for k, v in (("env_kwargs", env_kwargs), ("policy", policy)) if v}
    if extra and not name.startswith("gym:"):
        raise UserError(f"--{next(iter(extra)).replace('_', '-')} applies to gym:ENV_ID worlds, not to {name}")
    world = make_world(name, size=size, sets=sets, **extra)
    out = Path(out).expanduser().resolve()
    plan = {"world": name, "options": world.options, "size": size, "episodes": episodes, "steps": steps,
            "val_episodes": val_episodes, "seed": seed}
    # Recorded only when on, so folders simulated before these settings existed stay up to date.
    plan.update({k: v for k, v in (("action_noise", action_noise), ("wander", wander)) if v})
    frames = (episodes + val_episodes) * steps
    require_space(out, frames * (world.size * world.size * 3 + 4 * (world.action_dim + len(world.state_names))),
                  f"the trajectory dataset ({frames} frames of {world.size}x{world.size}x3)", replaces=tree_bytes(out))
    if prepare_out(out, plan, overwrite):
        return _summary(out, time.perf_counter() - t0, up_to_date=True)
    writer = TrajectoryWriter(out, world.size, 3, world.action_dim, world.state_names)
    with progress_bar(progress) as bar:
        for split, n, stream in (("train", episodes, 0), ("val", val_episodes, 1)):
            if n == 0:
                continue
            task = bar.add_task(f"simulate {name} ({split})", total=n)
            writer.begin(split)
            for chunk in simulate(world, n, steps, seed, stream, action_noise, wander):
                writer.add(chunk.frames, chunk.actions, chunk.state, [steps] * chunk.episodes)
                bar.advance(task, chunk.episodes)
    source = {"path": f"world:{name}", "kind": "world", "fingerprint": "", "plan": plan}
    if world.metadata():
        source["world_metadata"] = world.metadata()
    writer.finish(source, world=name, world_options=dict(world.options))
    return _summary(out, time.perf_counter() - t0, up_to_date=False)


def prepare_trajectory_file(
    source: str | Path, out: Path, *, resolution: int | None = None, val_fraction: float = 0.0, seed: int = 0,
    overwrite: bool = False, progress: bool = True,
) -> dict:
    """A trajectory .npz, HDF5 file or .lance dataset -> a trajectory folder (frames squared and resized to
    `resolution`, default: the frames' shorter side); returns a summary dict."""
    from lejepa_cli.data.decode import decode
    from lejepa_cli.world.readers import read_trajectory_file, source_fingerprint

    t0 = time.perf_counter()
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise UserError(f"trajectory file {source} does not exist")
    if resolution is not None and not 8 <= resolution <= 4096:
        raise UserError(f"--resolution must be between 8 and 4096, got {resolution}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    raw = read_trajectory_file(path)
    T, H, W, C = raw.frames.shape
    R = resolution or min(H, W)
    out = Path(out).expanduser().resolve()
    plan = {"source": str(path), "fingerprint": source_fingerprint(path)[:16], "resolution": R, "val_fraction": val_fraction, "seed": seed}
    require_space(out, T * (R * R * C + 4 * (raw.actions.shape[1] + len(raw.state_names or []))),
                  f"the trajectory dataset ({T} frames of {R}x{R}x{C})", replaces=tree_bytes(out))
    if prepare_out(out, plan, overwrite):
        return _summary(out, time.perf_counter() - t0, up_to_date=True)
    splits = split_episodes(len(raw.episode_starts) - 1, val_fraction, seed)
    writer = TrajectoryWriter(out, R, C, raw.actions.shape[1], raw.state_names)
    starts = raw.episode_starts
    with progress_bar(progress) as bar:
        task = bar.add_task(f"prepare {path.name}", total=T)
        for split, episodes in splits.items():
            writer.begin(split)
            group: list[int] = []
            group_rows = 0
            for e in list(episodes) + [None]:  # episodes in groups of ~FILE_CHUNK_BYTES of frames
                if e is not None:
                    group.append(int(e))
                    group_rows += int(starts[e + 1] - starts[e])
                    if group_rows * H * W * C < FILE_CHUNK_BYTES:
                        continue
                if not group:
                    continue
                rows = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in group])
                frames = np.concatenate([raw.frames[int(starts[g]) : int(starts[g + 1])] for g in group])
                if (H, W) != (R, R):
                    frames = np.stack([decode(f if C == 3 else f[..., 0], R, C) for f in frames])
                writer.add(frames, raw.actions[rows], None if raw.state is None else raw.state[rows],
                           [int(starts[g + 1] - starts[g]) for g in group])
                bar.advance(task, len(rows))
                group, group_rows = [], 0
    src = {"path": str(path), "kind": raw.kind, "fingerprint": plan["fingerprint"], "plan": plan}
    if raw.zeroed_rows:
        src["zeroed_action_rows"] = raw.zeroed_rows
    writer.finish(src)
    return _summary(out, time.perf_counter() - t0, up_to_date=False)


def _summary(out: Path, seconds: float, *, up_to_date: bool) -> dict:
    from lejepa_cli.world.shards import read_index

    index = read_index(out)
    return {
        "out": str(out), "kind": "trajectories", "up_to_date": up_to_date, "seconds": round(seconds, 3),
        "world": index.get("world"), "resolution": index["resolution"], "channels": index["channels"],
        "action_dim": index["action_dim"], "state_dim": index["state_dim"],
        "splits": {s: {"episodes": e["episodes"], "steps": e["steps"]} for s, e in index["splits"].items()},
        "zeroed_action_rows": int((index.get("source") or {}).get("zeroed_action_rows", 0)),
    }
