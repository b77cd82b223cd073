"""Edits of recorded episodes, for a run evaluated on stored trajectories (no simulator to re-render):
the surprise events and the camera conditions of `world surprise | stress`, applied to the frames.

    events = data_events(frames, actions, event_step, ("teleport", "colour", "frozen"), rng)
    # kind -> (frames, actions): frames (N, T, R, R, C) uint8 changed at step event_step[i] of episode i
    noisy = camera(frames, "pixel noise", 0.1, seed=0)   # a stress condition on every frame

Events, at one step k of each episode (a window frame the model sees):
- `teleport`: from step k on, the frames and actions of another episode at the same steps (the
  world jumps to where another episode is and goes on from there);
- `colour`: frame k alone with every pixel's hue rotated by 120 degrees;
- `frozen`: frame k repeats the window frame before it (k - frameskip): the scene stops for one frame.
Camera conditions (the simulator's observation knobs, on stored frames): `pixel noise` (Gaussian,
std in [0, 1] pixel units), `dropped frames` (a frame repeats the last recorded one with a
probability), `colour shift` (every pixel's hue rotated by degrees), `background shift` (pixels
of each episode's background colour, its first frame's most common one, darker for a light
background and lighter for a dark one).
"""

from __future__ import annotations

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world.render import rotate_hue
from lejepa_cli.world.sim import add_pixel_noise, drop_frames

DATA_EVENTS = ("teleport", "colour", "frozen")
HUE_EVENT = 120.0
BACKGROUND_TOLERANCE = 24  # a pixel within this many levels (every channel) of the background colour is background


def rotate_frame_hue(frames: np.ndarray, degrees: float) -> np.ndarray:
    """uint8 RGB frames (..., 3) with every pixel's hue rotated by `degrees` (brightness kept)."""
    return np.clip(rotate_hue(frames.astype(np.float32) / 255.0, degrees) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def partners(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) for each episode another one (never itself) to splice a teleport from."""
    if n < 2:
        raise UserError("a teleport splices in another episode: it needs at least 2 held-out episodes")
    return (np.arange(n) + rng.integers(1, n, n)) % n


def data_events(frames: np.ndarray, actions: np.ndarray, event_step: np.ndarray, kinds: tuple[str, ...],
                rng: np.random.Generator, frameskip: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (frames, actions) with that event at step event_step[i] of episode i; see the module docstring."""
    unknown = [k for k in kinds if k not in DATA_EVENTS]
    if unknown:
        raise UserError(f"event '{unknown[0]}' is not defined for stored trajectories (they have: {', '.join(DATA_EVENTS)})")
    n = len(frames)
    rows = np.arange(n)
    out = {}
    for kind in kinds:
        f, a = frames.copy(), actions
        if kind == "teleport":
            other = partners(n, rng)
            a = actions.copy()
            for i in rows:
                k = event_step[i]
                f[i, k:], a[i, k:] = frames[other[i], k:], actions[other[i], k:]
        elif kind == "colour":
            f[rows, event_step] = rotate_frame_hue(frames[rows, event_step], HUE_EVENT)
        else:  # frozen
            f[rows, event_step] = frames[rows, event_step - frameskip]
        out[kind] = (f, a)
    return out


def background_shift(frames: np.ndarray, amount: float) -> np.ndarray:
    """Pixels of each episode's background colour moved by `amount` (in [0, 1] units) away from the clip."""
    n, c = len(frames), frames.shape[-1]
    out = frames.copy()
    for i in range(n):
        colours, counts = np.unique(frames[i, 0].reshape(-1, c), axis=0, return_counts=True)
        background = colours[np.argmax(counts)].astype(np.int16)
        mask = (np.abs(frames[i].astype(np.int16) - background).max(-1) <= BACKGROUND_TOLERANCE)[..., None]
        step = -amount if background.mean() > 127 else amount
        shifted = np.clip(frames[i].astype(np.float32) + np.float32(step * 255.0) + 0.5, 0, 255).astype(np.uint8)
        out[i] = np.where(mask, shifted, frames[i])
    return out


def camera(frames: np.ndarray, condition: str, level: float, seed: int) -> np.ndarray:
    """Frames (N, T, R, R, C) as a camera under `condition` at `level` records them; the same seed, the same draws."""
    if condition == "colour shift":
        return rotate_frame_hue(frames, level)
    if condition == "background shift":
        return background_shift(frames, level)
    if condition not in ("pixel noise", "dropped frames"):
        raise UserError(f"stress condition '{condition}' changes the world, not the camera: it needs a simulator")
    rng = np.random.default_rng(seed)
    out = np.empty_like(frames)
    previous = None
    for t in range(frames.shape[1]):  # step by step, as the simulator's camera records them
        step = frames[:, t]
        if condition == "pixel noise":
            step = add_pixel_noise(step, level, rng)
        else:
            step = drop_frames(step, previous, level, rng)
        out[:, t] = previous = step
    return out
