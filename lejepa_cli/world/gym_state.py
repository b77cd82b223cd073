"""Where a Gymnasium environment's true state comes from, whether it can be set, and when a goal is reached.

One `StateAccess` per family, chosen by `state_access(env_id, env, observation)`:

- `PushTAccess` (gym-pusht's PushT-v0): the agent's and the block's pose and velocities, read from
  and written to the pymunk bodies (the env's `agent` and `block`); settable. Success as LeWM
  evaluates Push-T: the block within 20 (of 512) in position and pi/9 in angle of the goal pose.
- `AttributeAccess` (classic control, e.g. Pendulum-v1, MountainCarContinuous-v0): the documented
  `env.unwrapped.state` array; settable by assigning it.
- `ObservationAccess` (anything else with a flat vector observation): the observation vector; not
  settable, so `world plan` and teleport events refuse (a start drawn by `reset` is replayed by
  resetting with its seed).

    access = state_access("Pendulum-v1", env, obs)
    access.names, access.read(env, obs), access.write(env, vector), access.success(states, goals)
"""

from __future__ import annotations

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world.pusht import PUSHT_AGENT_RADIUS, PUSHT_ANGLE, PUSHT_POSITION, coverage

KNOWN_NAMES = {
    "Pendulum": ["theta", "theta_dot"],
    "MountainCarContinuous": ["position", "velocity"],
}


def _is_velocity(name: str) -> bool:
    return name.endswith(("_dot", "velocity")) or "_v" in name


def is_angle(name: str) -> bool:
    """An orientation column (it wraps at +-pi), not its rate of change."""
    return ("theta" in name or "angle" in name) and not _is_velocity(name)


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


class StateAccess:
    """The generic part: position columns (not velocities) decide goals; angles wrap."""

    settable = True
    success_radius = 0.1  # in the state's own units (radians for angles)
    teleport_jump = 0.3

    def __init__(self, names: list[str]):
        self.names = names
        self.position = [i for i, n in enumerate(names) if not _is_velocity(n)] or list(range(len(names)))
        self.angles = [i for i in self.position if is_angle(names[i])]

    @property
    def teleport(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.position[:2])

    def read(self, env, obs) -> np.ndarray:
        raise NotImplementedError

    def write(self, env, vector: np.ndarray):
        """Put the env in the state `vector`; returns its observation there."""
        raise NotImplementedError

    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        d = state[:, self.position] - goal[:, self.position]
        for k, i in enumerate(self.position):
            if i in self.angles:
                d[:, k] = _wrap(d[:, k])
        return np.linalg.norm(d, axis=1)

    def success(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return self.goal_distance(state, goal) < self.success_radius

    def default_kwargs(self, size: int) -> dict:
        return {}

    def scores(self, state: np.ndarray, goal: np.ndarray) -> dict[str, np.ndarray]:
        return {}


class AttributeAccess(StateAccess):
    def read(self, env, obs) -> np.ndarray:
        return np.asarray(env.unwrapped.state, np.float64).ravel().copy()

    def write(self, env, vector: np.ndarray):
        u = env.unwrapped
        u.state = np.asarray(vector, np.float64).copy()
        get_obs = getattr(u, "_get_obs", None)
        return get_obs() if callable(get_obs) else u.state.copy()


class ObservationAccess(StateAccess):
    settable = False

    def read(self, env, obs) -> np.ndarray:
        return np.asarray(obs, np.float64).ravel().copy()

    def write(self, env, vector: np.ndarray):
        raise UserError("this environment cannot be set to a given state")


class PushTAccess(StateAccess):
    """gym-pusht: pose and velocities of the agent and the T block (pixels of the 512 x 512 table, radians)."""

    success_radius = 1.0  # goal_distance is in units of the success thresholds
    teleport_jump = 100.0

    def __init__(self):
        super().__init__(["agent_x", "agent_y", "block_x", "block_y", "block_angle",
                          "agent_vx", "agent_vy", "block_vx", "block_vy", "block_angular_velocity"])

    @property
    def teleport(self) -> tuple[str, ...]:
        return ("block_x", "block_y")

    def read(self, env, obs) -> np.ndarray:
        u = env.unwrapped
        a, b = u.agent, u.block
        return np.array([a.position.x, a.position.y, b.position.x, b.position.y, _wrap(np.array(b.angle)),
                         a.velocity.x, a.velocity.y, b.velocity.x, b.velocity.y, b.angular_velocity], np.float64)

    def write(self, env, vector: np.ndarray):
        # The angle before the position: pymunk turns a body about its centre of gravity, so this order
        # puts the block's origin exactly at (x, y) (gym-pusht's own reset_to_state does the opposite).
        u, v = env.unwrapped, [float(x) for x in vector]
        u.agent.position, u.agent.velocity = (v[0], v[1]), (v[5], v[6])
        u.block.angle = v[4]
        u.block.position, u.block.velocity, u.block.angular_velocity = (v[2], v[3]), (v[7], v[8]), v[9]
        u.space.reindex_shapes_for_body(u.agent)
        u.space.reindex_shapes_for_body(u.block)
        return u.get_obs()

    @staticmethod
    def block_errors(state: np.ndarray, goal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,) each: the block's distance to its goal position (px) and to its goal angle (radians)."""
        return np.linalg.norm(state[:, 2:4] - goal[:, 2:4], axis=1), np.abs(_wrap(state[:, 4] - goal[:, 4]))

    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        pos, ang = self.block_errors(state, goal)
        return np.sqrt((pos / PUSHT_POSITION) ** 2 + (ang / PUSHT_ANGLE) ** 2)

    def success(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        pos, ang = self.block_errors(state, goal)
        return (pos < PUSHT_POSITION) & (ang < PUSHT_ANGLE)

    def scores(self, state: np.ndarray, goal: np.ndarray) -> dict[str, np.ndarray]:
        """gym-pusht's coverage score (the share of the goal pose's T the block covers) against each goal
        pose, and how far the block's position and angle and the agent end from the goal's: which part
        of the goal a planner misses (the success criterion needs the block only)."""
        pos, ang = self.block_errors(state, goal)
        return {"coverage": coverage(state, goal), "block_error_px": pos, "angle_error_deg": np.degrees(ang),
                "agent_error_px": np.linalg.norm(state[:, 0:2] - goal[:, 0:2], axis=1)}

    def default_kwargs(self, size: int) -> dict:
        # Pixel observations at the world's size: frames without the action marker render() draws.
        return {"obs_type": "pixels", "observation_width": size, "observation_height": size}

    @staticmethod
    def contact(env) -> bool:
        """The agent disc touches the block (within 1 px)."""
        u = env.unwrapped
        return min(s.point_query(u.agent.position).distance for s in u.block.shapes) <= PUSHT_AGENT_RADIUS + 1.0


def is_pusht(env_id: str) -> bool:
    return env_id.split("/")[-1].startswith("PushT")


def state_access(env_id: str, env, obs) -> StateAccess:
    """The family of `env`, or a one-line UserError when it gives no state vector."""
    if is_pusht(env_id) and hasattr(env.unwrapped, "block"):
        return PushTAccess()
    state = getattr(env.unwrapped, "state", None)
    named = getattr(env.unwrapped, "state_names", None)
    base = env_id.split("/")[-1].split("-v")[0]
    if isinstance(state, np.ndarray) and state.ndim == 1 and np.issubdtype(state.dtype, np.number):
        names = KNOWN_NAMES.get(base) or list(named or [f"state_{i}" for i in range(len(state))])
        return AttributeAccess(_checked(names, len(state), env_id))
    vector = np.asarray(obs) if not isinstance(obs, dict) else None
    if vector is None or vector.ndim != 1 or not np.issubdtype(vector.dtype, np.number):
        raise UserError(f"gym:{env_id} gives no state vector (no documented state attribute and its observations "
                        "are not a flat vector): probes need one")
    names = list(named or [f"obs_{i}" for i in range(len(vector))])
    return ObservationAccess(_checked(names, len(vector), env_id))


def _checked(names: list[str], n: int, env_id: str) -> list[str]:
    if len(names) != n:
        raise UserError(f"gym:{env_id} names {len(names)} state variables for a state of {n}")
    return [str(x) for x in names]
