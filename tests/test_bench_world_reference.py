"""The side-by-side benchmark against stable-worldmodel's LeWM (benchmarks/bench_world_reference.py).

stable_worldmodel is never a dependency: without it the benchmark reports ours only and says
why (checked here always); with it (a separate environment, see the benchmark's docstring) both
sides are built at LeWM's sizes with comparable parameter counts and timed side by side (checked
only there). Tiny sizes (`--set` on the lewm preset) keep each run to a few seconds; no timing is asserted.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks import bench_world_reference as ref_bench

# Predictor, projectors and frames shrunk so one train step and one CEM iteration take well under a second.
TINY = ("world.frame_size=28", "world.depth=1", "world.heads=2", "world.head_dim=16", "world.mlp_dim=32",
        "model.proj_hidden=32", "loss.num_slices=16")
HAVE_REFERENCE = importlib.util.find_spec("stable_worldmodel") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_without_the_reference_it_reports_ours_and_why(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "stable_worldmodel" else real(name, *a))
    doc = ref_bench.run([1], batch=2, iterations=1, repeats=1, overrides=TINY)
    assert doc["reference"]["available"] is False and "not importable" in doc["reference"]["reason"]
    assert list(doc["parameters_millions"]) == ["ours"]
    (case,) = doc["cases"]
    train, decision = case["train_step_ms"], case["cem_decision"]
    assert train["ours"] > 0 and "reference" not in train and "ratio_ref_over_ours" not in train
    assert set(decision["decision_s"]) == {"ours_context1", "ours_context3"}
    assert decision["iterations"] == 30 and decision["iterations_timed"] == 1 and "30/1" in decision["scaled"]
    # the scaling: a decision is its encoding plus 30 iterations, so it costs more than the encoding
    assert all(decision["decision_s"][k] > decision["encode_ms"][k] / 1e3 for k in decision["decision_s"])


def test_our_train_step_matches_the_train_loops_update():
    """world_train_step is the step `lejepa train` takes: same loss, and the gradient clipped to optim.grad_clip."""
    from benchmarks.bench_world import world_train_step
    from lejepa_cli.config import load_config
    from lejepa_cli.optim import param_groups
    from lejepa_cli.world.objective import build_world_model

    cfg = load_config("lewm", [*TINY, "optim.grad_clip=1e-3"])
    torch.manual_seed(0)
    model = build_world_model(cfg, 3, 2)
    frames, actions = torch.randn(2, 4, 3, 28, 28), torch.randn(2, 4, 10)
    before = [p.detach().clone() for p in model.parameters()]

    class Recorder(torch.optim.AdamW):  # sees the gradients the step applies
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            return super().step(closure)

    optimizer = Recorder(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    loss = world_train_step(model, optimizer, cfg, frames, actions)
    assert torch.isfinite(loss) and optimizer.norm == pytest.approx(1e-3, rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not HAVE_REFERENCE, reason="stable_worldmodel is not installed (a separate environment: "
                    "see benchmarks/bench_world_reference.py)")
def test_reference_side_by_side_at_lewm_sizes():
    from lejepa_cli.config import load_config

    reference, why = ref_bench.load_reference()
    assert reference is not None, why
    models = ref_bench._models(reference, load_config("lewm"))
    counts = {k: ref_bench.parameters(m) for k, m in models.items()}
    assert 17.0 < counts["reference"] < 19.0 and abs(counts["ours"] - counts["reference"]) < 0.5  # 18.0 M vs 18.2 M
    doc = ref_bench.run([1], batch=2, iterations=1, repeats=1, overrides=TINY)
    (case,) = doc["cases"]
    assert case["train_step_ms"]["ratio_ref_over_ours"] > 0
    assert set(case["cem_decision"]["ratio_ref_over_ours"]) == {"ours_context1", "ours_context3"}


def test_the_train_step_profile_gives_each_op_kind_its_share():
    """profile_world_step's accounting on our step: shares add up to 1, labelled regions (SIGReg with
    its backward, clip, AdamW) and op kinds (GEMM, attention) each get theirs."""
    doc = ref_bench.profile_train(steps=1, warmup=1, batch=2, overrides=(*TINY, "optim.grad_clip=1.0"))
    shares = doc["ours"]["shares"]
    assert sum(shares.values()) == pytest.approx(1.0, abs=0.01)
    for kind in ("GEMM / linear", "attention (SDPA)", "SIGReg", "gradient clip", "optimizer (AdamW)"):
        assert shares.get(kind, 0) > 0, (kind, shares)
    assert doc["ours"]["step_ms_profiled"] > 0
    if not HAVE_REFERENCE:
        assert doc["reference"]["available"] is False
    else:
        assert sum(doc["reference"]["shares"].values()) == pytest.approx(1.0, abs=0.01)
