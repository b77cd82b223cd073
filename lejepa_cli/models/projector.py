"""The LeJEPA projector g: h -> z (docs/method.md section 1).

Linear-BN-ReLU-Linear-BN-ReLU-Linear with a wide hidden layer and a small output. The loss
(SIGReg + prediction) reads z; probes and exports read the backbone's h, never z.

    proj = Projector(384, hidden_dim=2048, out_dim=128)
    z = proj(h)  # (B, 384) -> (B, 128)
"""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """3-layer MLP with BatchNorm after the two hidden layers. (B, in_dim) -> (B, out_dim).

    Extra leading dimensions are flattened into the batch, e.g. (V, N, D) -> (V, N, out_dim):
    BatchNorm then uses statistics pooled over all of them. Under torchrun the trainer passes
    the projector through `dist.global_batchnorm`, so the statistics are those of the global
    batch (every rank) and a multi-process step equals the single-process one.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        # No bias before BatchNorm: BN subtracts the batch mean, so a bias there is dead weight.
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        z = self.net(h.reshape(-1, h.shape[-1]))  # (B, out_dim)
        return z.reshape(*lead, self.out_dim)
