"""Camera copies for world training (world/camera.py) and the invariance term they feed
(world/objective.py): seeded, exact on resume, and nothing changes while they are off."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lejepa_cli.checkpoint import list_checkpoints
from lejepa_cli.train import train
from lejepa_cli.world.camera import camera_copy, hue_rotation
from test_world_train import simulate, weights, world_config

CAMERA = ("world.camera_views=2", "world.camera_noise=0.2", "world.camera_hue=90", "world.camera_colour=0.3")


def windows(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_a_third_of_a_turn_about_the_grey_axis_cycles_the_channels():
    rot = hue_rotation(torch.tensor([120.0, 0.0]))
    torch.testing.assert_close(rot[0], torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rot[1], torch.eye(3))
    grey = torch.full((3,), 0.4)
    torch.testing.assert_close(hue_rotation(torch.tensor([37.0]))[0] @ grey, grey)  # grey stays grey


def test_copies_are_a_pure_function_of_the_generator_and_off_means_unchanged():
    x = windows()
    one = camera_copy(x, noise=0.1, hue=45, colour=0.2, generator=torch.Generator().manual_seed(3))
    two = camera_copy(x, noise=0.1, hue=45, colour=0.2, generator=torch.Generator().manual_seed(3))
    other = camera_copy(x, noise=0.1, hue=45, colour=0.2, generator=torch.Generator().manual_seed(4))
    assert one.dtype == torch.uint8 and torch.equal(one, two) and not torch.equal(one, other)
    assert torch.equal(camera_copy(x, noise=0, hue=0, colour=0, generator=torch.Generator()), x)


def test_one_camera_per_window_and_noise_of_the_drawn_size():
    still = windows()[:, :1].expand(-1, 3, -1, -1, -1).contiguous()  # every frame of a window the same
    copy = camera_copy(still, noise=0, hue=60, colour=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(copy[:, 0], copy[:, 1]) and torch.equal(copy[:, 0], copy[:, 2])  # same colour change in a window
    assert not torch.equal(copy[0, 0], copy[1, 0])  # another window, another camera
    grey = torch.full((64, 2, 3, 16, 16), 128, dtype=torch.uint8)
    noisy = camera_copy(grey, noise=0.2, hue=0, colour=0, generator=torch.Generator().manual_seed(0)).float() / 255
    stds = (noisy - 128 / 255).flatten(1).std(1)  # one std per window, drawn in [0, 0.2]
    assert stds.max() < 0.2 + 0.01 and stds.min() < 0.05 and stds.max() > 0.15


def test_a_hue_rotation_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        camera_copy(torch.zeros(1, 2, 1, 4, 4, dtype=torch.uint8), noise=0, hue=10, colour=0, generator=torch.Generator())


@pytest.fixture(scope="module")
def two_room(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("camera") / "two-room")


def test_training_with_camera_copies_logs_the_invariance_and_resumes_bit_exact(two_room, tmp_path):
    cfg = world_config(two_room, extra=CAMERA)
    train(cfg, tmp_path / "a", progress=False)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert any('"invariance"' in line for line in lines)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    list_checkpoints(tmp_path / "b" / "checkpoints")[-1].unlink()  # as if killed after step 3
    train(world_config(two_room, extra=CAMERA), tmp_path / "b", resume="auto", progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_camera_settings_do_nothing_while_camera_views_is_0(two_room, tmp_path):
    train(world_config(two_room), tmp_path / "clean", progress=False)
    off = ("world.camera_views=0", "world.camera_noise=0.5", "world.camera_hue=90", "world.camera_colour=0.5")
    train(world_config(two_room, extra=off), tmp_path / "off", progress=False)
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "off")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "clean" / "metrics.jsonl").read_text().count("invariance") == 0


@pytest.mark.parametrize("target,scored", [("clean", 1), ("all", 3)])
def test_the_camera_target_says_which_windows_the_dynamics_and_sigreg_score(two_room, monkeypatch, target, scored):
    """camera_target=clean: the copies enter the loss only through the invariance term; all: the
    predictor and SIGReg score every copy too (2 copies: 3 x the batch)."""
    import lejepa_cli.world.objective as objective

    seen = []
    real = objective.world_loss
    monkeypatch.setattr(objective, "world_loss", lambda z, p, **kw: seen.append((len(z), len(p))) or real(z, p, **kw))
    cfg = world_config(two_room, extra=(*CAMERA, f"world.camera_target={target}"))
    run = objective.build_world_run(cfg, torch.device("cpu"))
    frames, actions = run.train_data.batch(np.arange(8))
    parts = run.step([torch.as_tensor(frames).permute(0, 1, 4, 2, 3)], [torch.as_tensor(actions)], step=1, seeds=[5])
    assert seen == [(8 * scored, 8 * scored)]
    assert parts["invariance"] > 0
    assert parts["loss"] == pytest.approx(float(parts["pred"] + 0.1 * parts["sigreg"] + parts["invariance"]), rel=1e-5)


def test_copies_join_at_camera_from_step_and_not_before(two_room, tmp_path):
    """Before world.camera_from_step the run trains on the clean windows alone, bit for bit (the
    invariance logged as 0); from it on the copies change the weights."""
    import json

    train(world_config(two_room), tmp_path / "clean", progress=False)
    train(world_config(two_room, extra=(*CAMERA, "world.camera_from_step=6")), tmp_path / "never", progress=False)
    train(world_config(two_room, extra=(*CAMERA, "world.camera_from_step=5")), tmp_path / "last", progress=False)
    clean, never, last = (weights(tmp_path / name) for name in ("clean", "never", "last"))
    assert all(torch.equal(clean[k], never[k]) for k in clean)
    assert not all(torch.equal(clean[k], last[k]) for k in clean)
    logged = [json.loads(x) for x in (tmp_path / "last" / "metrics.jsonl").read_text().splitlines()]
    invariance = [x["invariance"] for x in logged if "invariance" in x]
    assert invariance[:5] == [0.0] * 5 and invariance[5] > 0  # six steps, the copies in the last


def test_camera_frames_copies_k_random_frames_per_window_pulled_to_their_clean_latents(two_room):
    """world.camera_frames=1: each window's copies are of one frame picked at random (the encoder sees
    B x T clean frames + V x B copies, not (V + 1) x B x T), and the invariance term pulls each copy's
    latent to the mean of it and that frame's clean latent, the copies on the running statistics."""
    import copy

    import lejepa_cli.world.objective as objective
    from lejepa_cli.world.model import running_batchnorm

    cfg = world_config(two_room, extra=(*CAMERA, "world.camera_frames=1"))
    run = objective.build_world_run(cfg, torch.device("cpu"))
    frames = torch.as_tensor(run.train_data.batch(np.arange(8))[0]).permute(0, 1, 4, 2, 3)
    actions = torch.as_tensor(run.train_data.batch(np.arange(8))[1])
    picked, copies = run.camera_copies(frames, seed=5)
    assert picked.shape == (8, 1) and copies.shape == (2 * 8, 1, *frames.shape[2:])
    assert len(set(picked[:, 0].tolist())) > 1  # another frame in another window
    model = copy.deepcopy(run.model)  # before the step moves the BatchNorm statistics
    seen = []
    hook = run.model.backbone.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    parts = run.step([frames], [actions], step=1, seeds=[5])
    hook.remove()
    assert seen == [8 * frames.shape[1], 2 * 8]
    with torch.no_grad():
        z = model.encode(run.frames_in(frames))
        with running_batchnorm(model):
            zc = model.encode(run.frames_in(copies)).view(2, 8, 1, -1)
    views = torch.cat([z[torch.arange(8)[:, None], picked][None], zc])
    assert float(parts["invariance"]) == pytest.approx(float((views - views.mean(0)).square().mean()), rel=1e-5)


def test_camera_frames_trains_and_resumes_bit_exact_and_needs_the_clean_target(two_room, tmp_path):
    from lejepa_cli.config import load_config
    from lejepa_cli.errors import UserError

    extra = (*CAMERA, "world.camera_frames=2")
    train(world_config(two_room, extra=extra), tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    list_checkpoints(tmp_path / "b" / "checkpoints")[-1].unlink()
    train(world_config(two_room, extra=extra), tmp_path / "b", resume="auto", progress=False)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="camera_frames.*camera_target clean"):
        load_config("world-tworoom", ["world.camera_frames=1", "world.camera_target=all"])
    with pytest.raises(UserError, match="at most the window's 4 frames"):
        load_config("world-tworoom", ["world.camera_frames=5"])
