"""The world-model objective: next-latent prediction plus SIGReg on every time position.

    parts = world_loss(z, p, num_preds=1, lamb=0.1, step=step)   # z (B, T, D), p (B, H, D)
    parts["loss"].backward()

pred = mean over batch, positions and dimensions of (p_t - z_{t+num_preds})^2, with gradients
into both sides (no stop-gradient on the target); sigreg = mean over the T time positions of
SIGReg on that position's (B, D) latents, every position projected on the same directions (the
project's `sigreg`, so a torchrun job gets the global batch's statistic). Unlike image
pretraining's (1 - lambda) / lambda blend, the world objective is additive, as in LeWM:
loss = pred + lambda * sigreg.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lejepa_cli.sigreg import sigreg


def world_loss(z: Tensor, p: Tensor, *, num_preds: int, lamb: float, step: int, num_slices: int = 1024,
               t_max: float = 3.0, num_knots: int = 17) -> dict[str, Tensor]:
    """z: latents of every window frame (B, T, D); p: predictions from the first H frames (B, H, D)."""
    if z.dim() != 3 or p.dim() != 3:
        raise ValueError(f"world_loss expects z (B, T, D) and p (B, H, D), got {tuple(z.shape)} and {tuple(p.shape)}")
    h = p.shape[1]
    if h + num_preds > z.shape[1]:
        raise ValueError(f"{h} predictions {num_preds} step(s) ahead need {h + num_preds} frames, got {z.shape[1]}")
    zf, pf = z.float(), p.float()
    pred = (pf - zf[:, num_preds : num_preds + h]).square().mean()
    sig = sigreg(zf.transpose(0, 1), step=step, num_slices=num_slices, t_max=t_max, num_knots=num_knots)  # (T, B, D)
    return {"loss": pred + lamb * sig, "pred": pred, "sigreg": sig}


@torch.no_grad()
def rollout_errors(model, z: Tensor, actions: Tensor, history: int, horizon: int) -> dict[str, Tensor]:
    """Open-loop errors on windows of history + horizon frames, next to the 'nothing changes' guess.

    z (B, H + K, D) latents of the true frames, actions (B, H + K, A). Returns per-step mean squared
    errors (K,) of the model's rollout and of predicting z_{H+k} = z_H (the last seen latent).
    """
    preds = model.rollout(z[:, :history], actions[:, :history], actions[:, history : history + horizon - 1])
    target = z[:, history : history + horizon]  # (B, K, D)
    model_err = (preds - target).square().mean(dim=(0, 2))  # (K,)
    copy_err = (z[:, history - 1 : history] - target).square().mean(dim=(0, 2))
    return {"model": model_err, "copy": copy_err}
