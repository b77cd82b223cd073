"""LeJEPA's image objective as a function of the projector outputs: prediction + SIGReg.

    from lejepa_cli.image.loss import lejepa_loss
    parts = lejepa_loss(z, num_global=2, lamb=0.05, step=step)   # z (V, N, K); parts["loss"] to backward

Its own module so that what only needs the loss (adaptation's fine-tuning, label-free selection)
does not import the training objective, which imports the probes for its end-of-run score.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lejepa_cli.sigreg import sigreg


def lejepa_loss(
    z: Tensor,
    *,
    num_global: int,
    lamb: float,
    step: int,
    num_slices: int = 1024,
    t_max: float = 3.0,
    num_knots: int = 17,
    directions: Tensor | None = None,
) -> dict[str, Tensor]:
    """LeJEPA objective for projector outputs z (V, N, K) whose first `num_global` views are global.

    pred: every view regresses to its sample's centre, the mean of the global views (gradient
    flows through the centre), as a mean over views, samples and dimensions.
    sigreg: `sigreg` averaged over views. loss = (1 - lamb) * pred + lamb * sigreg.
    loss_scaled = loss / lamb**0.4, the paper's label-free model-selection statistic (detached).
    """
    if z.dim() != 3:
        raise ValueError(f"lejepa_loss expects z of shape (V, N, K), got {tuple(z.shape)}")
    if not 1 <= num_global <= z.shape[0]:
        raise ValueError(f"num_global must be in [1, {z.shape[0]}], got {num_global}")
    zf = z.float() if z.dtype != torch.float64 else z  # the loss is float32 under autocast too
    mu = zf[:num_global].mean(dim=0)  # (N, K)
    pred = (mu - zf).square().mean()
    sig = sigreg(
        z, step=step, num_slices=num_slices, t_max=t_max, num_knots=num_knots, directions=directions
    )
    loss = (1 - lamb) * pred + lamb * sig
    scaled = loss.detach() / lamb**0.4 if lamb > 0 else loss.detach()
    return {"loss": loss, "pred": pred, "sigreg": sig, "loss_scaled": scaled}
