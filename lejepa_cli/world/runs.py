"""What `lejepa world plan | probe | surprise | stress` share: a world model with the world it was trained on.

    used = open_world_run("runs/world-tworoom")     # run folder, checkpoint or export
    used.model        # WorldModelExport (encode / rollout), eval mode
    used.world        # the simulator rebuilt from the training data's metadata (None: no simulator)
    used.note         # how the world was found, e.g. "default options (the training data is not reachable)"
    source = used.episode_source(data=None)   # where probe / surprise / stress episodes come from:
                      # the simulator, else the stored trajectories the run trained on (world/episodes.py)
    used.plan         # the run's `plan:` section (PlanConfig; the library's defaults for a run older than it)

Also the helpers that turn a simulated episode into window frames and action blocks, and the
one-step surprise ||p_t - z_{t+1}||^2 of the model along such episodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lejepa_cli import dist
from lejepa_cli.config import PlanConfig
from lejepa_cli.errors import UserError
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.world.catalog import make_world, parse_sets, world_class
from lejepa_cli.world.plan_settings import saved_settings
from lejepa_cli.world.sim import World


@dataclass
class LoadedWorld:
    model: WorldModelExport
    world: World | None
    note: str
    source: Path
    plan: PlanConfig = field(default_factory=PlanConfig)

    def require_world(self, what: str) -> World:
        if self.world is None:
            raise UserError(f"{self.source} was trained on data without a simulator ({self.note}); `lejepa world {what}` "
                            f"needs a world to act in: add --world NAME (two-room, push, balls) or gym:ENV_ID when the data was "
                            f"recorded in a built-in world")
        return self.world

    def episode_source(self, data: Path | None = None, seed: int = 0):
        """Where evaluation episodes come from (world/episodes.py): the simulator, unless the run has
        none or `data` (a trajectory file or folder) is given; then the stored trajectories, by
        default the ones the run was trained on, their held-out episodes to test on."""
        from lejepa_cli.world.episodes import SimulatedEpisodes, stored_episodes

        if data is None and self.world is not None:
            return SimulatedEpisodes(self.world)
        cfg = ((self.model.model.backbone.lejepa_info.get("config") or {}).get("data") or {})
        trained_on = Path(str(cfg.get("source") or "")).expanduser()
        if data is None and not cfg.get("source"):
            raise UserError(f"{self.source} does not record its training data; give the trajectories with --data FILE")
        if data is None and not trained_on.exists():
            raise UserError(f"{self.source} was trained on {cfg['source']}, which is not here; give the trajectories "
                            f"with --data FILE")
        path = trained_on if data is None else Path(data).expanduser()
        if not path.exists():
            raise UserError(f"--data {data} does not exist (give a trajectory file or folder)")
        same = data is None or path.resolve() == trained_on.resolve()
        split = {"val_fraction": float(cfg.get("val_fraction") or 0.0), "train_split": cfg.get("train_split") or "train",
                 "eval_split": cfg.get("eval_split") or "val"} if same else {}
        source = stored_episodes(path, seed=seed, **split)
        _check_fits_model(self.model, source, path)
        return source


def _check_fits_model(model: WorldModelExport, source, path: Path) -> None:
    """Stored frames and actions of the width the model was trained on, or a one-line UserError."""
    ds = source.pools["test"][0][0]
    channels = int(model.model.backbone.lejepa_info.get("channels") or ds.channels)
    if ds.channels != channels or ds.action_dim != int(model.spec["action_dim"]):
        raise UserError(f"{path} holds {ds.channels}-channel frames and {ds.action_dim}-D actions; the model was trained "
                        f"on {channels}-channel frames and {model.spec['action_dim']}-D actions")


def _training_index(info: dict[str, Any]) -> dict[str, Any] | None:
    """The training data's index.json, when the run's config names a folder that still exists."""
    source = ((info.get("config") or {}).get("data") or {}).get("source")
    if not source:
        return None
    index = Path(str(source)).expanduser() / "index.json"
    try:
        return json.loads(index.read_text()) if index.is_file() else None
    except (OSError, ValueError):
        return None


def open_world_run(path: str | Path, *, world_sets: list[str] | None = None, world: str | None = None,
                   device: str = "cpu") -> LoadedWorld:
    """The world model at `path` and its simulator (from the training data's world name and options,
    or the built-in world named by `world`: for a run trained on a file recorded in it).

    `device` as `dist.select_device` reads it (its errors name --device); the CPU by default. The
    simulators, probes and planners around the model move its latents to the CPU to read them as numpy.
    """
    from lejepa_cli.world.export import load_world_model

    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist (give a world run folder, checkpoint or export)")
    if path.is_dir() and (path / "config.json").is_file() and not (path / "world.safetensors").is_file():
        raise UserError(f"{path} is an image-encoder export, not a world model (no world.safetensors); "
                        "give a world run folder or the export of one")
    model = load_world_model(path, dist.select_device(device))
    info = model.model.backbone.lejepa_info
    settings = saved_settings(info.get("config"))  # the config a checkpoint or an export carries
    name = world or model.spec.get("world")
    if not name:
        if world_sets:
            raise UserError(f"--set changes a built-in world's options, and {path} was trained on data without a "
                            f"simulator; name the world with --world NAME")
        return LoadedWorld(model, None, "its data names no built-in world", path, settings)
    cls = world_class(name)  # UserError for an unknown world
    index = _training_index(info)
    data = info.get("data") or {}
    if world and world != model.spec.get("world"):
        options, size = {}, int(data.get("resolution") or 64)
        note = f"{name} (--world) with default options"
    elif index is not None and index.get("world") == name:
        options, size = dict(index.get("world_options") or {}), int(index.get("resolution", 64))
        note = f"{name} with the training data's options"
    else:
        options, size = {}, int(data.get("resolution") or 64)
        note = f"{name} with default options (the training data's index.json is not reachable)"
    options.update(parse_sets(cls, world_sets))  # --set at evaluation wins over the training data's options
    sim = make_world(name, size=size, **options)
    if sim.action_dim != int(model.spec["action_dim"]):  # the instance: a gym: world's actions are its environment's
        raise UserError(f"world {name} has {sim.action_dim}-D actions; {path} was trained on {model.spec['action_dim']}-D ones")
    if world_sets:
        note += f", with {', '.join(world_sets)}"
    return LoadedWorld(model, sim, note, path, settings)


def window_count(steps: int, frameskip: int) -> int:
    """Window frames of an episode of `steps` steps: every frameskip-th frame, the first included."""
    return -(-steps // frameskip)


def require_window_frames(model: WorldModelExport, steps: int, needed: int, shortfall: str) -> None:
    """A UserError unless episodes of `steps` steps give `needed` window frames; `shortfall` says who needs them."""
    length = window_count(steps, model.frameskip)
    if length < needed:
        raise UserError(f"episodes of {steps} steps give {length} window frames; {shortfall}")


def blocks(actions: np.ndarray, frameskip: int) -> np.ndarray:
    """Per-step actions (N, T, A) -> action blocks (N, T // fs, fs * A): block k leads window frame k to k + 1."""
    n, t, a = actions.shape
    k = t // frameskip
    return np.ascontiguousarray(actions[:, : k * frameskip].reshape(n, k, frameskip * a))


def window_frames(frames: np.ndarray, frameskip: int) -> np.ndarray:
    """Frames (N, T, ...) -> every frameskip-th frame (N, ceil(T / fs), ...): what the model sees."""
    return frames[:, ::frameskip]


@torch.no_grad()
def encode_episodes(model: WorldModelExport, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
    """uint8 frames (N, T, R, R, 3) -> latents (N, T, D) on the CPU, encoded a few hundred frames at a time."""
    n, t = frames.shape[:2]
    flat = frames.reshape(n * t, *frames.shape[2:])
    out = [model.encode(flat[i : i + batch]).cpu() for i in range(0, len(flat), batch)]  # each (b, D), read on the CPU
    return torch.cat(out).view(n, t, -1)


@torch.no_grad()
def one_step_surprise(model: WorldModelExport, z: torch.Tensor, action_blocks: np.ndarray) -> torch.Tensor:
    """||p_t - z_{t+1}||^2 for every window frame t + 1 >= 1: latents (N, L, D), blocks (N, >= L - 1, A') -> (N, L - 1).

    Frame t + 1 is predicted from the (up to) H latents ending at t and their blocks, as in training
    (the causal predictor's prefix positions are trained too, so the first frames get a shorter context).
    """
    n, length, d = z.shape
    h = model.history
    out = torch.zeros(n, length - 1)
    for t in range(length - 1):
        lo = max(0, t + 1 - h)
        ctx, acts = z[:, lo : t + 1], action_blocks[:, lo : t + 1]  # (N, <=H, D), (N, <=H, A')
        pred = model.rollout(ctx, acts, np.zeros((n, 0, acts.shape[-1]), np.float32))[:, 0]  # (N, D)
        out[:, t] = ((pred.cpu() - z[:, t + 1].cpu()) ** 2).sum(-1)
    return out
