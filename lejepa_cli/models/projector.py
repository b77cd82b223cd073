"""The LeJEPA projector g: h -> z (docs/method.md section 1).

Linear-BN-ReLU-Linear-BN-ReLU-Linear with a wide hidden layer and a small output. The loss
(SIGReg + prediction) reads z; probes and exports read the backbone's h, never z.

    proj = Projector(384, hidden_dim=2048, out_dim=128)
    z = proj(h)  # (B, 384) -> (B, 128)

The world model's projectors are the same module with one hidden layer, GELU and a bias before
BatchNorm (LeWM's Linear-BN-GELU-Linear):

    Projector(384, 2048, 192, hidden_layers=1, activation=nn.GELU, hidden_bias=True)

Only torch is needed: world/model.py, which exports load without the training code, uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn


class Projector(nn.Module):
    """MLP of `hidden_layers` Linear-BN-activation layers then a Linear. (B, in_dim) -> (B, out_dim).

    Layers sit in `net` (net.0 the first Linear, net.1 its BatchNorm, ...): the state-dict keys.
    `activation` makes one activation module; `hidden_bias` gives the hidden Linears a bias
    (off by default: BN subtracts the batch mean, so a bias there is dead weight).

    Extra leading dimensions are flattened into the batch, e.g. (V, N, D) -> (V, N, out_dim):
    BatchNorm then uses statistics pooled over all of them. Under torchrun the trainer passes
    the projector through `dist.global_batchnorm`, so the statistics are those of the global
    batch (every rank) and a multi-process step equals the single-process one.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, *, hidden_layers: int = 2,
                 activation: Callable[[], nn.Module] = partial(nn.ReLU, inplace=True), hidden_bias: bool = False) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        layers: list[nn.Module] = []
        for i in range(hidden_layers):
            layers += [nn.Linear(in_dim if i == 0 else hidden_dim, hidden_dim, bias=hidden_bias),
                       nn.BatchNorm1d(hidden_dim), activation()]
        layers.append(nn.Linear(hidden_dim if hidden_layers else in_dim, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        lead = h.shape[:-1]
        z = self.net(h.reshape(-1, h.shape[-1]))  # (B, out_dim)
        return z.reshape(*lead, self.out_dim)
