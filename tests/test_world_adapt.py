"""Label-free adaptation of world runs (world/adapt.py): the run's own loss on target trajectories,
from the run's weights, into a run folder; `world stress --adapt` reports each condition after it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lejepa_cli.cli import main
from lejepa_cli.train import train
from lejepa_cli.world.adapt import adapt_world, adapted_in_world
from lejepa_cli.world.catalog import make_world
from lejepa_cli.world.export import load_world_model
from lejepa_cli.world.prepare import simulate_dataset
from lejepa_cli.world.stress import stress
from test_world_train import simulate, weights, world_config


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    train(world_config(simulate(root / "clean")), root / "run", progress=False)
    simulate_dataset("two-room", root / "noisy", episodes=4, steps=16, size=16, seed=5, sets=["noise=0.2"], progress=False)
    return root


def test_adaptation_starts_from_the_run_and_writes_a_run_folder(source, tmp_path):
    summary = adapt_world(source / "run", source / "noisy", tmp_path / "still", steps=2, lr=1e-12)
    assert summary["step"] == 2
    before, after = weights(source / "run"), weights(tmp_path / "still")
    model_keys = [k for k in before if k.startswith("model.")]
    assert model_keys and all(torch.allclose(before[k], after[k], atol=1e-6) for k in model_keys
                              if "running" not in k and "num_batches" not in k)  # lr ~ 0: the run's own weights
    adapt_world(source / "run", source / "noisy", tmp_path / "moved", steps=3, lr=1e-3)
    moved = weights(tmp_path / "moved")
    assert any(not torch.allclose(before[k], moved[k]) for k in model_keys)
    config = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "moved" / "config.yaml").read_text())))
    assert config["data"]["source"] == str(source / "noisy") and config["optim"]["min_lr_ratio"] == 1.0
    assert load_world_model(tmp_path / "moved").history == 3


def test_adaptation_keeps_the_dynamics_fixed_unless_told_to_train_them(source, tmp_path):
    before = weights(source / "run")

    def moved(run) -> set[str]:  # modules whose learned weights changed (BatchNorm statistics follow the target anyway)
        after = weights(run)
        return {k.split(".")[1] for k in before if k.startswith("model.") and "running" not in k
                and "num_batches" not in k and not torch.equal(before[k], after[k])}

    adapt_world(source / "run", source / "noisy", tmp_path / "frozen", steps=3, lr=1e-3)
    assert moved(tmp_path / "frozen") == {"backbone", "projector"}
    adapt_world(source / "run", source / "noisy", tmp_path / "all", steps=3, lr=1e-3, freeze_dynamics=False)
    assert {"predictor", "action_encoder"} <= moved(tmp_path / "all")


def test_adapt_command_takes_a_world_run_and_refuses_zero_steps(source, tmp_path, capsys):
    args = ["adapt", str(source / "run"), "--data", str(source / "noisy"), "--out", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as info:
        main([*args, "--steps", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--steps must be 1.." in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    with pytest.raises(SystemExit) as info:
        main([*args, "--steps", "2"])
    assert (info.value.code or 0) == 0, capsys.readouterr().err
    assert (tmp_path / "a" / "summary.json").is_file()


def test_stress_reports_each_changed_row_after_adaptation(source):
    model = load_world_model(source / "run")
    world = make_world("two-room", size=16)
    seen = []

    def adapt(changed):
        seen.append(changed.options["noise"])
        return adapted_in_world(source / "run", changed, steps=2, episodes=4, episode_steps=16)

    report = stress(model, world, episodes=3, plan_episodes=0, steps=16, conditions=["pixel noise"], adapt=adapt)
    rows = report["conditions"]
    assert seen == [0.05, 0.1, 0.2] and "adapted" not in rows[0]
    for row in rows[1:]:
        after = row["adapted"]
        assert np.isfinite(after["probe_r2"]) and 0 <= after["surprise_auroc"] <= 1 and after["adapt_seconds"] > 0


def test_world_stress_adapt_through_the_cli(source, tmp_path, capsys):
    report = tmp_path / "stress.json"
    args = ["world", "stress", str(source / "run"), "--condition", "pixel noise", "--episodes", "2",
            "--plan-episodes", "0", "--steps", "16", "--adapt", "2", "--adapt-episodes", "4", "--json", str(report)]
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    assert (info.value.code or 0) == 0, out.err
    assert "adapted R^2" in out.out
    rows = json.loads(report.read_text())["conditions"]
    assert [("adapted" in r) for r in rows] == [False, True, True, True]


def test_stress_cli_adapts_on_as_many_target_episodes_as_the_library_by_default():
    import inspect

    from lejepa_cli.commands.world import stress_cmd
    from lejepa_cli.world.adapt import ADAPT_EPISODES

    assert inspect.signature(stress_cmd).parameters["adapt_episodes"].default == ADAPT_EPISODES
    assert inspect.signature(adapted_in_world).parameters["episodes"].default == ADAPT_EPISODES
