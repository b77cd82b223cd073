"""The action-conditioned world model (LeWM's architecture): encoder, action encoder, predictor.

    model = WorldModel(backbone, latent_dim=192, action_dim=fs * A, history=3, ...)
    model = WorldModel.from_spec(spec, backbone)   # spec: an export's "world" section (export.world_spec)
    z = model.encode(frames)                   # (B, T, C, H, W) float -> (B, T, D) latents
    p = model.predict(z[:, :3], actions[:, :3])  # (B, 3, D): position t predicts z_{t+1}
    future = model.rollout(z[:, :3], actions[:, :3], future_actions)   # (B, K, D)

- Encoder: any backbone of the registry, then a projector Linear-BN-GELU-Linear. BatchNorm (not
  LayerNorm) after the backbone's final LayerNorm, so SIGReg can move the latents' scale.
- Action encoder: a per-step linear map (a kernel-1 convolution over time) then an MLP with SiLU
  (hidden 4 x width) to the latent width. A passive world (no actions) conditions on zeros, so
  every block's modulation is its learned bias.
- Predictor: a causal transformer over the history latents with a learned position embedding;
  every block is modulated by its frame's action embedding through AdaLN-zero (shift, scale and
  gate from a zero-initialised MLP, so each block starts as the identity), then an output
  projector with BatchNorm like the encoder's.

Only torch is needed (the projector is models.projector's, torch-only too), so an exported model
loads without the training code's dependencies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lejepa_cli.models.projector import Projector


def latent_projector(in_dim: int, hidden_dim: int, out_dim: int) -> Projector:
    """Linear(bias)-BN-GELU-Linear on the last dimension; leading dimensions are pooled for BatchNorm."""
    return Projector(in_dim, hidden_dim, out_dim, hidden_layers=1, activation=nn.GELU, hidden_bias=True)


@contextmanager
def running_batchnorm(module: nn.Module) -> Iterator[None]:
    """Within: every BatchNorm of `module` that is training normalises with its running statistics
    and leaves them as they are (gradients still flow through the normalisation)."""
    training = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in training:
        m.eval()
    try:
        yield
    finally:
        for m in training:
            m.train()


class ActionEncoder(nn.Module):
    """(B, T, in_dim) action blocks -> (B, T, dim) embeddings; zeros when in_dim is 0."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        if in_dim > 0:
            self.step = nn.Conv1d(in_dim, dim, kernel_size=1)  # the same linear map at every time step
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    def forward(self, actions: torch.Tensor) -> torch.Tensor:
        b, t = actions.shape[:2]
        if self.in_dim == 0:
            return actions.new_zeros(b, t, self.dim)
        x = self.step(actions.transpose(1, 2)).transpose(1, 2)  # (B, T, dim)
        return self.mlp(x)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class ConditionedBlock(nn.Module):
    """Pre-norm causal transformer block with AdaLN-zero conditioning on c (B, T, dim)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        inner = heads * head_dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))
        self.drop = nn.Dropout(dropout)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[1].weight)  # AdaLN-zero: gates start at 0, the block is the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # each (B, T, dim)
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, heads, T, head_dim)
        x = x + gate1 * self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, -1)))
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class Predictor(nn.Module):
    """Latents z_1..z_T and action embeddings (B, T, dim) -> predictions of z_2..z_{T+1} (B, T, dim)."""

    def __init__(self, dim: int, *, history: int, depth: int, heads: int, head_dim: int, mlp_dim: int,
                 dropout: float, proj_hidden: int):
        super().__init__()
        self.history = history
        self.pos_embed = nn.Parameter(torch.zeros(1, history, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(ConditionedBlock(dim, heads, head_dim, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.out = latent_projector(dim, proj_hidden, dim)

    def forward(self, z: torch.Tensor, c: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        t = z.shape[1]
        if t > self.history:
            raise ValueError(f"the predictor takes at most {self.history} latents (its history), got {t}")
        x = z + self.pos_embed[:, :t]
        for block in self.blocks:
            x = block(x, c)
        if last_only:  # a rollout reads only the newest prediction: project just that one (B, 1, dim)
            x = x[:, -1:]
        return self.out(self.norm(x))


class WorldModel(nn.Module):
    """Encoder + projector + action encoder + predictor, with LeWM's verbs."""

    def __init__(self, backbone: nn.Module, *, latent_dim: int, action_dim: int, history: int, proj_hidden: int,
                 depth: int, heads: int, head_dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.history, self.action_dim, self.latent_dim = history, action_dim, latent_dim
        self.backbone = backbone
        self.projector = latent_projector(backbone.embed_dim, proj_hidden, latent_dim)
        self.action_encoder = ActionEncoder(action_dim, latent_dim)
        self.predictor = Predictor(latent_dim, history=history, depth=depth, heads=heads, head_dim=head_dim,
                                   mlp_dim=mlp_dim, dropout=dropout, proj_hidden=proj_hidden)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], backbone: nn.Module) -> WorldModel:
        """The world model a spec describes (export.world_spec / model_spec: latent_dim, proj_hidden,
        history, frameskip, action_dim per step, depth, heads, head_dim, mlp_dim, dropout), on `backbone`."""
        return cls(backbone, latent_dim=spec["latent_dim"], action_dim=spec["frameskip"] * spec["action_dim"],
                   history=spec["history"], proj_hidden=spec["proj_hidden"], depth=spec["depth"], heads=spec["heads"],
                   head_dim=spec["head_dim"], mlp_dim=spec["mlp_dim"], dropout=spec["dropout"])

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames (B, T, C, H, W) -> latents z (B, T, D)."""
        b, t = frames.shape[:2]
        h = self.backbone(frames.flatten(0, 1))  # (B*T, embed_dim)
        return self.projector(h).view(b, t, -1)

    def predict(self, z: torch.Tensor, actions: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Latents (B, T, D) and their action blocks (B, T, A) -> next latents (B, T, D), causally
        (last_only: only the prediction from the newest position, (B, 1, D))."""
        return self.predictor(z, self.action_encoder(actions), last_only)

    def forward(self, frames: torch.Tensor, actions: torch.Tensor, history: int, rollout_steps: int = 1,
                views: int = 1, predicted_views: int | None = None, copies: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, ...]:
        """Training forward: latents of every frame (B, T, D) and next-latent predictions (B', H + R - 1, D).

        The first H predictions come from the first `history` true latents (teacher forcing), each
        predicting its successor; with rollout_steps R > 1, R - 1 more follow open loop: the newest
        prediction joins the context in place of the true latent, as in a planner's rollout, so
        prediction j (0-based) is always the guess of latent j + 1.

        views > 1: the batch is `views` equal groups, the windows first and then their camera copies
        (world/camera.py). Only the first group's BatchNorm statistics are used and tracked; the
        copies are normalised with the running statistics, as every frame is at deployment. (Batch
        statistics pooled over clean and noisy frames let noise rescale the clean latents: two-room
        then lost the agent's position, R^2 0.98 -> 0.4, even with the invariance term off.)
        Predictions come for the first `predicted_views` groups (all by default): B' = their windows.

        copies: single camera-copy frames (N, C, H, W) (`world.camera_frames`), encoded with the running
        statistics like copy windows and returned third, (N, D): (z, p, z_copies).
        """
        predicted_views = views if predicted_views is None else predicted_views
        latents, predictions = [], []
        for view, (f, a) in enumerate(zip(frames.chunk(views), actions.chunk(views))):
            with running_batchnorm(self) if view else nullcontext():
                z = self.encode(f)
                latents.append(z)
                if view < predicted_views:
                    predictions.append(self._predict_window(z, a, history, rollout_steps))
        out = (latents[0], predictions[0]) if views == 1 else (torch.cat(latents), torch.cat(predictions))
        if copies is None:
            return out
        with running_batchnorm(self):
            return *out, self.encode(copies[:, None])[:, 0]

    def _predict_window(self, z: torch.Tensor, actions: torch.Tensor, history: int, rollout_steps: int) -> torch.Tensor:
        preds = self.predict(z[:, :history], actions[:, :history])
        context, newest = z[:, :history], preds[:, -1:]
        rolled = [preds]
        for r in range(1, rollout_steps):
            context = torch.cat([context[:, 1:], newest], dim=1)
            newest = self.predict(context, actions[:, r : r + history], last_only=True)
            rolled.append(newest)
        return torch.cat(rolled, dim=1) if rollout_steps > 1 else preds

    @torch.no_grad()
    def rollout(self, z: torch.Tensor, actions: torch.Tensor, future_actions: torch.Tensor) -> torch.Tensor:
        """Open-loop rollout: feed each prediction back as the newest latent.

        z (B, H, D) and actions (B, H, A): the context (H <= history; its last action block is the
        first one executed); future_actions (B, K - 1, A): the blocks after it. Returns the K
        predicted latents (B, K, D), the first being z_{H+1}.
        """
        zs, acts = z, actions
        preds = []
        for k in range(future_actions.shape[1] + 1):
            nxt = self.predict(zs[:, -self.history:], acts[:, -self.history:], last_only=True)  # (B, 1, D)
            preds.append(nxt)
            if k < future_actions.shape[1]:
                zs = torch.cat([zs, nxt], dim=1)
                acts = torch.cat([acts, future_actions[:, k : k + 1]], dim=1)
        return torch.cat(preds, dim=1)
