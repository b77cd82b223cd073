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


# ---- tiny real artefacts, built once per session (tests/artifacts.py) -----------------------------


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory):
    """Paths of the session's tiny artefacts: npz, prepared, run, checkpoint, export, world_data,
    world_run, world_checkpoint, world_export, traj_npz, traj_h5 (None without h5py), preset (a YAML
    file). Copy before damaging or overwriting."""
    import artifacts
    from lejepa_cli.checkpoint import list_checkpoints

    root = tmp_path_factory.mktemp("artefacts")
    paths = {"npz": artifacts.image_npz(root / "images.npz")}
    from lejepa_cli.data.prepare import prepare

    prepare(paths["npz"], root / "prepared", progress=False)
    paths["prepared"] = root / "prepared"
    paths["run"] = artifacts.image_run(root / "run")
    paths["checkpoint"] = list_checkpoints(paths["run"] / "checkpoints")[-1]
    paths["export"] = artifacts.export(paths["run"], root / "export")
    paths["world_data"] = artifacts.world_data(root / "world-data")
    paths["world_run"] = artifacts.world_run(paths["world_data"], root / "world-run")
    paths["world_checkpoint"] = list_checkpoints(paths["world_run"] / "checkpoints")[-1]
    paths["world_export"] = artifacts.export(paths["world_run"], root / "world-export")
    paths["traj_npz"] = artifacts.trajectory_npz(root / "trajectories.npz")
    paths["traj_h5"] = artifacts.trajectory_h5(root / "trajectories.h5")
    from lejepa_cli.config import preset_path

    paths["preset"] = root / "my-preset.yaml"
    paths["preset"].write_text(preset_path("demo").read_text())
    return paths


@pytest.fixture
def one_thread():
    """One torch thread: on a busy CI machine, multi-threaded small ops mostly wait on parked threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
