"""A simulated trajectory folder written out as stable-worldmodel's HDF5Writer writes it: the file
the issue-27 measurement trains on (a two-room model from a stable-worldmodel file alone).

    lejepa world simulate two-room --out /tmp/tworoom-sim --episodes 80 --steps 100 --val-episodes 0
    python -m benchmarks.swm_file /tmp/tworoom-sim /tmp/tworoom.h5          # current writer (NaN last rows)
    python -m benchmarks.swm_file /tmp/tworoom-sim /tmp/tworoom-011.h5 --layout 0.1.1

Each episode becomes the rows World.collect hands its writer (stable_worldmodel/world/world.py):
pixels, action (row t: the action that leads out of frame t; the current writer's last row NaN,
0.1.1's the episode's first action, its reset frame not stored), state (the simulator's state
vector), proprio (the agent's position: the state's first two columns), step_idx. The file itself
is written by `write_hdf5writer` of tests/test_world_files.py, which follows HDF5Writer row for row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lejepa_cli.world.trajectories import load_trajectories


def swm_episodes(folder: Path, layout: str = "current") -> list[dict[str, np.ndarray]]:
    """The episodes of a prepared folder's 'train' split as World.collect hands them to a writer."""
    ds = load_trajectories(folder, "train")
    episodes = []
    for e in range(ds.num_episodes):
        a, b = int(ds.episode_starts[e]), int(ds.episode_starts[e + 1])
        frames, actions, state = ds.frames[np.arange(a, b)], np.array(ds.actions[a:b]), np.array(ds.state[a:b])
        steps = np.arange(b - a)
        if layout == "current":
            actions[-1] = np.nan  # the reset's placeholder, moved to the last row
        else:  # 0.1.1: no reset frame; the first action, moved up past the end, lands in the last row
            first = actions[0].copy()
            frames, actions, state, steps = frames[1:], actions[1:], state[1:], steps[1:]
            actions[-1] = first
        episodes.append({"pixels": frames, "action": actions.astype(np.float32), "state": state.astype(np.float32),
                         "proprio": state[:, :2].astype(np.float32), "step_idx": steps.astype(np.int64)})
    return episodes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a folder from `lejepa world simulate`")
    parser.add_argument("out", type=Path, help="the .h5 file to write")
    parser.add_argument("--layout", choices=("current", "0.1.1"), default="current")
    args = parser.parse_args(argv)
    if args.out.exists():
        sys.exit(f"{args.out} exists; remove it first")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_world_files import write_hdf5writer  # the layout, written once

    episodes = swm_episodes(args.folder, args.layout)
    write_hdf5writer(args.out, episodes)
    rows = sum(len(ep["action"]) for ep in episodes)
    print(f"{args.out}: {len(episodes)} episodes, {rows} rows, stable-worldmodel {args.layout} HDF5Writer layout")


if __name__ == "__main__":
    main()
