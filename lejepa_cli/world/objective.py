"""World-model training, the objective `lejepa train` runs for a world preset (objective: world).

`build_world_run(cfg, device)` loads the trajectory splits, builds the world model (any backbone
of the registry + projector, action encoder, predictor) and its optimizer; the shared loop in
train.py then calls `run.step(...)` per optimizer step and `run.evaluate()` at evaluations, as
it does for image pretraining. A training sample is a window of history + num_preds frames taken
every `frameskip` steps with the actions inside each skip concatenated; windows never cross an
episode end, and the loop's step sampler draws them, so a resumed run continues mid-epoch.

Evaluation (held-out split): the one-step and `world.eval_horizon`-step open-loop rollout errors
(mean squared error per latent dimension), each next to the error of the "nothing changes" guess
(z_{t+k} = z_t) and as a ratio to it, plus SIGReg of the held-out latents.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lejepa_cli import dist
from lejepa_cli.config import Config
from lejepa_cli.errors import UserError
from lejepa_cli.data.loader import eval_transform
from lejepa_cli.logs import console
from lejepa_cli.models import build_backbone_from_config
from lejepa_cli.sigreg import sigreg
from lejepa_cli.optim import adamw, autocast_dtype, param_groups
from lejepa_cli.world.camera import camera_copy
from lejepa_cli.world.export import model_spec
from lejepa_cli.world.loss import rollout_errors, world_loss
from lejepa_cli.world.model import WorldModel
from lejepa_cli.world.trajectories import TrajectoryDataset, load_trajectories, require_windows

EVAL_BATCH = 64  # windows per evaluation forward


class Windows:
    """Training windows of a trajectory split, in the form the batch loader reads.

    len() = number of valid windows; batch(index) -> frames (B, T, R, R, C) uint8 and action
    blocks (B, T, frameskip x A) float32, normalised with the training split's statistics.
    """

    def __init__(self, data: TrajectoryDataset, num_frames: int, frameskip: int):
        self.data, self.num_frames, self.frameskip = data, num_frames, frameskip
        self.starts = data.window_starts(num_frames, frameskip)
        self.name = data.name
        # One block holds `frameskip` consecutive actions: tile the per-dimension statistics.
        self.action_mean = np.tile(np.asarray(data.action_mean, np.float32), frameskip)
        self.action_std = np.tile(np.asarray(data.action_std, np.float32), frameskip)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        frames, actions, _ = self.data.windows(self.starts[np.asarray(index, np.int64)], self.num_frames, self.frameskip)
        return frames, (actions - self.action_mean) / self.action_std


@dataclass
class WorldRun:
    cfg: Config
    device: torch.device
    amp: torch.dtype | None
    train_data: Windows
    val_data: TrajectoryDataset | None
    model: WorldModel  # unwrapped
    trainer: nn.Module  # the model, DDP-wrapped in a process group
    optimizer: torch.optim.Optimizer

    kind = "world"

    @property
    def modules(self) -> dict[str, nn.Module]:
        m = self.model
        return {"backbone": m.backbone, "projector": m.projector, "action_encoder": m.action_encoder,
                "predictor": m.predictor}

    @property
    def optimized(self) -> dict[str, nn.Module]:
        return self.modules

    @property
    def side_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}  # every module trains with the one optimizer

    def frames_in(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 windows (B, T, C, R, R) -> normalised float frames at the encoder's size."""
        b, t = frames.shape[:2]
        data = self.train_data.data
        x = eval_transform(frames.flatten(0, 1), self.cfg.world.frame_size, data.mean, data.std)
        return x.view(b, t, *x.shape[1:])

    def step(self, micro_inputs: list[torch.Tensor], micro_targets: list[torch.Tensor | None], step: int,
             seeds: list[int]) -> dict[str, torch.Tensor]:
        # micro_inputs: windows of frames (B, T, C, R, R) uint8; micro_targets: their action blocks (B, T, A)
        w, loss_cfg = self.cfg.world, self.cfg.loss
        torch.manual_seed(seeds[0])  # dropout and drop-path draws: a pure function of the step
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        frames, actions = micro_inputs[0], micro_targets[0]
        picked, copies = (self.camera_copies(frames, seeds[0]) if w.camera_views and step >= w.camera_from_step
                          else (None, None))
        single = picked is not None  # copies of a few frames per window (world.camera_frames), not whole windows
        if copies is not None and not single:  # the window and its camera copies, one batch of (V + 1) x B
            frames, actions = torch.cat([frames, copies]), actions.repeat(w.camera_views + 1, 1, 1)
        with autocast:
            # z: (V + 1) x (B, T, D), the clean windows first; p: (B, H + R - 1, D), and the copies' for target 'all'
            out = self.trainer(self.frames_in(frames), actions, w.history, w.rollout_steps,
                               views=1 if single or copies is None else w.camera_views + 1,
                               predicted_views=1 if w.camera_target == "clean" else None,
                               copies=self.frames_in(copies).flatten(0, 1) if single else None)
        z, p = out[:2]
        scored = z[: len(p)] if w.camera_target == "clean" else z  # 'clean': the dynamics and SIGReg see the clean camera only
        parts = world_loss(scored, p, num_preds=w.num_preds, lamb=loss_cfg.lamb, step=step, num_slices=loss_cfg.num_slices,
                           t_max=loss_cfg.t_max, num_knots=loss_cfg.num_knots)
        if copies is not None:  # LeJEPA's invariance: every copy's latents pulled to the copies' mean
            if single:  # (V + 1, B, k, D): the picked frames' clean latents, then their copies'
                clean = z[torch.arange(len(z), device=z.device)[:, None], picked]
                views = torch.cat([clean[None], out[2].view(w.camera_views, *clean.shape)]).float()
            else:
                views = z.float().view(w.camera_views + 1, -1, *z.shape[1:])  # (V + 1, B, T, D)
            parts["invariance"] = (views - views.mean(0)).square().mean()
            parts["loss"] = parts["loss"] + w.camera_invariance * parts["invariance"]
        elif w.camera_views:  # logged as 0 before the copies join; outside the graph, so those steps are the clean run's
            parts["invariance"] = torch.zeros((), device=z.device)
        parts["loss"].backward()
        return {k: v.detach() for k, v in parts.items()}

    def camera_copies(self, frames: torch.Tensor, seed: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The step's camera copies (world/camera.py), drawn from a generator seeded by the step:
        (None, V copies of every window (V x B, T, C, R, R)) with camera_frames 0; with camera_frames k,
        (the k frames picked at random in each window (B, k), their V copies (V x B, k, C, R, R))."""
        w = self.cfg.world
        gen = torch.Generator(self.device).manual_seed(seed)
        picked = None
        if w.camera_frames:  # the copies' encoder cost is k / T of whole windows'
            picked = torch.rand(frames.shape[:2], generator=gen, device=frames.device).argsort(1)[:, : w.camera_frames]
            frames = frames[torch.arange(len(frames), device=frames.device)[:, None], picked]
        copies = torch.cat([camera_copy(frames, noise=w.camera_noise, hue=w.camera_hue, colour=w.camera_colour,
                                        generator=gen) for _ in range(w.camera_views)])
        return picked, copies

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        return evaluate_rollouts(self) if self.val_data is not None else {}

    def final_scores(self, checkpoint: Path) -> dict[str, float]:
        return {}  # the rollout errors of evaluate() are the world model's scores

    def data_meta(self) -> dict[str, Any]:
        d = self.train_data.data
        return {"name": d.name, "fingerprint": d.fingerprint, "mean": list(d.mean), "std": list(d.std),
                "channels": d.channels, "resolution": d.resolution, "num_classes": 0, "class_names": None,
                "kind": "trajectories", "world": d.world, "action_dim": d.action_dim,
                "action_mean": [float(v) for v in d.action_mean], "action_std": [float(v) for v in d.action_std],
                "state_names": d.state_names}

    def describe(self) -> str:
        d, w = self.train_data.data, self.cfg.world
        return (f"world model ({self.cfg.model.arch}) on {d.name} ({d.num_episodes} episodes, {len(self.train_data)} "
                f"windows of {w.history}+{w.num_preds + w.rollout_steps - 1} frames every {w.frameskip} steps)")


def build_world_model(cfg: Config, channels: int, action_dim: int) -> WorldModel:
    """The world model a config describes, for frames of `channels` and actions of `action_dim` per step."""
    return WorldModel.from_spec(model_spec(cfg.to_dict(), action_dim), build_backbone_from_config(cfg, channels))


def build_world_run(cfg: Config, device: torch.device) -> WorldRun:
    if cfg.data.source == "builtin":
        raise UserError("a world preset trains on trajectories: give --data (a folder from `lejepa world simulate` "
                        "or `lejepa data prepare`), not the built-in image set")
    w = cfg.world
    train = load_trajectories(cfg.data.source, cfg.data.train_split, val_fraction=cfg.data.val_fraction)
    num_frames = w.history + w.num_preds + w.rollout_steps - 1
    require_windows(train, num_frames, w.frameskip)
    try:
        val = load_trajectories(cfg.data.source, cfg.data.eval_split, val_fraction=cfg.data.val_fraction)
    except UserError:
        val = None  # no held-out episodes: no rollout evaluation
    if dist.is_main():
        for note in data_notes(cfg, train, val):
            console.print(note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_world_model(cfg, train.channels, train.action_dim).to(device)
    if w.freeze_dynamics:  # the encoder must fit the dynamics the model already knows (adaptation to a new camera)
        model.predictor.requires_grad_(False)
        model.action_encoder.requires_grad_(False)
    model = dist.global_batchnorm(model, device)  # BatchNorm over the global batch in a process group
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay), cfg, device)
    return WorldRun(cfg, device, autocast_dtype(cfg, device), Windows(train, num_frames, w.frameskip), val, model,
                    dist.ddp(model, device), optimizer)


def data_notes(cfg: Config, train: TrajectoryDataset, val: TrajectoryDataset | None) -> list[str]:
    """One line each, for the start of training: zeroed NaN action rows of a raw file, and a raw
    file (or a folder) trained without held-out episodes."""
    from lejepa_cli.data.formats import is_trajectory_file
    from lejepa_cli.world.columns import zeroed_note

    notes = [f"{cfg.data.source}: {zeroed_note(train.zeroed_rows)}"] if train.zeroed_rows else []
    if val is not None:
        return notes
    if is_trajectory_file(Path(cfg.data.source).expanduser()):
        notes.append(f"{cfg.data.source} is one split: this run logs no held-out rollout errors; add --set "
                     f"data.val_fraction=0.1 to hold out 10 % of its episodes (the ones `lejepa data prepare "
                     f"--val-fraction 0.1` holds out)")
    elif cfg.data.val_fraction > 0:
        notes.append(f"data.val_fraction splits raw trajectory files; {cfg.data.source} has no '{cfg.data.eval_split}' "
                     f"split, so this run logs no held-out rollout errors")
    return notes


def evaluate_rollouts(run: WorldRun) -> dict[str, float]:
    """Held-out rollout errors next to the 'nothing changes' guess; {} when no episode is long enough."""
    w, model = run.cfg.world, run.model
    horizon = w.eval_horizon
    windows = Windows(run.val_data, w.history + horizon, w.frameskip)  # normalised with the train split's statistics
    if len(windows) == 0:
        return {}
    count = len(windows) if w.eval_windows == 0 else min(w.eval_windows, len(windows))
    chosen = np.linspace(0, len(windows) - 1, count).round().astype(np.int64)  # evenly spread, deterministic
    was_training = model.training
    model.eval()
    sums = {"model": 0.0, "copy": 0.0}
    latents = []
    for i in range(0, count, EVAL_BATCH):
        frames, actions = windows.batch(chosen[i : i + EVAL_BATCH])
        x = run.frames_in(torch.from_numpy(frames).movedim(-1, -3).to(run.device))
        a = torch.from_numpy(np.ascontiguousarray(actions, np.float32)).to(run.device)
        z = model.encode(x).float()  # (B, H + K, D)
        errors = rollout_errors(model, z, a, w.history, horizon)
        n = len(frames)
        sums = {k: sums[k] + errors[k] * n for k in sums}
        latents.append(z[:, w.history - 1])
    model.train(was_training)
    err, copy = sums["model"] / count, sums["copy"] / count  # (K,) each
    held_out = torch.cat(latents)
    out = {
        "one_step_err": float(err[0]), "one_step_copy_err": float(copy[0]),
        "one_step_ratio": float(err[0] / copy[0].clamp_min(1e-12)),
        f"rollout{horizon}_err": float(err[-1]), f"rollout{horizon}_copy_err": float(copy[-1]),
        f"rollout{horizon}_ratio": float(err[-1] / copy[-1].clamp_min(1e-12)),
    }
    if len(held_out) >= 2:  # SIGReg of held-out latents on fixed directions (step 0)
        out["val_sigreg"] = float(sigreg(held_out, step=0, num_slices=run.cfg.loss.num_slices, t_max=run.cfg.loss.t_max,
                                         num_knots=run.cfg.loss.num_knots))
    return out
