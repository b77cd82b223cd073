"""World-model artefacts: `lejepa export` of a world run, and `load_world_model` to use one.

    lejepa export runs/world-tworoom --out exports/tworoom
    wm = lejepa_cli.load_world_model("exports/tworoom")     # needs torch + safetensors only
    z = wm.encode(frames)                                    # uint8 (B, T, H, W, C) -> (B, T, D)
    future = wm.rollout(z[:, -3:], actions[:, -3:], future_actions)   # raw action blocks

An export folder of a world run holds the encoder exactly as an image export does
(model.safetensors under timm's names + config.json, so every encoder tool reads it) and
  world.safetensors  projector.*, action_encoder.*, predictor.* (fp32)
  config.json        its "lejepa" section gains "world": the sizes that rebuild the model, the
                     frame size and normalisation, the action block layout and its statistics
Inputs are given raw: frames as uint8 images, actions as the simulator's or dataset's values
concatenated over one frameskip ([a_t, ..., a_{t+fs-1}]); `WorldModelExport` normalises both as
training did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint, split_prefix
from lejepa_cli.errors import UserError
from lejepa_cli.data.loader import eval_transform
from lejepa_cli.data.inputs import load_json, load_safetensors
from lejepa_cli.outputs import save_safetensors

WORLD_WEIGHTS = "world.safetensors"
_PARTS = ("projector", "action_encoder", "predictor")


def model_spec(config: dict[str, Any], action_dim: int) -> dict[str, Any]:
    """The sizes `WorldModel.from_spec` reads, and the frame size, from a config dict (Config.to_dict())
    and the number of action dimensions per step."""
    from lejepa_cli.config import config_from_dict  # here: an export folder loads without the config stack

    cfg = config_from_dict(config)  # a checkpoint from before world.frame_size / latent_dim names them the old way
    w = cfg.world
    return {
        "latent_dim": w.latent_dim, "proj_hidden": cfg.model.proj_hidden, "history": w.history,
        "num_preds": w.num_preds, "frameskip": w.frameskip, "depth": w.depth, "heads": w.heads,
        "head_dim": w.head_dim, "mlp_dim": w.mlp_dim, "dropout": w.dropout,
        "image_size": w.frame_size, "action_dim": int(action_dim),
    }


def world_spec(config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What rebuilds and feeds a world model, from a checkpoint's config and data metadata."""
    return {
        **model_spec(config, data["action_dim"]),
        "action_mean": list(data["action_mean"]), "action_std": list(data["action_std"]),
        "world": data.get("world"), "state_names": data.get("state_names"),
    }


def _checkpoint_of(source: Path) -> Path:
    if source.is_dir():
        found = list_checkpoints(source / "checkpoints")
        if not found:
            raise UserError(f"{source} has no checkpoints/ to export")
        return found[-1]
    return source


def is_world_checkpoint(source: str | Path) -> bool:
    """True when `source` (a run folder or checkpoint) was trained with objective: world."""
    from lejepa_cli.checkpoint import read_metadata

    try:
        path = _checkpoint_of(Path(source).expanduser())
        config = read_metadata(path).get("config")
        return isinstance(config, dict) and config.get("objective") == "world"
    except (UserError, OSError):
        return False


def is_world_model(source: str | Path) -> bool:
    """True for a world run folder, one of its checkpoints, or a world export folder."""
    path = Path(source).expanduser()
    if path.is_dir() and (path / WORLD_WEIGHTS).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text()) if path.is_dir() else None
        if isinstance(config, dict) and isinstance((config.get("lejepa") or {}).get("world"), dict):
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return is_world_checkpoint(path)


def refuse_world_model(source: str | Path, command: str, anyway: str = "") -> None:
    """UserError when `source` is a world model given to `lejepa COMMAND`, an image-encoder command;
    `anyway` ends the line with how to use its encoder on images regardless."""
    if is_world_model(source):
        raise UserError(f"{source} is a world model (a world run or its export), and `lejepa {command}` is for image "
                        f"encoders: use `lejepa world probe {source}` (or world plan / surprise / stress){anyway}")


def export_world(source: str | Path, out: str | Path, *, overwrite: bool = False):
    """Write a world run's encoder export plus world.safetensors; returns export.Exported."""
    from lejepa_cli.export import export_encoder

    source, out = Path(source).expanduser(), Path(out)
    ckpt = _checkpoint_of(source)
    tensors, meta = load_checkpoint(ckpt)
    if meta["config"].get("objective") != "world":
        raise UserError(f"{ckpt} is not a world-model checkpoint (objective {meta['config'].get('objective')!r})")
    if (out / WORLD_WEIGHTS).exists() and not overwrite:
        raise UserError(f"{out} already holds an export ({WORLD_WEIGHTS}); pass --overwrite to replace it")
    state = {f"{part}.{k}": v.float().contiguous() for part in _PARTS for k, v in split_prefix(tensors, f"model.{part}").items()}
    spec = world_spec(meta["config"], meta["data"])
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out / WORLD_WEIGHTS, metadata={"format": "pt"})
    # The encoder export writes config.json last; the world section travels in it.
    result = export_encoder(ckpt, out, overwrite=overwrite, extra={"world": spec})
    result.files.append(out / WORLD_WEIGHTS)
    return result


class WorldModelExport(torch.nn.Module):
    """A world model loaded from an export, run folder or checkpoint; eval mode. See the module docstring."""

    def __init__(self, model, spec: dict[str, Any], mean, std):
        super().__init__()
        self.model, self.spec = model, spec
        fs = spec["frameskip"]
        self.register_buffer("action_mean", torch.tensor(np.tile(spec["action_mean"], fs), dtype=torch.float32))
        self.register_buffer("action_std", torch.tensor(np.tile(spec["action_std"], fs), dtype=torch.float32))
        self.mean, self.std = list(mean), list(std)
        self.history, self.frameskip, self.latent_dim = spec["history"], fs, spec["latent_dim"]
        self.eval()

    def _device(self) -> torch.device:
        return self.action_mean.device

    def _actions(self, actions) -> torch.Tensor:
        a = torch.as_tensor(np.asarray(actions, np.float32) if not torch.is_tensor(actions) else actions).float()
        a = a.to(self._device())
        if a.shape[-1] != self.action_mean.numel():
            raise UserError(f"action blocks need {self.action_mean.numel()} numbers (frameskip {self.frameskip} x "
                            f"{self.spec['action_dim']} action dims), got {a.shape[-1]}")
        return (a - self.action_mean) / self.action_std

    @torch.no_grad()
    def encode(self, frames) -> torch.Tensor:
        """uint8 frames (B, T, H, W, C) or (B, H, W, C) (numpy or torch) -> latents (B, T, D) or (B, D)."""
        x = torch.as_tensor(frames)
        single = x.dim() == 4
        x = x.unsqueeze(1) if single else x
        if x.dim() != 5 or x.dtype != torch.uint8:
            raise UserError(f"frames must be uint8 (B, T, H, W, C) or (B, H, W, C), got {x.dtype} {tuple(x.shape)}")
        b, t = x.shape[:2]
        x = eval_transform(x.to(self._device()).flatten(0, 1).movedim(-1, -3), self.spec["image_size"], self.mean, self.std)
        z = self.model.encode(x.view(b, t, *x.shape[1:]))
        return z[:, 0] if single else z

    @torch.no_grad()
    def rollout(self, latents: torch.Tensor, actions, future_actions) -> torch.Tensor:
        """Context latents (B, H, D) and raw action blocks (B, H, A'), future blocks (B, K - 1, A') -> (B, K, D)."""
        return self.model.rollout(latents.to(self._device()), self._actions(actions), self._actions(future_actions))

    @torch.no_grad()
    def rollout_candidates(self, latents: torch.Tensor, past, candidates) -> torch.Tensor:
        """One context per row, many candidate plans: context latents (B, H, D), the raw action blocks
        between them (B, H - 1, A'), candidates' raw blocks (B, C, K, A') -> (B, C, K, D). What `rollout`
        gives each candidate, to rounding, computing the shared context once (world/rollout.py)."""
        from lejepa_cli.world.rollout import rollout_candidates

        return rollout_candidates(self.model, latents.to(self._device()), self._actions(past), self._actions(candidates))


def load_world_model(path: str | Path, device: torch.device | str = "cpu") -> WorldModelExport:
    """The world model of an export folder, a world run folder or one of its checkpoints."""
    from lejepa_cli.export import CONFIG, load_encoder
    from lejepa_cli.world.model import WorldModel

    path = Path(path).expanduser()
    backbone = load_encoder(path)
    info = backbone.lejepa_info
    if path.is_dir() and (path / WORLD_WEIGHTS).exists():
        config = load_json(path / CONFIG, "export config")
        spec = config.get("lejepa", {}).get("world") if isinstance(config, dict) else None
        if not isinstance(spec, dict):
            raise UserError(f"{path / CONFIG} has no 'world' section; re-export the run with `lejepa export`")
        state = load_safetensors(path / WORLD_WEIGHTS, "world-model weights file")
    else:
        ckpt = _checkpoint_of(path)
        tensors, meta = load_checkpoint(ckpt)
        if meta["config"].get("objective") != "world":
            raise UserError(f"{path} is not a world model (an image encoder: use lejepa_cli.load_encoder)")
        spec = world_spec(meta["config"], meta["data"])
        state = {f"{p}.{k}": v for p in _PARTS for k, v in split_prefix(tensors, f"model.{p}").items()}
    model = WorldModel.from_spec(spec, backbone)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise UserError(f"{path}: world weights do not fit ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"e.g. {(missing or unexpected)[0]})")
    return WorldModelExport(model, spec, info["mean"], info["std"]).to(device)
