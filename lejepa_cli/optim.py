"""What every objective's optimizer shares: AdamW parameter groups, the lr schedule, the precision.

The learning rate is a pure function of the step (`lr_at`), so a resumed run needs no scheduler
state and continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lejepa_cli.config import Config


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at the last step."""
    total, peak = cfg.train.steps, cfg.optim.lr
    warmup = cfg.optim.warmup_steps or max(1, total // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    floor = peak * cfg.optim.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; on the CPU only when asked (train.precision=bf16)."""
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embeddings and the CLS token."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict[str, Any]], cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW at optim.lr / optim.betas (fused kernels on CUDA)."""
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=device.type == "cuda")
