"""Push-T (gym-pusht): an exploration policy that pushes the T, and how much it does.

Random actions rarely touch the T block, so a world model trained on them learns the agent only.
The default exploration of `gym:gym_pusht/PushT-v0` picks a random target point on the table per
episode segment, walks the agent round to the side of the block facing away from the target (a
point behind the block's centre, offset sideways by a random amount so pushes also turn it), then
pushes through it towards the target; a new target when the block gets there or at random. Actions
are gym-pusht's absolute agent targets, at most MAX_STEP px from the agent, plus smooth noise.

    stats = contact_stats(states)     # states (N, T, S) as stored: share of steps in contact, pose spread

The geometry: gym-pusht's T is two 120 x 30 and 30 x 90 boxes in the block's frame (origin at the
bar's lower edge), the agent a disc of radius 15, on a 512 x 512 table.
"""

from __future__ import annotations

import numpy as np

from lejepa_cli.world.gym_env import from_env
from lejepa_cli.world.sim import ou_step

PUSHT_POSITION = 20.0  # LeWM's Push-T success: block position within 20 (of 512) ...
PUSHT_ANGLE = np.pi / 9  # ... and angle within pi/9 of the goal pose
PUSHT_AGENT_RADIUS = 15.0  # gym-pusht's agent disc
BOXES = np.array([[-60.0, 0.0, 60.0, 30.0], [-15.0, 30.0, 15.0, 120.0]])  # x0, y0, x1, y1 in the block's frame
CENTRE = np.array([0.0, 45.0])  # the block's centre of gravity in its frame
TARGET_LOW, TARGET_HIGH = 120.0, 392.0  # where targets are drawn (the table is 512; walls at 5 and 506)
BEHIND = 80.0  # the push point lies this far behind the centre (the T reaches ~70 from it)
MAX_STEP = 40.0  # px between the agent and its commanded target per step
NOISE = 12.0  # px: smooth noise on the commanded target
RETARGET = 1 / 60  # chance per step of a new target


def _rotate(v: np.ndarray, angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]], -1)


def block_centre(state: np.ndarray) -> np.ndarray:
    """(..., 2) world position of the T's centre of gravity from stored states (..., S)."""
    return state[..., 2:4] + _rotate(np.broadcast_to(CENTRE, state[..., 2:4].shape), state[..., 4])


def agent_gap(state: np.ndarray) -> np.ndarray:
    """(...,) distance from the agent's edge to the T (<= 0: touching or overlapping)."""
    local = _rotate(state[..., 0:2] - state[..., 2:4], -state[..., 4])  # agent in the block's frame
    gaps = []
    for x0, y0, x1, y1 in BOXES:
        dx = np.maximum(np.maximum(x0 - local[..., 0], local[..., 0] - x1), 0.0)
        dy = np.maximum(np.maximum(y0 - local[..., 1], local[..., 1] - y1), 0.0)
        gaps.append(np.hypot(dx, dy))
    return np.minimum(*gaps) - PUSHT_AGENT_RADIUS


def explore_init(rng: np.random.Generator, state: np.ndarray) -> dict:
    n = len(state)
    return {"ou": np.zeros((n, 2)), "target": rng.uniform(TARGET_LOW, TARGET_HIGH, (n, 2)),
            "offset": rng.uniform(-30.0, 30.0, n)}


def explore(state: np.ndarray, memory: dict, rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """(B, 2) actions in [-1, 1]: agent targets that walk round behind the block and push it to the target."""
    n = len(state)
    agent, centre = state[:, 0:2], block_centre(state)
    arrived = np.linalg.norm(memory["target"] - centre, axis=1) < 30.0
    renew = arrived | (rng.random(n) < RETARGET)
    memory["target"] = np.where(renew[:, None], rng.uniform(TARGET_LOW, TARGET_HIGH, (n, 2)), memory["target"])
    memory["offset"] = np.where(renew, rng.uniform(-30.0, 30.0, n), memory["offset"])
    d = _unit(memory["target"] - centre)
    side_axis = np.stack([-d[:, 1], d[:, 0]], 1)
    behind = centre - d * BEHIND + side_axis * memory["offset"][:, None]
    rel = agent - centre
    along, across = np.sum(rel * d, 1), np.sum(rel * side_axis, 1)
    # Behind the block and in line with the push point: push through towards the target.
    aligned = (along < -20.0) & (np.abs(across - memory["offset"]) < 30.0)
    # On the target's side of the block: go round it, by the side the agent is on, before getting behind.
    side = np.where(across >= 0, 1.0, -1.0)[:, None]
    detour = centre + side * side_axis * 100.0 - d * 60.0  # beside the block, already behind its centre
    wrong_side = (along > -40.0)[:, None]
    aim = np.where(aligned[:, None], agent + d * MAX_STEP, np.where(wrong_side, detour, behind))
    move = aim - agent
    move *= np.minimum(1.0, MAX_STEP / np.maximum(np.linalg.norm(move, axis=1, keepdims=True), 1e-9))
    command = agent + move + NOISE * ou_step(memory["ou"], rng)
    return from_env(np.clip(command, low, high), low, high)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def contact_stats(states: np.ndarray, grid: int = 8) -> dict:
    """How much a set of Push-T episodes (N, T, S) pushes the block: contact share and the block pose's spread.

    Keys: contact_share (steps with the agent touching the T), moved_share (steps where the block
    moves more than 1 px), block_xy_std (px), block_angle_std (circular std, radians),
    cells_visited (share of a grid x grid partition of the table the block's centre enters),
    mean_block_travel (px the block's centre moves per episode, start to end).
    """
    states = np.asarray(states, np.float64)
    centre = block_centre(states)  # (N, T, 2)
    step = np.linalg.norm(np.diff(centre, axis=1), axis=-1)
    angle = states[..., 4].ravel()
    resultant = np.hypot(np.cos(angle).mean(), np.sin(angle).mean())
    cells = np.clip((centre.reshape(-1, 2) / 512.0 * grid).astype(int), 0, grid - 1)
    return {
        "contact_share": float((agent_gap(states) <= 1.0).mean()),
        "moved_share": float((step > 1.0).mean()),
        "block_xy_std": float(centre.reshape(-1, 2).std(0).mean()),
        "block_angle_std": float(np.sqrt(max(0.0, -2.0 * np.log(max(resultant, 1e-12))))),
        "cells_visited": float(len({tuple(c) for c in cells}) / grid**2),
        "mean_block_travel": float(np.linalg.norm(centre[:, -1] - centre[:, 0], axis=-1).mean()),
    }


def t_polygon(state: np.ndarray):
    """The T of one stored state (S,) as a shapely polygon on the table."""
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    parts = []
    for x0, y0, x1, y1 in BOXES:
        corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        parts.append(Polygon(state[2:4] + _rotate(corners, np.full(4, state[4]))))
    return unary_union(parts)


def coverage(state: np.ndarray, goal: np.ndarray) -> np.ndarray:
    """(B,) gym-pusht's coverage score: area of the block's T inside the goal pose's T over the goal T's area."""
    out = np.empty(len(state))
    for i in range(len(state)):
        g = t_polygon(goal[i])
        out[i] = t_polygon(state[i]).intersection(g).area / g.area
    return out
