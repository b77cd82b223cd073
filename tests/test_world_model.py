"""The world model's pieces: AdaLN-zero identity at init, causality, rollout, and the world loss."""

from __future__ import annotations

import pytest
import torch

from lejepa_cli.sigreg import sigreg
from lejepa_cli.models import build_backbone
from lejepa_cli.world.loss import rollout_errors, world_loss
from lejepa_cli.world.model import ConditionedBlock, WorldModel


def tiny_model(action_dim: int = 4, history: int = 3) -> WorldModel:
    torch.manual_seed(0)
    backbone = build_backbone("vit_micro", img_size=16, patch_size=4, in_chans=3)
    return WorldModel(backbone, latent_dim=16, action_dim=action_dim, history=history, proj_hidden=32, depth=2,
                      heads=2, head_dim=8, mlp_dim=32, dropout=0.0)


def test_adaln_zero_block_starts_as_the_identity():
    block = ConditionedBlock(16, heads=2, head_dim=8, mlp_dim=32, dropout=0.0)
    x, c = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    assert torch.equal(block(x, c), x)


def test_predictor_is_causal_in_latents_and_actions():
    model = tiny_model().eval()
    with torch.no_grad():  # make the blocks non-trivial (AdaLN-zero starts them as the identity)
        for p in model.predictor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, a = torch.randn(4, 3, 16), torch.randn(4, 3, 4)
    base = model.predict(z, a)
    z2, a2 = z.clone(), a.clone()
    z2[:, 2] += 1.0
    a2[:, 2] += 1.0
    changed = model.predict(z2, a2)
    assert torch.allclose(changed[:, :2], base[:, :2], atol=1e-6)  # positions before t see nothing of t
    assert not torch.allclose(changed[:, 2], base[:, 2])
    # the action at t conditions the prediction at t
    a3 = a.clone()
    a3[:, 1] += 1.0
    assert not torch.allclose(model.predict(z, a3)[:, 1], base[:, 1])


def test_rollout_feeds_predictions_back_over_a_sliding_history():
    model = tiny_model(history=2).eval()
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, a, future = torch.randn(3, 2, 16), torch.randn(3, 2, 4), torch.randn(3, 3, 4)
    out = model.rollout(z, a, future)
    assert out.shape == (3, 4, 16)
    zs, acts, expected = z, a, []
    for k in range(4):
        nxt = model.predict(zs[:, -2:], acts[:, -2:])[:, -1:]
        expected.append(nxt)
        if k < 3:
            zs, acts = torch.cat([zs, nxt], 1), torch.cat([acts, future[:, k : k + 1]], 1)
    assert torch.allclose(out, torch.cat(expected, 1), atol=1e-6)


def test_training_rollout_feeds_predictions_back_like_the_planner_and_trains_through_them():
    model = tiny_model(history=3).eval()
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    frames, actions = torch.randn(2, 6, 3, 16, 16), torch.randn(2, 6, 4)
    z, p = model(frames, actions, 3, rollout_steps=3)
    assert z.shape == (2, 6, 16) and p.shape == (2, 5, 16)  # H teacher-forced + R - 1 open-loop predictions
    z1, p1 = model(frames, actions, 3)
    assert torch.equal(p1, p[:, :3]) and torch.equal(z1, z)  # rollout_steps 1: today's forward
    # Predictions 3 and 4 are the planner's rollout (WorldModel.rollout) from the first 3 true latents.
    with torch.no_grad():
        planned = model.rollout(z[:, :3], actions[:, :3], actions[:, 3:5])
    assert torch.allclose(p[:, 2:], planned, atol=1e-6)
    # The open-loop loss reaches the encoder through the fed-back predictions and the targets.
    loss = world_loss(z, p, num_preds=1, lamb=0.1, step=0, num_slices=32)["pred"]
    loss.backward()
    assert all(q.grad is not None for q in model.predictor.parameters() if q.requires_grad)
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_camera_copies_are_normalised_with_the_clean_windows_statistics_and_leave_them_alone():
    """views=2: the clean half is encoded and predicted exactly as alone (BatchNorm statistics of the
    clean windows only, running statistics moved by them only); the copies use the running statistics."""
    torch.manual_seed(1)
    frames, actions = torch.randn(4, 4, 3, 16, 16), torch.randn(4, 4, 4)
    copies = frames + 0.5 * torch.randn_like(frames)
    alone, grouped = tiny_model().train(), tiny_model().train()
    z, p = alone(frames, actions, history=3)
    zg, pg = grouped(torch.cat([frames, copies]), actions.repeat(2, 1, 1), history=3, views=2, predicted_views=1)
    assert torch.equal(zg[:4], z) and torch.equal(pg, p) and pg.shape[0] == 4
    assert all(torch.equal(a, b) for a, b in zip(alone.buffers(), grouped.buffers()))  # running statistics
    reference = tiny_model().train()
    reference.load_state_dict(grouped.state_dict())  # the copies' latents: what deployment (eval) would give
    assert torch.allclose(zg[4:], reference.eval().encode(copies), atol=1e-6)
    _, p_all = grouped(torch.cat([frames, copies]), actions.repeat(2, 1, 1), history=3, views=2)
    assert p_all.shape[0] == 8
    assert grouped.projector.net[1].training  # the training mode is back after the copies


def test_passive_world_has_no_action_weights_and_still_predicts():
    model = tiny_model(action_dim=0)
    assert not any(n.startswith("action_encoder") for n, _ in model.named_parameters())
    frames = torch.randn(2, 4, 3, 16, 16)
    z, p = model(frames, torch.zeros(2, 4, 0), 3)
    assert z.shape == (2, 4, 16) and p.shape == (2, 3, 16)


def test_world_loss_predicts_num_preds_ahead_with_gradients_into_targets():
    torch.manual_seed(0)
    z = torch.randn(64, 5, 8, requires_grad=True)
    p = torch.randn(64, 3, 8, requires_grad=True)
    parts = world_loss(z, p, num_preds=2, lamb=0.1, step=7, num_slices=64)
    assert torch.allclose(parts["pred"], (p - z[:, 2:5]).square().mean())
    per_position = torch.stack([sigreg(z[:, t], step=7, num_slices=64) for t in range(5)]).mean()
    assert torch.allclose(parts["sigreg"], per_position, rtol=1e-5)
    assert torch.allclose(parts["loss"], parts["pred"] + 0.1 * parts["sigreg"])
    parts["pred"].backward()
    assert z.grad[:, 2:].abs().sum() > 0 and z.grad[:, :2].abs().sum() == 0  # no stop-gradient on targets


def test_world_loss_sigreg_oracles_per_position():
    torch.manual_seed(1)
    gaussian = torch.randn(256, 3, 128)
    collapsed = torch.zeros(256, 3, 128)
    p = torch.zeros(256, 2, 128)
    assert 0.8 < float(world_loss(gaussian, p, num_preds=1, lamb=0.1, step=0)["sigreg"]) < 1.3
    assert float(world_loss(collapsed, p, num_preds=1, lamb=0.1, step=0)["sigreg"]) == pytest.approx(0.40 * 256, rel=0.1)


def test_rollout_errors_compare_with_the_nothing_changes_guess():
    model = tiny_model(history=2).eval()
    z = torch.randn(5, 6, 16)
    a = torch.randn(5, 6, 4)
    errors = rollout_errors(model, z, a, history=2, horizon=4)
    assert errors["model"].shape == errors["copy"].shape == (4,)
    target = z[:, 2:6]
    assert torch.allclose(errors["copy"], (z[:, 1:2] - target).square().mean(dim=(0, 2)))
