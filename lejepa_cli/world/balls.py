"""`balls`: a few bouncing balls with hidden masses and elastic collisions; no actions.

Balls of equal size (so mass never shows in a frame) move in [0, 1]^2 without gravity or
friction, reflect elastically off the arena edges and collide elastically with each other
(impulse along the line of centres, weighted by the hidden masses), so total kinetic energy
and momentum (between wall bounces) are conserved. Each episode draws every ball's mass
uniformly from [mass_min, mass_max]. A passive video world: action_dim is 0. A goal is a set
of ball positions; it is reached when the mean distance of the balls to their goal positions
is below `success_radius` = 0.05 (defined for completeness; nothing can steer the balls).
"""

from __future__ import annotations


import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world import render
from lejepa_cli.world.sim import Option, World

COLOURS = {
    "background": (0.1, 0.1, 0.12),
    "ball0": (0.95, 0.3, 0.3), "ball1": (0.3, 0.85, 0.35), "ball2": (0.35, 0.55, 0.95), "ball3": (0.95, 0.85, 0.3),
    "ball4": (0.85, 0.4, 0.9), "ball5": (0.3, 0.9, 0.9), "ball6": (0.95, 0.6, 0.25), "ball7": (0.9, 0.9, 0.9),
}
MAX_BALLS = 8
SUBSTEPS = 4  # collision checks per step, so fast balls do not pass through each other


class Balls(World):
    name = "balls"
    description = "bouncing balls with hidden masses and elastic collisions; no actions"
    action_dim = 0
    surprise_object = ("ball0_x", "ball0_y")
    success_radius = 0.05
    options_spec = (
        Option("balls", 3, f"number of balls (1 to {MAX_BALLS})", 1, MAX_BALLS),
        Option("radius", 0.07, "ball radius", 0.02, 0.1),
        Option("speed", 0.03, "typical initial speed per step (arena side = 1)", 0.0, 0.1),
        Option("mass_min", 0.5, "lowest hidden ball mass", 0.05, 100.0),
        Option("mass_max", 3.0, "highest hidden ball mass", 0.05, 100.0),
    )

    @property
    def state_names(self) -> list[str]:
        n = self.options["balls"]
        per_ball = [f"ball{i}_{v}" for i in range(n) for v in ("x", "y", "vx", "vy")]
        return per_ball + [f"ball{i}_mass" for i in range(n)]

    def configure(self) -> None:
        if self.options["mass_min"] > self.options["mass_max"]:
            raise UserError(f"balls: mass_min ({self.options['mass_min']}) is above mass_max ({self.options['mass_max']})")

    def _split(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Positions (B, n, 2), velocities (B, n, 2), masses (B, n) views of a state."""
        n = self.options["balls"]
        per = state[:, : 4 * n].reshape(len(state), n, 4)
        return per[..., 0:2], per[..., 2:4], state[:, 4 * n :]

    def _join(self, pos: np.ndarray, vel: np.ndarray, mass: np.ndarray) -> np.ndarray:
        B = len(pos)
        return np.concatenate([np.concatenate([pos, vel], axis=2).reshape(B, -1), mass], axis=1)

    def _positions(self, rng: np.random.Generator, b: int) -> np.ndarray:
        """(b, n, 2) non-overlapping positions: distinct cells of a 3 x 3 grid, jittered."""
        n, r = self.options["balls"], self.options["radius"]
        cells = np.argsort(rng.random((b, 9)), axis=1)[:, :n]  # (b, n) distinct cells
        centre = np.stack([cells % 3, cells // 3], axis=-1) / 3 + 1 / 6
        slack = max(0.0, 1 / 6 - r - 0.005)
        return centre + rng.uniform(-slack, slack, (b, n, 2))

    def reset(self, rng: np.random.Generator, n: int) -> np.ndarray:
        o, k = self.options, self.options["balls"]
        angle = rng.uniform(0, 2 * np.pi, (n, k))
        speed = o["speed"] * rng.uniform(0.5, 1.5, (n, k))
        vel = np.stack([np.cos(angle), np.sin(angle)], axis=-1) * speed[..., None]
        mass = rng.uniform(o["mass_min"], o["mass_max"], (n, k))
        return self._join(self._positions(rng, n), vel, mass)

    def step(self, state: np.ndarray, action: np.ndarray | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        pos, vel, mass = (a.copy() for a in self._split(state))
        k, r = self.options["balls"], self.options["radius"]
        kick = self.kicks(rng, len(state), self.options["speed"])  # (B, 2), to one random ball
        if kick.any():
            who = rng.integers(0, k, len(state))
            vel[np.arange(len(state)), who] += kick
        for _ in range(SUBSTEPS):
            pos += vel / SUBSTEPS
            # Elastic walls: mirror the position back inside, flip the velocity.
            for lo_hit, edge in ((pos < r, r), (pos > 1 - r, 1 - r)):
                pos = np.where(lo_hit, 2 * edge - pos, pos)
                vel = np.where(lo_hit, -vel, vel)
            for i in range(k):
                for j in range(i + 1, k):
                    self._collide(pos, vel, mass, i, j)
        return self._join(pos, vel, mass)

    def _collide(self, pos: np.ndarray, vel: np.ndarray, mass: np.ndarray, i: int, j: int) -> None:
        """Elastic collision of balls i and j where they overlap and approach (in place)."""
        r = self.options["radius"]
        d = pos[:, j] - pos[:, i]  # (B, 2)
        dist = np.linalg.norm(d, axis=1)
        n = d / np.maximum(dist, 1e-12)[:, None]
        approach = np.sum((vel[:, i] - vel[:, j]) * n, axis=1)  # > 0: moving together
        hit = (dist < 2 * r) & (approach > 0)
        inv_i, inv_j = 1 / mass[:, i], 1 / mass[:, j]
        impulse = np.where(hit, 2 * approach / (inv_i + inv_j), 0.0)[:, None]  # (B, 1)
        vel[:, i] -= impulse * inv_i[:, None] * n
        vel[:, j] += impulse * inv_j[:, None] * n
        # Separate overlapping balls along the normal (positions only: energy is unchanged).
        overlap = np.where(dist < 2 * r, 2 * r - dist, 0.0)[:, None]
        share_i = (inv_i / (inv_i + inv_j))[:, None]
        pos[:, i] -= overlap * share_i * n
        pos[:, j] += overlap * (1 - share_i) * n
        np.clip(pos, r, 1 - r, out=pos)

    def render(self, state: np.ndarray) -> np.ndarray:
        colours = self.palette(COLOURS)
        canvas = render.blank(len(state), self.size, colours["background"])
        pos, _, _ = self._split(state)
        for i in range(self.options["balls"]):
            render.discs(canvas, pos[:, i], self.options["radius"], colours[f"ball{i}"])
        return render.finish(canvas)

    def sample_goal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        goal = self.reset(rng, n)
        _, vel, _ = self._split(goal)
        vel[:] = 0.0
        return goal

    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self._split(state)[0] - self._split(goal)[0], axis=2).mean(axis=1)

    def explore_init(self, rng: np.random.Generator, state: np.ndarray) -> dict:
        return {}

    def explore(self, state: np.ndarray, memory: dict, rng: np.random.Generator) -> np.ndarray:
        return np.zeros((len(state), 0))


