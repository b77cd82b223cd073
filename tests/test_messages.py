"""Messages that point the right way: each case is one line, the right exit code, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from lejepa_cli.train import train
from lejepa_cli.world.export import export_world
from lejepa_cli.world.prepare import simulate_dataset
from tests.cli_run import invoke
from tests.conftest import TINY
from tests.test_world_train import TINY_WORLD, world_config


def _error(err: str) -> str:
    """The one error line (last), with no traceback and no library warning before it."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and "Warning" not in err, err
    assert sum(x.startswith("error:") for x in lines) == 1 and lines[-1].startswith("error:"), err
    return lines[-1]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A trajectory dataset, a world run and its export, and an image run: all tiny."""
    root = tmp_path_factory.mktemp("messages")
    traj = root / "traj"
    simulate_dataset("two-room", traj, episodes=4, steps=16, val_episodes=2, size=16, seed=0, progress=False)
    train(world_config(traj, extra=("train.steps=2", "train.eval_every=0")), root / "wrun", progress=False)
    export_world(root / "wrun", root / "wexp")
    from lejepa_cli.config import load_config

    train(load_config("demo", TINY), root / "irun", progress=False)
    return {"traj": traj, "wrun": root / "wrun", "wexp": root / "wexp", "irun": root / "irun", "root": root}


@pytest.mark.parametrize("kind", ["wrun", "wexp"])
@pytest.mark.parametrize("command", ["probe", "viz", "adapt"])
def test_a_world_model_given_to_an_image_command_says_so(made, kind, command, capsys, tmp_path):
    args = {"probe": [], "viz": ["--out", tmp_path / "v"], "adapt": ["--data", "builtin", "--out", tmp_path / "a"]}
    code, _, err = invoke([command, made[kind], *args[command]], capsys)
    line = _error(err)
    if command == "adapt" and kind == "wrun":  # a world run adapts on trajectories with its own loss (issue 29)
        assert code == 2 and "a world model adapts by training on the target: --steps" in line
        return
    assert code == 2 and "is a world model" in line and f"lejepa world probe {made[kind]}" in line
    assert not list(tmp_path.iterdir())


def test_embed_refuses_a_trajectory_folder(made, capsys, tmp_path):
    out = tmp_path / "e.npy"
    code, _, err = invoke(["embed", made["irun"], made["traj"], "--out", out, "--no-progress"], capsys)
    assert code == 2 and "is a trajectory dataset (episodes with actions), not images" in _error(err)
    assert not list(tmp_path.iterdir())  # no embeddings, no skipped list


def test_resume_from_a_folder_names_the_folder_not_a_missing_file(made, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = invoke(["train", "--resume", empty, "--out", tmp_path / "r"], capsys)
    line = _error(err)
    assert code == 2 and f"--resume {empty} is a folder with no checkpoints" in line and "does not exist" not in line
    code, _, err = invoke(["train", "--resume", made["irun"], "--out", tmp_path / "r"], capsys)
    assert code == 2 and f"`--resume auto --out {made['irun']}`" in _error(err)


def test_output_paths_that_cannot_be_used_exit_2(made, capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for argv in (["world", "simulate", "two-room", "--out", blocker / "w", "--episodes", 1, "--steps", 5,
                  "--val-episodes", 0, "--size", 16, "--no-progress"],
                 ["export", made["irun"], "--out", blocker / "e"],
                 ["data", "prepare", "builtin", "--out", blocker / "p"]):
        code, _, err = invoke(argv, capsys)
        assert code == 2 and "Not a directory" in _error(err), argv


def test_adapt_with_a_huge_lr_is_one_line_without_a_library_warning(made, capsys, tmp_path):
    code, _, err = invoke(["adapt", made["irun"], "--data", "builtin", "--out", tmp_path / "a", "--steps", 2,
                           "--lr", "1e30", "--batch-size", 8, "--device", "cpu"], capsys)
    assert code == 1 and "try a smaller --lr (now 1e+30)" in _error(err)


def test_adapt_refuses_a_split_name_the_data_does_not_have(made, capsys, tmp_path):
    code, _, err = invoke(["adapt", made["irun"], "--data", "builtin", "--split", "test", "--out", tmp_path / "a",
                           "--steps", 1], capsys)
    assert code == 2 and "--data builtin has splits train, val, not 'test'" in _error(err)
    assert not (tmp_path / "a").exists()


def test_probe_refuses_a_checkpoint_beside_label_free(made, capsys):
    code, _, err = invoke(["probe", made["irun"], "--label-free", made["irun"]], capsys)
    assert code == 2 and "cannot be used with it" in _error(err)


def test_train_without_a_preset_says_it_trains_the_demo(capsys, tmp_path):
    code, _, err = invoke(["train", "--out", tmp_path / "run", "--no-progress",
                           *[x for o in [*TINY, "train.steps=1"] for x in ("--set", o)]], capsys)
    assert code == 0, err
    said = " ".join(err.split())  # the run's first line, wrapped on a narrow terminal
    assert said.startswith("demo: vit_micro on builtin") and "(no --preset given: this is the demo preset;" in said


def test_world_help_lists_stress_and_seed_help_says_what_it_seeds(capsys):
    code, out, _ = invoke(["world", "--help"], capsys)
    assert code == 0 and "stress" in out and "surprise and stress with a world run" in " ".join(out.split())
    for command, seeds in (("probe", "random-init baseline encoder"), ("surprise", "where and when the events")):
        code, out, _ = invoke(["world", command, "--help"], capsys)
        text = " ".join(out.replace("│", " ").split())
        assert code == 0 and "goals and planner" not in text and seeds in text, text


def test_an_image_run_ends_with_the_linear_top1_lejepa_probe_reports(made):
    """The demo's final table and `lejepa probe`: one number."""
    import json

    from lejepa_cli.image.probe import ProbeOptions, run_probe

    summary = json.loads((made["irun"] / "summary.json").read_text())
    report = run_probe(made["irun"], ProbeOptions(shift=False, conditions=False, cache=False, progress=False))
    assert summary["linear_top1"] == report["linear_top1"]
    assert list(summary)[3] == "linear_top1"  # step, train_s, checkpoint, then the headline number
