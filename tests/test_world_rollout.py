"""Candidate rollouts from a shared context (world/rollout.py) are the plain rollout, to rounding,
and plan the same actions on seeded problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lejepa_cli.world.catalog import make_world
from lejepa_cli.world.plan import CEMConfig, cem, draw_problems, model_cost, run_episodes
from lejepa_cli.world.rollout import rollout_candidates
from test_world_model import tiny_model


def busy_model(action_dim: int = 4, history: int = 3):
    """A tiny model whose predictor blocks are not the identity (AdaLN-zero starts them so)."""
    model = tiny_model(action_dim, history)
    with torch.no_grad():
        for p in model.predictor.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def expanded_rollout(model, z, past, candidates):
    """The reference: every candidate gets its own copy of the context and a plain rollout."""
    b, c, k, a = candidates.shape
    ctx = z.repeat_interleave(c, 0)
    acts = torch.cat([past.repeat_interleave(c, 0), candidates[:, :, :1].flatten(0, 1)], 1)
    return model.rollout(ctx, acts, candidates[:, :, 1:].flatten(0, 1)).view(b, c, k, -1)


@pytest.mark.parametrize("context", [1, 2, 3])
@pytest.mark.parametrize("steps", [1, 2, 6])
@pytest.mark.parametrize("action_dim", [4, 0])
def test_candidate_rollouts_equal_the_plain_rollout(context, steps, action_dim):
    model = busy_model(action_dim)
    gen = torch.Generator().manual_seed(context * 10 + steps)
    z = torch.randn(3, context, 16, generator=gen)
    past = torch.randn(3, context - 1, action_dim, generator=gen)
    candidates = torch.randn(3, 5, steps, action_dim, generator=gen)
    fast = rollout_candidates(model, z, past, candidates)
    assert fast.shape == (3, 5, steps, 16)
    torch.testing.assert_close(fast, expanded_rollout(model, z, past, candidates), rtol=1e-5, atol=1e-5)


def test_each_candidate_sees_only_its_own_actions():
    model = busy_model()
    z, past = torch.randn(1, 3, 16), torch.randn(1, 2, 4)
    candidates = torch.randn(1, 4, 3, 4)
    base = rollout_candidates(model, z, past, candidates)
    changed = candidates.clone()
    changed[0, 2, 1] += 1.0  # candidate 2's second block
    after = rollout_candidates(model, z, past, changed)
    assert torch.equal(after[0, [0, 1, 3]], base[0, [0, 1, 3]])  # the other candidates are untouched
    assert torch.equal(after[0, 2, 0], base[0, 2, 0])  # the first prediction comes before that block
    assert not torch.allclose(after[0, 2, 1:], base[0, 2, 1:])


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval mode"):
        rollout_candidates(tiny_model().train(), torch.randn(1, 1, 16), torch.randn(1, 0, 4), torch.randn(1, 2, 1, 4))


class Wrapped:
    """A model as plan.py sees it (WorldModelExport's verbs), over a busy tiny WorldModel."""

    def __init__(self, model, fast: bool):
        self.model, self.fast, self.history = model, fast, model.history

    @torch.no_grad()
    def encode(self, frames):  # uint8 (B, R, R, 3) -> (B, D)
        x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0
        return self.model.encode(x[:, None])[:, 0]

    def rollout_candidates(self, z, past, candidates):
        return (rollout_candidates if self.fast else expanded_rollout)(self.model, z, past, candidates)


def test_cem_chooses_the_same_plans_with_either_rollout():
    model = busy_model()
    z, past, goal = torch.randn(2, 3, 16), torch.randn(2, 2, 4), torch.randn(2, 16)
    cfg = CEMConfig(candidates=40, iterations=4, elites=6, horizon=4)
    plans = [cem(model_cost(Wrapped(model, fast), z, past, goal, "min"), 2, 4, cfg, torch.Generator().manual_seed(0))
             for fast in (True, False)]
    torch.testing.assert_close(plans[0], plans[1], rtol=0, atol=1e-6)
    samples = torch.rand(2, 9, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    costs = [model_cost(Wrapped(model, fast), z, past, goal, "final")(samples) for fast in (True, False)]
    torch.testing.assert_close(costs[0], costs[1], rtol=1e-5, atol=1e-6)


def test_seeded_episodes_take_the_same_steps_with_either_rollout():
    world = make_world("two-room", size=16)
    model = busy_model(action_dim=2 * world.action_dim)  # frameskip 2
    starts, goals = draw_problems(world, 3, seed=0)
    cfg = CEMConfig(candidates=30, iterations=3, elites=5, horizon=4)
    runs = [run_episodes("model", world, starts, goals, model=Wrapped(model, fast), frameskip=2, budget=12, cfg=cfg,
                         seed=0, record=True) for fast in (True, False)]
    assert np.array_equal(runs[0]["frames"], runs[1]["frames"])  # the same actions, step by step
    assert np.array_equal(runs[0]["steps"], runs[1]["steps"])
    np.testing.assert_allclose(runs[0]["final_cost"], runs[1]["final_cost"], rtol=1e-5)
