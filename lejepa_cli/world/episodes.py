"""Where `world probe | surprise | stress` get their episodes: a built-in world's simulator, or the
trajectories a run was trained on (a stable-worldmodel file, an .npz, a prepared folder).

    source = SimulatedEpisodes(world)                       # fresh episodes from seed streams no dataset uses
    source = stored_episodes("tworoom.h5", val_fraction=0.1)  # the file's episodes, its held-out ones to test on
    steps = source.resolve_steps(None)                      # simulated: 60; stored: the shortest episode
    eps = source.episodes("fit", 40, steps, seed=0)         # Episodes: frames (N, T, R, R, C) uint8,
                                                            # actions (N, T, A) float32, states (N, T, S) or None

Parts: 'fit' (what probes are fitted on) and 'test' (where probes are scored, and where surprise
events and stress conditions are applied). A simulator draws each part from its own seed stream
(101 fit, 102 test, 103 surprise's 'events'). Stored trajectories: the episodes the run held out
(data.val_fraction on a raw file, or the folder's eval split) are 'test' and the rest 'fit';
without held-out episodes, a seeded split of the episodes by probes.split_train_val (a third to
'test'). Stored episodes are cut to a common length (`steps`); shorter ones are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world.sim import World, simulate

DEFAULT_STEPS = 60  # steps per simulated evaluation episode
STREAMS = {"fit": 101, "test": 102, "events": 103}  # apart from `lejepa world simulate`'s 0 (train) and 1 (val)
TEST_FRACTION = 1 / 3  # of a stored source without held-out episodes, the share the probes are scored on


@dataclass
class Episodes:
    frames: np.ndarray  # (N, T, R, R, C) uint8
    actions: np.ndarray  # (N, T, A) float32; a_t acts between frame t and t + 1
    states: np.ndarray | None  # (N, T, S) float64, the true state shown in frame t
    ids: np.ndarray  # (N,) the episodes' numbers in their part (stored) or their order (simulated)

    def __len__(self) -> int:
        return len(self.frames)


class SimulatedEpisodes:
    """Episodes of a built-in world under its exploration policy."""

    kind: ClassVar[str] = "simulator"

    def __init__(self, world: World):
        self.world, self.name, self.state_names = world, world.name, list(world.state_names)

    has_state = True

    def describe(self) -> str:
        return f"{self.name}, simulated"

    def resolve_steps(self, steps: int | None) -> int:
        return steps or DEFAULT_STEPS

    def episodes(self, part: str, count: int, steps: int, seed: int) -> Episodes:
        frames, actions, states = [], [], []
        for chunk in simulate(self.world, count, steps, seed, STREAMS[part]):
            frames.append(chunk.frames.reshape(chunk.episodes, steps, *chunk.frames.shape[1:]))
            actions.append(chunk.actions.reshape(chunk.episodes, steps, -1))
            states.append(chunk.state.reshape(chunk.episodes, steps, -1))
        return Episodes(np.concatenate(frames), np.concatenate(actions), np.concatenate(states).astype(np.float64),
                        np.arange(count))


@dataclass
class StoredEpisodes:
    """Episodes read from stored trajectories; `pools` holds (dataset, first row, length) per episode of each part."""

    name: str
    pools: dict[str, list[tuple[Any, int, int]]]
    state_names: list[str] | None
    split: str  # how the parts were chosen, in words
    kind: ClassVar[str] = "stored"

    def describe(self) -> str:
        return f"{self.name}, stored trajectories ({self.split})"

    @property
    def has_state(self) -> bool:
        return all(ds.state is not None for pool in self.pools.values() for ds, _, _ in pool)

    def lengths(self, part: str) -> np.ndarray:
        return np.array([n for _, _, n in self.pools[part]], dtype=np.int64)

    def resolve_steps(self, steps: int | None) -> int:
        """`steps`, or the shortest episode's length; a UserError when no test episode is that long."""
        longest = int(self.lengths("test").max())
        if steps is None:
            return int(min(self.lengths("fit").min(), self.lengths("test").min()))
        if steps > longest:
            raise UserError(f"--steps {steps} is longer than every held-out episode of {self.name} (the longest has "
                            f"{longest} steps)")
        return steps

    def episodes(self, part: str, count: int, steps: int, seed: int) -> Episodes:
        """Up to `count` episodes of the part at least `steps` long (a seeded choice when there are more), cut to `steps`."""
        pool = self.pools["test" if part == "events" else part]
        usable = [i for i, (_, _, n) in enumerate(pool) if n >= steps]
        if not usable:
            raise UserError(f"{self.name}: no {part} episode has {steps} steps (the longest has "
                            f"{max(n for _, _, n in pool)}); lower --steps")
        if len(usable) > count:
            rng = np.random.default_rng(np.random.SeedSequence([seed, STREAMS[part]]))
            usable = sorted(rng.choice(usable, count, replace=False).tolist())
        rows = [(pool[i][0], pool[i][1]) for i in usable]
        frames = np.stack([ds.frames[np.arange(a, a + steps)] for ds, a in rows])
        actions = np.stack([np.asarray(ds.actions[a : a + steps], np.float32) for ds, a in rows])
        states = None
        if all(ds.state is not None for ds, _ in rows):
            states = np.stack([np.asarray(ds.state[a : a + steps], np.float64) for ds, a in rows])
        return Episodes(frames, actions, states, np.asarray(usable))


def as_source(world_or_source: Any) -> Any:
    """A World becomes its SimulatedEpisodes; an episode source is returned as it is."""
    return SimulatedEpisodes(world_or_source) if isinstance(world_or_source, World) else world_or_source


def _episodes_of(ds: Any, ids: Any = None) -> list[tuple[Any, int, int]]:
    starts = ds.episode_starts
    ids = range(ds.num_episodes) if ids is None else ids
    return [(ds, int(starts[e]), int(starts[e + 1] - starts[e])) for e in ids]


def stored_episodes(source: str | Path, *, val_fraction: float = 0.0, train_split: str = "train",
                    eval_split: str = "val", seed: int = 0) -> StoredEpisodes:
    """The episodes of a trajectory file or folder, split into 'fit' and 'test' (see the module docstring)."""
    from lejepa_cli.data.formats import is_trajectory_file
    from lejepa_cli.probes import split_train_val
    from lejepa_cli.world.trajectories import load_trajectories

    fit = load_trajectories(source, train_split, val_fraction=val_fraction)
    try:
        held = load_trajectories(source, eval_split, val_fraction=val_fraction)
    except UserError:  # one split only: hold some of its episodes out from the probes
        held = None
    name = Path(str(source)).name
    if held is not None:
        carved = val_fraction > 0 and is_trajectory_file(Path(source).expanduser())
        how = f"data.val_fraction {val_fraction:g}" if carved else f"split '{eval_split}'"
        return StoredEpisodes(name, {"fit": _episodes_of(fit), "test": _episodes_of(held)}, fit.state_names,
                              f"test: the {held.num_episodes} episodes the training held out ({how}); fit: "
                              f"{fit.num_episodes} trained on")
    if fit.num_episodes < 2:
        raise UserError(f"{source} holds one episode; the probes need two or more (fitted on some, scored on others)")
    fit_ids, test_ids = split_train_val(fit.num_episodes, TEST_FRACTION, seed)
    return StoredEpisodes(name, {"fit": _episodes_of(fit, fit_ids), "test": _episodes_of(fit, test_ids)}, fit.state_names,
                          f"test: {len(test_ids)} of its {fit.num_episodes} episodes by a seeded split (seed {seed}), "
                          f"fit: the rest; the model may have trained on both")
