"""Shared fixtures: a tiny, fast training configuration for end-to-end tests."""

from __future__ import annotations

import pytest

# A ViT small enough that a training step takes milliseconds on one CPU core.
TINY = [
    "data.source=builtin", "data.builtin_train=64", "data.builtin_val=32", "data.builtin_size=16",
    "views.global_views=2", "views.local_views=2", "views.global_size=16", "views.local_size=8",
    "model.arch=vit_micro", "model.patch_size=4", "model.drop_path=0.1", "model.proj_hidden=64", "model.proj_dim=16",
    "loss.num_slices=64", "train.batch_size=16", "train.steps=4", "train.save_every=2", "log.every=1",
    "train.device=cpu", "train.eval_every=0",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)
