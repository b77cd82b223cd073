"""Opening a Gymnasium environment for `gym:ENV_ID` worlds, with the one-line refusals.

Nothing here imports gymnasium at module level: `lejepa --help` and the built-in worlds never load
it. `open_env` imports it (and registers gym-pusht's environments when that package is installed),
then checks what a world needs:

    env, frames = open_env("Pendulum-v1", {"g": 9.81})   # frames: "render" or "observation"
    low, high = action_bounds(env, "Pendulum-v1")         # the Box bounds, finite
    env_action = to_env(action, low, high)                # [-1, 1] -> the env's units
    frame = square_resize(env.render(), 64)               # (64, 64, 3) uint8

Refusals (UserError, one line, exit 2): gymnasium not installed (names the `[gym]` extra), an
unknown id, an environment without rgb_array rendering and without image observations, a
discrete (non-Box) or unbounded action space.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

import numpy as np

from lejepa_cli.errors import UserError

EXTRA = "pip install 'lejepa-cli[gym]'"


def import_gymnasium():
    """The gymnasium module, or a UserError naming the extra that installs it."""
    import os

    # pygame (classic control, gym-pusht) draws off-screen: no window, no audio, no greeting on stdout.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import gymnasium
    except ImportError:
        raise UserError(f"gym: worlds need gymnasium, which is not installed: {EXTRA}") from None
    try:  # registers gym_pusht/PushT-v0 when gym-pusht is installed
        importlib.import_module("gym_pusht")
    except ImportError:
        pass
    return gymnasium


def parse_env_kwargs(items: list[str] | str | dict | None) -> dict[str, Any]:
    """`--env-kwargs` as one JSON object or key=value items (values read as JSON, else kept as text)."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    items = [items] if isinstance(items, str) else list(items)
    if len(items) == 1 and items[0].lstrip().startswith("{"):
        try:
            out = json.loads(items[0])
        except ValueError as e:
            raise UserError(f"--env-kwargs is not a JSON object ({e})") from None
        if not isinstance(out, dict):
            raise UserError("--env-kwargs must be a JSON object or key=value items")
        return out
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--env-kwargs takes a JSON object or key=value items, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def is_image_space(space) -> bool:
    shape = getattr(space, "shape", None) or ()
    return len(shape) == 3 and shape[-1] == 3 and np.dtype(getattr(space, "dtype", None) or np.float32) == np.uint8


def open_env(env_id: str, kwargs: dict[str, Any]):
    """(env, frame source) for `env_id`; frame source "render" (rgb_array) or "observation" (image observations)."""
    gym = import_gymnasium()
    if env_id not in gym.registry:
        near = [k for k in gym.registry if env_id.lower() in k.lower()][:3]
        hint = f" (did you mean {', '.join(near)}?)" if near else " (see gymnasium.pprint_registry())"
        raise UserError(f"unknown Gymnasium environment '{env_id}'{hint}")
    spec = gym.registry[env_id]
    entry = spec.entry_point
    modes = _render_modes(entry)
    render_mode = "rgb_array" if modes is None or "rgb_array" in modes else None
    try:
        env = gym.make(env_id, render_mode=render_mode, **kwargs) if render_mode else gym.make(env_id, **kwargs)
    except TypeError as e:
        raise UserError(f"gym:{env_id} does not take these --env-kwargs ({e})") from None
    except (gym.error.Error, ImportError, ModuleNotFoundError) as e:
        raise UserError(f"gym:{env_id} cannot be made here ({e.__class__.__name__}: {e})") from None
    if render_mode is None and not is_image_space(env.observation_space):
        env.close()
        raise UserError(f"gym:{env_id} has no rgb_array rendering and no image observations: nothing to learn from")
    return env, ("observation" if is_image_space(env.observation_space) else "render")


def _render_modes(entry) -> list[str] | None:
    """The render modes an entry point's class declares (None: unknown, e.g. a factory function)."""
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            return None  # gym.make reports it
    metadata = getattr(entry, "metadata", None)
    return list(metadata.get("render_modes", [])) if isinstance(metadata, dict) else None


def action_bounds(env, env_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) float64 of a bounded Box action space; UserError otherwise."""
    space = env.action_space
    if type(space).__name__ != "Box":
        raise UserError(f"gym:{env_id} has a {type(space).__name__} action space; world models here need "
                        "continuous (Box) actions")
    low, high = np.asarray(space.low, np.float64).ravel(), np.asarray(space.high, np.float64).ravel()
    if not (np.isfinite(low).all() and np.isfinite(high).all()) or np.any(high <= low):
        raise UserError(f"gym:{env_id} has an unbounded Box action space; actions are rescaled to [-1, 1] "
                        "between finite bounds")
    return low, high


def to_env(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Actions in [-1, 1] -> the env's units: low + (a + 1) / 2 * (high - low)."""
    return low + (np.clip(action, -1.0, 1.0) + 1.0) / 2.0 * (high - low)


def from_env(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """The env's units -> [-1, 1] (the inverse of to_env, clipped)."""
    return np.clip(2.0 * (np.asarray(action, np.float64) - low) / (high - low) - 1.0, -1.0, 1.0)


def square_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """An (H, W, 3) frame centre-cropped to a square and resized (Pillow, antialiased) to (size, size, 3) uint8."""
    from PIL import Image

    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        frame = np.clip(frame, 0, 255).astype(np.uint8)
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    frame = frame[top : top + side, left : left + side, :3]
    if side == size:
        return np.ascontiguousarray(frame)
    return np.asarray(Image.fromarray(frame).resize((size, size), Image.BILINEAR))


def load_policy(text: str):
    """`module:function` -> the function; called as function(observation, env, rng) -> action in the env's units."""
    import os
    import sys

    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise UserError(f"--policy takes module:function, got '{text}'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a policy file in the working folder
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise UserError(f"--policy {text}: cannot import {module} ({e})") from None
    except AttributeError:
        raise UserError(f"--policy {text}: {module} has no {attr}") from None
    if not callable(fn):
        raise UserError(f"--policy {text} is not callable")
    return fn
