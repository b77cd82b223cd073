"""The LeJEPA model pieces the training step runs: a multi-view encoder and the projector.

The backbone sees the global views and the local views (two resolutions) in one forward, so a
DistributedDataParallel wrapper sees exactly one forward per backward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lejepa_cli.checkpoint import FORMAT as CHECKPOINT_FORMAT
from lejepa_cli.checkpoint import list_checkpoints, read_metadata
from lejepa_cli.data.inputs import reading
from lejepa_cli.errors import UserError
from lejepa_cli.models import build_projector


class ViewEncoder(nn.Module):
    """(Vg, N, C, G, G) globals and (Vl, N, C, L, L) locals -> embeddings h (Vg + Vl, N, D)."""

    def __init__(self, backbone: nn.Module, channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        self.channels_last = channels_last

    def _embed(self, views: torch.Tensor) -> torch.Tensor:
        v, n = views.shape[:2]
        x = views.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x).view(v, n, -1)

    def forward(self, global_views: torch.Tensor, local_views: torch.Tensor | None = None) -> torch.Tensor:
        h = self._embed(global_views)
        if local_views is not None:
            h = torch.cat([h, self._embed(local_views)])
        return h


class ViewProjector(nn.Module):
    """h (V, N, D) -> z (V, N, K); BatchNorm statistics pool all views (and, under torchrun, all ranks)."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        v, n = h.shape[:2]
        return self.projector(h.flatten(0, 1)).view(v, n, -1)


def load_projector(source: str | Path, device: torch.device) -> nn.Module | None:
    """The projector of a training checkpoint or run folder (eval mode), or None for exports and
    other files (an export holds the backbone alone)."""
    path = Path(source)
    if path.is_dir():
        ckpts = list_checkpoints(path / "checkpoints")
        if not ckpts:
            return None
        path = ckpts[-1]
    try:
        meta = read_metadata(path)
    except UserError:
        return None
    if meta.get("format") != CHECKPOINT_FORMAT or not isinstance(meta.get("config"), dict):
        return None
    prefix = "model.projector."
    with reading(path, "checkpoint", f"{path} is damaged"), safe_open(str(path), framework="pt") as f:
        state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not state:
        return None
    # Sizes from the tensors themselves: net.0 is the first Linear (hidden, in), net.6 the last (out, hidden).
    first, last = state["net.0.weight"], state["net.6.weight"]
    projector = build_projector(int(first.shape[1]), int(first.shape[0]), int(last.shape[0]))
    projector.load_state_dict(state)
    return projector.to(device).eval()


class OnlineProbe(nn.Module):
    """LayerNorm + linear classifier on detached embeddings; never affects the encoder."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(h.detach()))
