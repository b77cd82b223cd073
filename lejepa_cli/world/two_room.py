"""`two-room`: a point agent in a square arena split by a wall with one door.

The arena is [0, 1]^2. A vertical wall at x = 0.5 (thickness `wall`) has one opening centred
at y = `door_y` of height `door`. The action is a 2-D velocity in [-1, 1]^2; the agent moves
`speed * action` per step (plus random pushes when kick_prob > 0) and slides along walls. The
agent is drawn as a disc of radius `radius` and collides as one, so its centre never enters
the wall except inside the door opening. Goals are positions anywhere in either room; a goal
is reached when the agent's centre is within `success_radius` = 0.05 of it.
"""

from __future__ import annotations

import math

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world import render
from lejepa_cli.world.sim import Option, World, ou_step

COLOURS = {"background": (0.93, 0.92, 0.88), "wall": (0.25, 0.25, 0.3), "agent": (0.85, 0.2, 0.15)}
SWITCH_ROOM = 0.7  # chance that the exploration's next waypoint lies in the other room


class TwoRoom(World):
    name = "two-room"
    description = "point agent, two rooms joined by a door; 2-D velocity actions"
    action_dim = 2
    surprise_object = ("agent_x", "agent_y")
    success_radius = 0.05
    options_spec = (
        Option("speed", 0.04, "distance moved per step at full action (arena side = 1)", 0.001, 0.2),
        # 0.06: a disc of ~4 px at a 32 px encoder input; at 0.03 (2 px) a ViT-Nano/8's latent held the
        # agent's height at linear R^2 0.11 and planning failed (docs/world-use.md).
        Option("radius", 0.06, "agent radius (drawn and for collisions)", 0.005, 0.1),
        Option("door", 0.2, "height of the door opening", 0.05, 0.9),
        Option("door_y", 0.5, "centre of the door opening", 0.1, 0.9),
        Option("wall", 0.04, "wall thickness", 0.01, 0.2),
    )

    @property
    def state_names(self) -> list[str]:
        return ["agent_x", "agent_y", "agent_vx", "agent_vy"]

    def configure(self) -> None:
        o = self.options
        if o["door"] <= 2 * o["radius"]:
            raise UserError(f"two-room: door ({o['door']}) must be wider than the agent (2 x radius = {2 * o['radius']})")
        if abs(o["door_y"] - 0.5) + o["door"] / 2 > 0.5:
            raise UserError("two-room: the door must lie inside the arena (door_y +- door/2 within [0, 1])")
        self._slab = (0.5 - o["wall"] / 2 - o["radius"], 0.5 + o["wall"] / 2 + o["radius"])  # centre may not enter...
        self._door = (o["door_y"] - o["door"] / 2 + o["radius"], o["door_y"] + o["door"] / 2 - o["radius"])  # ...except here
        self._background = self._draw_background()

    # -- geometry ---------------------------------------------------------------------------

    def free_positions(self, rng: np.random.Generator, n: int, left: np.ndarray | None = None) -> np.ndarray:
        """(n, 2) uniform positions in the left (True) or right room, by default either."""
        r = self.options["radius"]
        lo, hi = self._slab
        left = rng.random(n) < 0.5 if left is None else left
        x = np.where(left, rng.uniform(r, lo, n), rng.uniform(hi, 1 - r, n))
        return np.stack([x, rng.uniform(r, 1 - r, n)], axis=1)

    def _move_once(self, pos: np.ndarray, move: np.ndarray) -> np.ndarray:
        """One collision-checked move (|move| < half the wall slab, so nothing is jumped over)."""
        r = self.options["radius"]
        lo, hi = self._slab
        dlo, dhi = self._door
        new = np.clip(pos + move, r, 1 - r)
        ox, oy, nx, ny = pos[:, 0], pos[:, 1], new[:, 0], new[:, 1]
        in_old = (ox > lo) & (ox < hi)
        in_new = (nx > lo) & (nx < hi)
        face = np.where(ox <= lo, lo, hi)
        dx = nx - ox
        frac = np.divide(face - ox, dx, out=np.zeros_like(dx), where=dx != 0)
        y_cross = oy + frac * (ny - oy)
        entering = in_new & ~in_old
        blocked = entering & ((y_cross < dlo) | (y_cross > dhi))
        # Blocked at the wall face: stop there, keep sliding along the wall.
        nx = np.where(blocked, np.where(ox <= lo, lo, hi), nx)
        inside = in_new & ~blocked  # in the door passage: stay within the opening
        ny = np.where(inside, np.clip(ny, dlo, dhi), ny)
        return np.stack([nx, ny], axis=1)

    def _move(self, pos: np.ndarray, move: np.ndarray) -> np.ndarray:
        limit = 0.45 * (self._slab[1] - self._slab[0])
        n = max(1, math.ceil(float(np.abs(move).max(initial=0.0)) / limit))
        for _ in range(n):
            pos = self._move_once(pos, move / n)
        return pos

    # -- World ------------------------------------------------------------------------------

    def reset(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.concatenate([self.free_positions(rng, n), np.zeros((n, 2))], axis=1)

    def step(self, state: np.ndarray, action: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        speed = self.options["speed"]
        move = speed * np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0) + self.kicks(rng, len(state), speed)
        pos = self._move(state[:, 0:2], move)
        return np.concatenate([pos, pos - state[:, 0:2]], axis=1)

    def _draw_background(self) -> np.ndarray:
        o, colours = self.options, self.palette(COLOURS)
        image = np.empty((self.size, self.size, 3))
        image[:] = colours["background"]
        x0, x1 = 0.5 - o["wall"] / 2, 0.5 + o["wall"] / 2
        render.static_rect(image, x0, 0.0, x1, o["door_y"] - o["door"] / 2, colours["wall"])
        render.static_rect(image, x0, o["door_y"] + o["door"] / 2, x1, 1.0, colours["wall"])
        return image

    def render(self, state: np.ndarray) -> np.ndarray:
        canvas = render.blank(len(state), self.size, self._background)
        render.discs(canvas, state[:, 0:2], self.options["radius"], self.palette(COLOURS)["agent"])
        return render.finish(canvas)

    def sample_goal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.reset(rng, n)

    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return np.linalg.norm(state[:, 0:2] - goal[:, 0:2], axis=1)

    # -- exploration: OU noise plus a pull towards random waypoints, via the door when the
    # waypoint is in the other room, so episodes visit both rooms.

    def explore_init(self, rng: np.random.Generator, state: np.ndarray) -> dict:
        return {"ou": np.zeros((len(state), 2)), "waypoint": self.free_positions(rng, len(state))}

    def explore(self, state: np.ndarray, memory: dict, rng: np.random.Generator) -> np.ndarray:
        pos, waypoint = state[:, 0:2], memory["waypoint"]
        lo, hi = self._slab
        other_side = (pos[:, 0] < 0.5) != (waypoint[:, 0] < 0.5)
        in_passage = (pos[:, 0] > lo - 0.01) & (pos[:, 0] < hi + 0.01)
        door = np.array([0.5, self.options["door_y"]])
        aim = np.where((other_side & ~in_passage)[:, None], door, waypoint)
        offset = aim - pos
        dist = np.linalg.norm(offset, axis=1, keepdims=True)
        steer = offset / np.maximum(dist, 1e-9) * np.minimum(1.0, dist / self.options["speed"])
        action = np.clip(0.8 * steer + ou_step(memory["ou"], rng), -1.0, 1.0)
        renew = (np.linalg.norm(waypoint - pos, axis=1) < 0.05) | (rng.random(len(pos)) < 1 / 40)
        left_now = pos[:, 0] < 0.5
        switch = rng.random(len(pos)) < SWITCH_ROOM  # new waypoints mostly in the other room
        fresh = self.free_positions(rng, len(pos), left=np.where(switch, ~left_now, left_now))
        memory["waypoint"] = np.where(renew[:, None], fresh, waypoint)
        return action
