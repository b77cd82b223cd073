"""Tiny real artefacts of every kind the commands read, built once per test session (see the
session fixtures in conftest.py): an image .npz, its prepared folder, a trained image run and
its export, a simulated world dataset, a trained world run and its export. Each takes seconds
on one CPU core; tests copy what they damage or overwrite, never the originals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# A 1-checkpoint image run of the ViT in conftest.TINY (one checkpoint: a damaged newest one has
# no older one to fall back to).
IMAGE_RUN = ["train.steps=2", "train.save_every=2"]
# A 1-checkpoint world run (tests/test_world_train.py's TINY_WORLD, fewer steps).
WORLD_RUN = [
    "world.frame_size=16", "model.patch_size=8", "model.proj_hidden=32", "world.latent_dim=16",
    "world.depth=1", "world.heads=2", "world.head_dim=8", "world.mlp_dim=32", "world.frameskip=2",
    "world.eval_windows=16", "world.eval_horizon=3", "loss.num_slices=32", "train.batch_size=8",
    "train.steps=2", "train.save_every=2", "train.eval_every=0", "log.every=1", "train.device=cpu",
]


def image_npz(path: Path, n: int = 48, size: int = 16) -> Path:
    """An .npz of `n` RGB images with 3 labels, official train/test splits (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 3
    half = n * 3 // 4
    np.savez(path, x_train=x[:half], y_train=y[:half], x_test=x[half:], y_test=y[half:])
    return path


def image_run(out: Path) -> Path:
    from conftest import TINY
    from lejepa_cli.config import load_config
    from lejepa_cli.train import train

    train(load_config("demo", TINY + IMAGE_RUN), out, progress=False)
    return out


def export(source: Path, out: Path) -> Path:
    from lejepa_cli.export import export_encoder
    from lejepa_cli.world.export import export_world, is_world_checkpoint

    if is_world_checkpoint(source):
        export_world(source, out)
    else:
        export_encoder(source, out)
    return out


def world_data(out: Path) -> Path:
    from lejepa_cli.world.prepare import simulate_dataset

    simulate_dataset("two-room", out, episodes=6, steps=16, val_episodes=2, size=16, seed=0, progress=False)
    return out


def world_run(data: Path, out: Path) -> Path:
    from lejepa_cli.config import load_config
    from lejepa_cli.train import train

    train(load_config("world-tworoom", [*WORLD_RUN, f"data.source={data}"]), out, progress=False)
    return out


def trajectory_npz(path: Path, lengths: tuple[int, ...] = (16, 16, 16)) -> Path:
    """A raw trajectory .npz: frames (T, 16, 16, 3) uint8, actions (T, 2), episode_idx (T,)."""
    rng = np.random.default_rng(1)
    T = sum(lengths)
    np.savez(path, frames=rng.integers(0, 256, (T, 16, 16, 3), dtype=np.uint8),
             actions=rng.normal(size=(T, 2)).astype(np.float32), episode_idx=np.repeat(np.arange(len(lengths)), lengths))
    return path


def trajectory_h5(path: Path, lengths: tuple[int, ...] = (8, 8, 8)) -> Path | None:
    """The same as an HDF5 file as stable-worldmodel writes it (pixels, action, ep_len/ep_offset); None without h5py."""
    try:
        import h5py
    except ImportError:
        return None
    rng = np.random.default_rng(2)
    T = sum(lengths)
    with h5py.File(path, "w") as f:
        f.create_dataset("pixels", data=rng.integers(0, 256, (T, 16, 16, 3), dtype=np.uint8))
        f.create_dataset("action", data=rng.normal(size=(T, 2)).astype(np.float32))
        f.create_dataset("ep_len", data=np.array(lengths))
        f.create_dataset("ep_offset", data=np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    return path
