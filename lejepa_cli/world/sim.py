"""The World protocol, its options and `simulate` (the built-in worlds by name: catalog.py).

A world is a batched numpy simulator. Its state is a plain float64 array (B, S) whose columns
are named by `state_names` (positions, velocities and hidden parameters), so a planner can copy
it, a probe can regress on it, and a surprise test can edit it (teleport an object by writing
its x, y) without knowing the world's internals:

    world = make_world("two-room", size=64, sets=["noise=0.05"])
    rng = np.random.default_rng(0)
    state = world.reset(rng, 8)                     # (8, S)
    frames = world.render(state)                    # (8, 64, 64, 3) uint8, clean
    state = world.step(state, actions, rng)         # actions (8, A); rng=None: no disturbances
    goal = world.sample_goal(rng, 8); world.success(state, goal)   # (8,) bool

Observation knobs (pixel noise, dropped frames) live in `observe`, not in `render`, so a
planner's goal image and a probe's clean frame stay clean; colour knobs are part of `render`
(they are what the world looks like). The simulator knows nothing about models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from lejepa_cli.errors import UserError

EPISODE_CHUNK = 32  # episodes simulated together; each chunk has its own seeded generator


@dataclass(frozen=True)
class Option:
    """One world setting, settable with `--set name=value`."""

    name: str
    default: float | int
    help: str
    low: float
    high: float

    def parse(self, text: str) -> float | int:
        try:
            value: float | int = int(text) if isinstance(self.default, int) else float(text)
        except ValueError:
            kind = "an integer" if isinstance(self.default, int) else "a number"
            raise UserError(f"world option {self.name} must be {kind}, got '{text}'") from None
        if not (self.low <= value <= self.high) or (isinstance(value, float) and not math.isfinite(value)):
            raise UserError(f"world option {self.name} must be in [{self.low}, {self.high}], got {text}")
        return value


# Knobs every world has (the conditions a deployed world model meets: sensor noise, frame
# drops, distribution shift in colour, unmodelled disturbances).
COMMON_OPTIONS = (
    Option("noise", 0.0, "pixel noise std, in [0, 1] pixel units, added to every recorded frame", 0.0, 1.0),
    Option("drop_prob", 0.0, "probability that a recorded frame is dropped (the previous one repeats)", 0.0, 1.0),
    Option("hue_shift", 0.0, "rotate the hue of every colour by this many degrees", -360.0, 360.0),
    Option("bg_shift", 0.0, "added to the background brightness (0 = default background)", -1.0, 1.0),
    Option("kick_prob", 0.0, "probability per step of a random push the actions did not cause", 0.0, 1.0),
    Option("kick_strength", 1.0, "size of a random push, in units of the world's top speed", 0.0, 20.0),
)


class World(ABC):
    """Base class of the built-in worlds; subclasses fill in the class attributes and the abstract methods."""

    name: str = ""
    description: str = ""
    action_dim: int = 0
    options_spec: tuple[Option, ...] = ()
    success_radius: float = 0.05  # goal reached when goal_distance < this (arena side = 1)
    surprise_object: tuple[str, ...] = ()  # the state columns a teleport event moves (empty: no teleports)
    teleport_jump: float = 0.3  # a teleport moves the object at least this far (in the columns' units)
    settable: bool = True  # set_state gives a state the simulator can step on from (gym: some cannot)

    def __init__(self, size: int = 64, **options: Any):
        if not 8 <= int(size) <= 1024:
            raise UserError(f"--size must be between 8 and 1024 pixels, got {size}")
        self.size = int(size)
        spec = {o.name: o for o in (*COMMON_OPTIONS, *self.options_spec)}
        unknown = sorted(set(options) - set(spec))
        if unknown:
            raise UserError(f"world {self.name} has no option {unknown[0]} (it has: {', '.join(spec)})")
        # Keyword options (from Python or a dataset's index.json) pass the same checks as --set.
        self.options = {name: spec[name].parse(str(options[name])) if name in options else o.default for name, o in spec.items()}
        self.configure()

    # -- what subclasses provide -----------------------------------------------------------

    @property
    @abstractmethod
    def state_names(self) -> list[str]:
        """Names of the state columns."""

    def configure(self) -> None:
        """Check option combinations (UserError, e.g. min > max) and precompute what the options fix."""

    @abstractmethod
    def reset(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, S) float64 initial states, hidden parameters drawn per episode."""

    @abstractmethod
    def step(self, state: np.ndarray, action: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Next state (B, S) after actions (B, A) (clipped to [-1, 1]); random pushes only with an rng."""

    @abstractmethod
    def render(self, state: np.ndarray) -> np.ndarray:
        """(B, R, R, 3) uint8 clean frames of the states (colour knobs applied, no noise)."""

    @abstractmethod
    def sample_goal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, S) goal states (reachable: in free space, at rest)."""

    @abstractmethod
    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """(B,) distance, in arena units, between what the goal asks for and the state."""

    def explore_init(self, rng: np.random.Generator, state: np.ndarray) -> dict:
        """Memory of the exploration policy for a batch of new episodes."""
        return {"ou": np.zeros((len(state), self.action_dim))}

    def explore(self, state: np.ndarray, memory: dict, rng: np.random.Generator) -> np.ndarray:
        """(B, A) smooth random actions in [-1, 1] (mutates `memory`)."""
        return np.clip(ou_step(memory["ou"], rng), -1.0, 1.0)

    # -- shared -----------------------------------------------------------------------------

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    def column(self, name: str) -> int:
        """Index of a state column, e.g. world.column("agent_x")."""
        try:
            return self.state_names.index(name)
        except ValueError:
            raise UserError(f"world {self.name} has no state variable {name} (it has: {', '.join(self.state_names)})") from None

    def state_vector(self, state: np.ndarray) -> np.ndarray:
        """(B, S) float32 copy of the state, as stored in a trajectory dataset."""
        return np.asarray(state, dtype=np.float32).copy()

    def set_state(self, vector: np.ndarray) -> np.ndarray:
        """A simulator state (B, S) float64 from a stored or edited state vector."""
        vector = np.asarray(vector, dtype=np.float64)
        if vector.ndim != 2 or vector.shape[1] != self.state_dim:
            raise UserError(f"world {self.name} states have shape (B, {self.state_dim}), got {vector.shape}")
        return vector.copy()

    def require_state_setting(self, what: str) -> None:
        """A UserError when `what` (e.g. "world plan") cannot run because states cannot be set; built-ins can."""

    def with_options(self, **changes: Any) -> "World":
        """The same world with some options changed (a stressed or recoloured copy)."""
        return type(self)(size=self.size, **{**self.options, **changes})

    def scores(self, state: np.ndarray, goal: np.ndarray) -> dict[str, np.ndarray]:
        """The world's own per-episode scores of final states against goals (Push-T: coverage); none by default."""
        return {}

    def metadata(self) -> dict:
        """Extra facts a simulated dataset's index.json records about the world (source.world_metadata)."""
        return {}

    def success(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        """(B,) bool: the goal is reached, i.e. goal_distance < success_radius."""
        return self.goal_distance(state, goal) < self.success_radius

    def palette(self, colours: dict[str, tuple[float, float, float]]) -> dict[str, np.ndarray]:
        """The world's colours after the hue/background knobs ('background' gets bg_shift)."""
        from lejepa_cli.world.render import rotate_hue

        out = {k: rotate_hue(np.asarray(v, dtype=np.float64), self.options["hue_shift"]) for k, v in colours.items()}
        out["background"] = np.clip(out["background"] + self.options["bg_shift"], 0.0, 1.0)
        return out

    def kicks(self, rng: np.random.Generator | None, n: int, scale: float) -> np.ndarray:
        """(n, 2) random pushes (zero where none happens this step), `scale` = the world's top speed."""
        if rng is None or self.options["kick_prob"] <= 0:
            return np.zeros((n, 2))
        hit = rng.random(n) < self.options["kick_prob"]
        return hit[:, None] * rng.normal(0.0, self.options["kick_strength"] * scale, (n, 2))


def ou_step(x: np.ndarray, rng: np.random.Generator, theta: float = 0.15, sigma: float = 0.3) -> np.ndarray:
    """One Ornstein-Uhlenbeck step in place (smooth, mean-reverting noise); returns x."""
    x += -theta * x + sigma * rng.standard_normal(x.shape)
    return x


def observe(world: World, clean: np.ndarray, previous: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """What the camera records: clean frames (B, R, R, 3) with pixel noise and dropped frames."""
    frames = add_pixel_noise(clean, world.options["noise"], rng)
    return drop_frames(frames, previous, world.options["drop_prob"], rng)


def add_pixel_noise(frames: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 frames plus Gaussian noise of `std` (in [0, 1] pixel units), rounded and clipped; unchanged at 0."""
    if std <= 0:
        return frames
    noisy = frames.astype(np.float32) + rng.standard_normal(frames.shape, dtype=np.float32) * np.float32(std * 255.0)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def drop_frames(frames: np.ndarray, previous: np.ndarray | None, prob: float, rng: np.random.Generator) -> np.ndarray:
    """Frames (B, ...) of which each, with probability `prob`, is replaced by `previous` (the last recorded one)."""
    if prob <= 0 or previous is None:
        return frames
    dropped = rng.random(len(frames)) < prob
    return np.where(dropped.reshape(-1, *[1] * (frames.ndim - 1)), previous, frames)


@dataclass
class Chunk:
    """Simulated episodes, concatenated episode after episode."""

    frames: np.ndarray  # (b * T, R, R, 3) uint8
    actions: np.ndarray  # (b * T, A) float32; a_t acts between frame t and frame t + 1
    state: np.ndarray  # (b * T, S) float32, the state shown in frame t
    episodes: int


MAX_ACTION_NOISE = 4.0  # actions live in [-1, 1]: a std of 4 is already close to uniform random


def simulate(world: World, episodes: int, steps: int, seed: int, stream: int = 0,
             action_noise: float = 0.0, wander: float = 0.0) -> Iterator[Chunk]:
    """Roll out `episodes` episodes of `steps` frames with the exploration policy, in chunks.

    Chunk c uses the generator seeded by (seed, stream, c): the data depend only on the seed,
    the stream (0 train, 1 val: disjoint episodes), the options, the episode count and length.
    `action_noise` and `wander` change the data-collection policy (see _collection_policy). They
    belong to the data, not to the world: evaluation episodes of a run trained on such data use
    the world's own exploration.
    """
    if episodes < 1 or steps < 1:
        raise UserError(f"--episodes and --steps must be >= 1, got {episodes} and {steps}")
    check_collection(action_noise, wander)
    for c, first in enumerate(range(0, episodes, EPISODE_CHUNK)):
        b = min(EPISODE_CHUNK, episodes - first)
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, c]))
        R = world.size
        frames = np.empty((b, steps, R, R, 3), dtype=np.uint8)
        actions = np.empty((b, steps, world.action_dim), dtype=np.float32)
        states = np.empty((b, steps, world.state_dim), dtype=np.float32)
        state = world.reset(rng, b)
        memory = world.explore_init(rng, state)
        adjust = _collection_policy(action_noise, wander, rng, b, world.action_dim)
        previous = None
        for t in range(steps):
            previous = observe(world, world.render(state), previous, rng)
            frames[:, t] = previous
            states[:, t] = world.state_vector(state)
            action = world.explore(state, memory, rng)
            if adjust is not None:
                action = adjust(action)
            actions[:, t] = action
            state = world.step(state, action, rng)
        yield Chunk(frames.reshape(b * steps, R, R, 3), actions.reshape(b * steps, -1), states.reshape(b * steps, -1), b)


def check_collection(action_noise: float, wander: float) -> None:
    """The data-collection settings' one bound check (simulate, and simulate_dataset before it writes)."""
    if not 0.0 <= action_noise <= MAX_ACTION_NOISE:
        raise UserError(f"--action-noise must be in [0, {MAX_ACTION_NOISE}], got {action_noise}")
    if not 0.0 <= wander <= 1.0:
        raise UserError(f"--wander must be a share in [0, 1], got {wander}")


def _collection_policy(action_noise: float, wander: float, rng: np.random.Generator, episodes: int,
                       action_dim: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """How one chunk's data collection departs from the world's exploration: action -> action, or
    None when nothing does (so default data stay bit for bit).

    - `wander`: each episode, with this probability, is driven by a smooth random walk (OU actions)
      instead. Exploration policies that push an object keep the agent beside it; frames of the agent
      away from the object then never occur, and a planner that moves it there meets a latent that
      cannot tell agent from object (issue 30, push).
    - `action_noise`: white noise on the actions, its std drawn per episode in [0, action_noise].
      Exploration acts smoothly, a planner's candidates jitter from step to step.
    """
    jitter = None if action_noise <= 0 else rng.uniform(0.0, action_noise, (episodes, 1))
    walkers = None if wander <= 0 else rng.random(episodes) < wander
    if jitter is None and walkers is None:
        return None
    walk = np.zeros((episodes, action_dim))

    def adjust(action: np.ndarray) -> np.ndarray:
        if walkers is not None:
            action = np.where(walkers[:, None], np.clip(ou_step(walk, rng), -1.0, 1.0), action)
        if jitter is not None:
            action = np.clip(action + jitter * rng.standard_normal(action.shape), -1.0, 1.0)
        return action

    return adjust
