"""`push`: an agent disc pushes a square block whose mass and friction are hidden.

The agent is velocity-controlled (its velocity is `speed * action` each step) with mass 1.
Its drive is momentum-limited: while it pushes the block (axis-aligned square, no rotation),
agent and block move together along the agent's drive at `speed * action / (1 + mass)` (a
sticky contact: the block goes where the agent pushes it, at a speed its mass sets). A block
left free slides on, loses `friction * FRICTION_SCALE` of speed per step (Coulomb friction)
and bounces softly off the arena's edges. Each episode draws block_mass and block_friction
uniformly from the option ranges; they stay constant within the episode and never change how a
single frame looks, so only the history of motion reveals them: the mass in how fast a push
moves the block, the friction in how soon a free block stops. A goal is a block position; it
is reached when the block's centre is within `success_radius` = 0.06 of it.
"""

from __future__ import annotations

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world import render
from lejepa_cli.world.sim import Option, World, ou_step

COLOURS = {"background": (0.9, 0.9, 0.92), "agent": (0.15, 0.35, 0.85), "block": (0.9, 0.55, 0.1)}
FRICTION_SCALE = 0.002  # speed lost per step per unit of friction (arena units per step)
AGENT_MASS = 1.0
WALL_RESTITUTION = 0.5
START_REACH = 0.2  # the agent starts at most this far from the block's centre
START_MARGIN = 0.1  # the block starts (and exploration keeps it) this far from the walls
PUSH_CONE = np.deg2rad(60.0)  # exploration pushes within this angle of the contact normal, so it keeps the block
TURN_PER_DISTANCE = 0.5  # exploration's push direction wanders by this many radians per sqrt(arena unit) moved


class Push(World):
    name = "push"
    description = "agent disc pushes a block with hidden mass and friction; 2-D velocity actions"
    action_dim = 2
    surprise_object = ("block_x", "block_y")
    success_radius = 0.06
    options_spec = (
        Option("speed", 0.03, "agent speed per step at full action (arena side = 1)", 0.001, 0.1),
        Option("radius", 0.05, "agent radius", 0.01, 0.15),
        Option("block", 0.12, "block side length", 0.02, 0.4),
        Option("mass_min", 0.25, "lowest hidden block mass (agent mass = 1; a push moves the block at 1 / (1 + mass))", 0.05, 100.0),
        Option("mass_max", 4.0, "highest hidden block mass", 0.05, 100.0),
        Option("friction_min", 0.5, "lowest hidden block friction", 0.0, 50.0),
        Option("friction_max", 4.0, "highest hidden block friction", 0.0, 50.0),
    )

    @property
    def state_names(self) -> list[str]:
        return ["agent_x", "agent_y", "agent_vx", "agent_vy", "block_x", "block_y", "block_vx", "block_vy", "block_mass", "block_friction"]

    def configure(self) -> None:
        o = self.options
        for key in ("mass", "friction"):
            if o[f"{key}_min"] > o[f"{key}_max"]:
                raise UserError(f"push: {key}_min ({o[f'{key}_min']}) is above {key}_max ({o[f'{key}_max']})")

    def _half(self) -> float:
        return self.options["block"] / 2

    def reset(self, rng: np.random.Generator, n: int) -> np.ndarray:
        o, h, r = self.options, self._half(), self.options["radius"]
        block = rng.uniform(h + START_MARGIN, 1 - h - START_MARGIN, (n, 2))
        # Agent near the block, not touching it: a random direction at a short clear distance.
        angle = rng.uniform(0, 2 * np.pi, n)
        reach = rng.uniform(h * 1.5 + r + 0.02, START_REACH, n)
        agent = np.clip(block + reach[:, None] * _direction(angle), r, 1 - r)
        mass = rng.uniform(o["mass_min"], o["mass_max"], n)
        friction = rng.uniform(o["friction_min"], o["friction_max"], n)
        state = np.concatenate([agent, np.zeros((n, 2)), block, np.zeros((n, 2)), mass[:, None], friction[:, None]], axis=1)
        return self._separate(state)

    def _contact(self, agent: np.ndarray, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Penetration depth (B,) and unit normal from agent to block (B, 2) of disc vs square."""
        h, r = self._half(), self.options["radius"]
        closest = np.clip(agent, block - h, block + h)
        d = closest - agent
        dist = np.linalg.norm(d, axis=1)
        outside = dist > 1e-12
        normal = np.divide(d, dist[:, None], out=np.zeros_like(d), where=outside[:, None])
        depth = r - dist
        # Agent centre inside the square: push out along the axis of least penetration.
        rel = block - agent
        pen = h - np.abs(rel)  # (B, 2)
        axis = np.argmin(pen, axis=1)
        inner_normal = np.zeros_like(rel)
        inner_normal[np.arange(len(rel)), axis] = np.where(rel[np.arange(len(rel)), axis] >= 0, 1.0, -1.0)
        normal = np.where(outside[:, None], normal, inner_normal)
        depth = np.where(outside, depth, r + pen[np.arange(len(rel)), axis])
        return depth, normal

    def _separate(self, state: np.ndarray) -> np.ndarray:
        """Resolve overlap, mass-weighted (the block against an arena edge cannot give way)."""
        s = state.copy()
        h, r = self._half(), self.options["radius"]
        for _ in range(3):
            depth, normal = self._contact(s[:, 0:2], s[:, 4:6])
            hit = (depth > 0)[:, None]
            inv_a, inv_b = 1.0 / AGENT_MASS, 1.0 / s[:, 8:9]
            share_b = inv_b / (inv_a + inv_b)
            s[:, 4:6] = np.where(hit, np.clip(s[:, 4:6] + share_b * depth[:, None] * normal, h, 1 - h), s[:, 4:6])
            depth, normal = self._contact(s[:, 0:2], s[:, 4:6])
            s[:, 0:2] = np.where((depth > 0)[:, None], np.clip(s[:, 0:2] - depth[:, None] * normal, r, 1 - r), s[:, 0:2])
        return s

    def step(self, state: np.ndarray, action: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        o, h, r = self.options, self._half(), self.options["radius"]
        s = state.copy()
        v_agent = o["speed"] * np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        v_block = s[:, 6:8] + self.kicks(rng, len(s), o["speed"])
        mass = s[:, 8:9]
        # A push: the agent is about to touch the block and drives into it faster than it moves away.
        depth, normal = self._contact(s[:, 0:2] + v_agent, s[:, 4:6] + v_block)
        closing = np.sum((v_agent - v_block) * normal, axis=1, keepdims=True)
        pushing = (depth[:, None] > 0) & (closing > 0)
        # Momentum-limited drive, sticky contact: the pair moves along the drive, its speed shared by 1 + mass.
        shared = v_agent * AGENT_MASS / (AGENT_MASS + mass)
        v_agent = np.where(pushing, shared, v_agent)
        v_block = np.where(pushing, shared, v_block)
        # Coulomb friction slows a free block (a pushed one moves at the drive's speed).
        speed = np.linalg.norm(v_block, axis=1, keepdims=True)
        slow = np.where(pushing, speed, np.maximum(speed - s[:, 9:10] * FRICTION_SCALE, 0.0))
        v_block = v_block * np.divide(slow, speed, out=np.zeros_like(speed), where=speed > 0)
        agent = np.clip(s[:, 0:2] + v_agent, r, 1 - r)
        block = s[:, 4:6] + v_block
        # Soft bounce off the arena edges.
        low, high = block < h, block > 1 - h
        v_block = np.where(low | high, -WALL_RESTITUTION * v_block, v_block)
        block = np.clip(block, h, 1 - h)
        s[:, 0:2], s[:, 4:6], s[:, 6:8] = agent, block, v_block
        s = self._separate(s)
        s[:, 2:4] = s[:, 0:2] - state[:, 0:2]  # the agent's realised velocity
        return s

    def render(self, state: np.ndarray) -> np.ndarray:
        colours = self.palette(COLOURS)
        canvas = render.blank(len(state), self.size, colours["background"])
        render.squares(canvas, state[:, 4:6], self._half(), colours["block"])
        render.discs(canvas, state[:, 0:2], self.options["radius"], colours["agent"])
        return render.finish(canvas)

    def sample_goal(self, rng: np.random.Generator, n: int) -> np.ndarray:
        goal = self.reset(rng, n)
        h = self._half()
        goal[:, 4:6] = rng.uniform(h + 0.05, 1 - h - 0.05, (n, 2))
        return self._separate(goal)

    def goal_distance(self, state: np.ndarray, goal: np.ndarray) -> np.ndarray:
        return np.linalg.norm(state[:, 4:6] - goal[:, 4:6], axis=1)

    # -- exploration: keep pushing the block (a hidden mass shows only while the block is pushed),
    # in a direction that wanders and reflects off the edges of the region the block starts in,
    # and stays within PUSH_CONE of the contact normal, so the agent keeps its hold; walk round to
    # the block where it has none. The direction wanders per distance the block moves, not per
    # step, so every mass traces the same random path, only at its own speed: where the block is
    # (one frame) says nothing about its mass, how fast it gets there (a history) does.

    def explore_init(self, rng: np.random.Generator, state: np.ndarray) -> dict:
        return {"ou": np.zeros((len(state), 2)), "heading": rng.uniform(0, 2 * np.pi, len(state)),
                "block": state[:, 4:6].copy()}

    def explore(self, state: np.ndarray, memory: dict, rng: np.random.Generator) -> np.ndarray:
        h, r = self._half(), self.options["radius"]
        agent, block = state[:, 0:2], state[:, 4:6]
        moved = np.linalg.norm(block - memory["block"], axis=1)
        memory["block"] = block.copy()
        heading = memory["heading"] + TURN_PER_DISTANCE * np.sqrt(moved) * rng.standard_normal(len(state))
        # Reflect off the start region's edges (the region reset draws the block from).
        low, high = h + START_MARGIN, 1 - h - START_MARGIN

        def leaving(d: np.ndarray) -> np.ndarray:  # (B, 2): which components of d lead out of the region
            return ((block < low) & (d < 0)) | ((block > high) & (d > 0))

        d = _direction(heading)
        d = np.where(leaving(d), -d, d)
        heading = np.arctan2(d[:, 1], d[:, 0])
        # Holding the block: push at most PUSH_CONE off the contact normal, on the cone's edge nearest
        # the wanted direction that does not lead out of the region (else let go and walk round).
        depth, normal = self._contact(agent, block)
        touching = depth > -0.01
        normal_angle = np.arctan2(normal[:, 1], normal[:, 0])
        off = (heading - normal_angle + np.pi) % (2 * np.pi) - np.pi
        near_edge = normal_angle + np.clip(off, -PUSH_CONE, PUSH_CONE)
        far_edge = normal_angle - np.sign(off) * PUSH_CONE
        ok_near, ok_far = (~leaving(_direction(a)).any(1) for a in (near_edge, far_edge))
        held = np.where(ok_near, near_edge, np.where(ok_far, far_edge, heading))
        heading = np.where(touching, held, heading)
        memory["heading"] = heading
        d = _direction(heading)
        # No hold: go behind the block (by a point beside it if the agent is on the wrong side).
        clear = h * 1.5 + r
        side_axis = np.stack([-d[:, 1], d[:, 0]], 1)
        side = np.where(np.sum((agent - block) * side_axis, 1) >= 0, 1.0, -1.0)[:, None]
        wrong_side = np.sum((agent - block) * d, 1) > -0.5 * clear
        waypoint = np.where(wrong_side[:, None], block + side * side_axis * 1.2 * clear - d * 0.6 * clear, block - d * (h + r))
        pushing = touching & (np.sum(d * normal, 1) > 0)
        action = np.where(pushing[:, None], d, _unit(waypoint - agent))
        return np.clip(action + 0.15 * ou_step(memory["ou"], rng), -1.0, 1.0)


def _direction(angle: np.ndarray) -> np.ndarray:
    """(B,) angles -> (B, 2) unit vectors."""
    return np.stack([np.cos(angle), np.sin(angle)], 1)


def _unit(v: np.ndarray) -> np.ndarray:
    """Rows of v scaled to length 1 (zero rows stay zero)."""
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
