"""`gym:ENV_ID`: any Gymnasium environment with rgb_array frames (or image observations) and Box actions, as a World.

    world = make_world("gym:Pendulum-v1", size=32)                  # via the catalog
    world = make_world("gym:gym_pusht/PushT-v0", size=64, env_kwargs={"damping": 0.1})
    state = world.reset(rng, 8); frames = world.render(state); state = world.step(state, actions, rng)

The World protocol is batched and pure (step(state, action) from any state); an environment is one
stateful object. The world keeps a pool of environments, row i of a batch on environment i (mod the
pool), and remembers each one's current state: a row whose state is the environment's current one
steps on directly; any other row is written into it first (`StateAccess.write`), which only
settable families can do (gym_state.py). A non-settable environment still runs the sequential
loops (simulate, probe, the surprise replays of reset states, which are re-made from their reset
seeds); `world plan` and teleport events refuse it in one line.

Actions: the model's [-1, 1] are mapped to the env's Box bounds (gym_env.to_env); the dataset's
index.json stores the bounds (source.gym). Episodes run exactly `--steps` steps: the env's
terminated / truncated flags are not acted on (the simulation goes on, as the physics does).
Frames: render() (or the image observation) centre-cropped to a square, resized with Pillow, then
the colour knobs: hue_shift rotates every pixel's hue; bg_shift brightens or darkens the pixels of
the frame's background colour (its top-left pixel's). kick_prob / kick_strength disturb the
executed action (a Gaussian of kick_strength x half the action range), not the state.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world import gym_env
from lejepa_cli.world.gym_state import PushTAccess, state_access
from lejepa_cli.world.sim import World

POOL = 64  # environments kept for settable families (rows beyond reuse them, written first)
BACKGROUND_TOLERANCE = 12  # pixel levels: what counts as the background colour for bg_shift


@lru_cache(maxsize=None)
def gym_world_class(env_id: str) -> type["GymWorld"]:
    """The World class of `gym:env_id` (one per id, so `type(world)(size=..., **options)` rebuilds it)."""
    if not env_id:
        raise UserError("give a Gymnasium id after gym:, e.g. gym:Pendulum-v1")
    return type(f"GymWorld[{env_id}]", (GymWorld,), {"name": f"gym:{env_id}", "env_id": env_id,
                                                     "description": f"Gymnasium environment {env_id}"})


class GymWorld(World):
    env_id: str = ""

    def __init__(self, size: int = 64, env_kwargs: dict | list | str | None = None, policy: str | None = None,
                 **options: Any):
        super().__init__(size, **options)
        self.access = None
        kwargs = gym_env.parse_env_kwargs(env_kwargs)
        env, self.frame_source = gym_env.open_env(self.env_id, kwargs)
        obs, _ = env.reset(seed=0)
        self.access = state_access(self.env_id, env, obs)
        defaults = self.access.default_kwargs(self.size)
        if any(k not in kwargs for k in defaults):  # the family's defaults (e.g. Push-T's pixels at this size)
            env.close()
            kwargs = {**defaults, **kwargs}
            env, self.frame_source = gym_env.open_env(self.env_id, kwargs)
            obs, _ = env.reset(seed=0)
        self.low, self.high = gym_env.action_bounds(env, self.env_id)
        self.action_dim = len(self.low)
        self.success_radius = self.access.success_radius
        self.surprise_object = self.access.teleport if self.access.settable else ()
        self.teleport_jump = self.access.teleport_jump
        self.options["env_kwargs"] = gym_env.parse_env_kwargs(env_kwargs)  # as given: defaults follow the size
        self.options["policy"] = policy
        self._policy = gym_env.load_policy(policy) if policy else None
        self._envs, self._current, self._obs, self._frame = [env], [None], [obs], [None]
        self._kwargs = kwargs
        self._seeds: dict[bytes, int] = {}
        self._background: np.ndarray | None = None

    # -- what the world is ------------------------------------------------------------------

    @property
    def state_names(self) -> list[str]:
        return self.access.names if self.access is not None else []

    @property
    def settable(self) -> bool:
        return self.access.settable

    def require_state_setting(self, what: str) -> None:
        if not self.access.settable:
            raise UserError(f"{what} needs an environment that can be set to a given state; {self.name} cannot "
                            f"(supported: gym-pusht, classic control with a `state` attribute, e.g. Pendulum-v1)")

    def metadata(self) -> dict:
        """What the dataset's index.json records about the environment (source.gym)."""
        return {"env_id": self.env_id, "env_kwargs": self._kwargs, "action_low": self.low.tolist(),
                "action_high": self.high.tolist(), "actions": "stored in [-1, 1]; env action = low + (a + 1) / 2 * (high - low)",
                "state": type(self.access).__name__, "settable": self.access.settable, "frames": self.frame_source}

    # -- the pool ---------------------------------------------------------------------------

    def _slot(self, i: int) -> int:
        if not self.access.settable:
            while len(self._envs) <= i:
                self._grow()
            return i
        while len(self._envs) <= min(i, POOL - 1):
            self._grow()
        return i % POOL

    def _grow(self) -> None:
        env, _ = gym_env.open_env(self.env_id, self._kwargs)
        obs, _ = env.reset(seed=0)  # a reset builds the simulation (gym-pusht's bodies) and allows stepping
        self._envs.append(env)
        self._current.append(None)
        self._obs.append(None)
        self._frame.append(None)
        self._track(len(self._envs) - 1, obs)

    def _track(self, k: int, obs) -> np.ndarray:
        state = self.access.read(self._envs[k], obs)
        self._current[k], self._obs[k], self._frame[k] = state, obs, None
        return state

    def _bring(self, i: int, row: np.ndarray) -> int:
        """The slot of row i, its environment put in the state `row`."""
        k = self._slot(i)
        current = self._current[k]
        if current is not None and np.array_equal(current, row):
            return k
        if self.access.settable:
            self._track(k, self.access.write(self._envs[k], row))
            self._current[k] = np.array(row, np.float64)  # what was asked for, so the next step finds it
            return k
        seed = self._seeds.get(_key(row))
        if seed is None:
            self.require_state_setting("moving to a state it did not reach itself")
        obs, _ = self._envs[k].reset(seed=seed)
        self._track(k, obs)
        return k

    def _holding(self, i: int, row: np.ndarray) -> int:
        """A slot whose environment is in the state `row` (row i's own first, then any), else row i's, moved there."""
        k = self._slot(i)
        if self._current[k] is not None and np.array_equal(self._current[k], row):
            return k
        for j, current in enumerate(self._current):
            if current is not None and np.array_equal(current, row):
                return j
        return self._bring(i, row)

    def with_options(self, **changes: Any) -> "GymWorld":
        """A copy with other common options (noise, colours, disturbances) on the same environments."""
        unknown = set(changes) - {"noise", "drop_prob", "hue_shift", "bg_shift", "kick_prob", "kick_strength"}
        if unknown:
            raise UserError(f"{self.name} has no option {sorted(unknown)[0]}")
        other = copy.copy(self)
        other.options = {**self.options, **{k: type(self.options[k])(v) for k, v in changes.items()}}
        return other

    # -- World ------------------------------------------------------------------------------

    def reset(self, rng: np.random.Generator, n: int) -> np.ndarray:
        seeds = rng.integers(0, 2**31 - 1, n)
        out = np.empty((n, self.state_dim))
        for i, seed in enumerate(seeds):
            k = self._slot(i)
            obs, _ = self._envs[k].reset(seed=int(seed))
            out[i] = self._track(k, obs)
            self._seeds[_key(out[i])] = int(seed)
        return out

    def step(self, state: np.ndarray, action: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        action = np.clip(np.asarray(action, np.float64).reshape(len(state), self.action_dim), -1.0, 1.0)
        if rng is not None and self.options["kick_prob"] > 0:
            hit = rng.random(len(state)) < self.options["kick_prob"]
            noise = rng.normal(0.0, self.options["kick_strength"], action.shape)
            action = np.clip(action + hit[:, None] * noise, -1.0, 1.0)
        out = np.empty((len(state), self.state_dim))
        for i in range(len(state)):
            k = self._bring(i, state[i])
            obs = self._envs[k].step(gym_env.to_env(action[i], self.low, self.high).astype(np.float32))[0]
            out[i] = self._track(k, obs)
        return out

    def render(self, state: np.ndarray) -> np.ndarray:
        frames = np.empty((len(state), self.size, self.size, 3), np.uint8)
        for i in range(len(state)):
            k = self._holding(i, state[i])
            if self._frame[k] is None:
                raw = self._obs[k] if self.frame_source == "observation" else self._envs[k].render()
                self._frame[k] = gym_env.square_resize(raw, self.size)
            frames[i] = self._frame[k]
        return self._recolour(frames)

    def _recolour(self, frames: np.ndarray) -> np.ndarray:
        hue, bg = self.options["hue_shift"], self.options["bg_shift"]
        if hue == 0 and bg == 0:
            return frames
        from lejepa_cli.world.render import rotate_hue

        x = frames.astype(np.float32) / 255.0
        if bg != 0:
            corner = frames[:, :1, :1].astype(np.int16)
            background = (np.abs(frames.astype(np.int16) - corner).max(-1, keepdims=True) <= BACKGROUND_TOLERANCE)
            x = np.where(background, np.clip(x + bg, 0.0, 1.0), x)
        x = rotate_hue(x, hue)
        return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def sample_goal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.reset(rng, n)

    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return self.access.goal_distance(np.asarray(state, np.float64), np.asarray(goal, np.float64))

    def success(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return self.access.success(np.asarray(state, np.float64), np.asarray(goal, np.float64))

    def scores(self, state: np.ndarray, goal: np.ndarray) -> dict[str, np.ndarray]:
        return self.access.scores(np.asarray(state, np.float64), np.asarray(goal, np.float64))

    # -- exploration ------------------------------------------------------------------------

    def explore_init(self, rng: np.random.Generator, state: np.ndarray) -> dict:
        if self._policy is None and isinstance(self.access, PushTAccess):
            from lejepa_cli.world.pusht import explore_init

            return explore_init(rng, state)
        return super().explore_init(rng, state)

    def explore(self, state: np.ndarray, memory: dict, rng: np.random.Generator) -> np.ndarray:
        if self._policy is not None:
            out = np.empty((len(state), self.action_dim))
            for i in range(len(state)):
                k = self._bring(i, state[i])
                action = np.asarray(self._policy(self._obs[k], self._envs[k], rng), np.float64).ravel()
                if action.shape != (self.action_dim,):
                    raise UserError(f"--policy {self.options['policy']} returned an action of shape {action.shape}, "
                                    f"expected ({self.action_dim},) in the env's units")
                out[i] = gym_env.from_env(action, self.low, self.high)
            return out
        if isinstance(self.access, PushTAccess):
            from lejepa_cli.world.pusht import explore

            return explore(state, memory, rng, self.low, self.high)
        return super().explore(state, memory, rng)

    def close(self) -> None:
        for env in self._envs:
            env.close()


def _key(state: np.ndarray) -> bytes:
    """A reset state as stored (float32), so a start read back from a dataset finds its seed."""
    return np.asarray(state, np.float32).tobytes()
