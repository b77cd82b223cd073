"""A world model trained on a stable-worldmodel file is first-class: `world probe | surprise | stress`
evaluate it on the file's own episodes (no simulator), `world plan` names the route to a world.

The file is a short two-room simulation (32 px, a large agent, so that a model trained for three steps
already shows where it is) written in stable-worldmodel's current HDF5Writer layout
(benchmarks/swm_file.py's rows, tests/test_world_files.py's writer), so its stored state is the
simulator's true state: state_0..3 = agent x, y, vx, vy and proprio_0..1 = agent x, y.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.swm_file import swm_episodes
from lejepa_cli.errors import UserError
from lejepa_cli.world.episodes import stored_episodes
from lejepa_cli.world.frame_edits import background_shift, camera, data_events
from test_world_files import TINY_WORLD, cli, write_hdf5writer

NAMES = ["state_0", "state_1", "state_2", "state_3", "proprio_0", "proprio_1"]
SETS = [x for o in TINY_WORLD for x in ("--set", o)]


@pytest.fixture(scope="module")
def file_run(tmp_path_factory) -> tuple[Path, Path]:
    """(the .h5 file, a run trained on it for a few steps with a quarter of its episodes held out)."""
    root = tmp_path_factory.mktemp("file-run")
    from lejepa_cli.cli import main

    for args in (["world", "simulate", "two-room", "--out", str(root / "sim"), "--episodes", "36", "--steps", "24",
                  "--val-episodes", "0", "--size", "32", "--set", "radius=0.1", "--set", "door=0.3", "--no-progress"],
                 ["train", "--preset", "world-tworoom", "--data", str(root / "tworoom.h5"), "--out", str(root / "run"),
                  "--no-progress", *SETS, "--set", "data.val_fraction=0.25"]):
        if args[0] == "train":
            write_hdf5writer(root / "tworoom.h5", swm_episodes(root / "sim"))
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code in (0, None)
    return root / "tworoom.h5", root / "run"


def test_probe_surprise_stress_give_figures_on_a_file_trained_run(file_run, tmp_path, capsys):
    src, run = file_run
    code, out, err = cli(["world", "probe", run, "-n", "3", "--json", tmp_path / "p.json"], capsys)
    assert code in (0, None), err
    probe = json.loads((tmp_path / "p.json").read_text())
    assert list(probe["r2"]) == NAMES and probe["steps"] == 24 and probe["data"] == "tworoom.h5"
    assert probe["episodes"] == 3 and probe["train_episodes"] == 6  # 3 of the run's 9 held-out episodes; 6 of the 27 others
    assert all(np.isfinite(v) for v in probe["r2"].values()) and "held out (data.val_fraction 0.25)" in probe["split"]
    assert "data: tworoom.h5, stored trajectories" in " ".join(err.split()) and "proprio_1" in out
    code, out, err = cli(["world", "surprise", run, "-n", "3", "--json", tmp_path / "s.json", "--plot", tmp_path / "s.png"],
                         capsys)
    assert code in (0, None), err
    surprise = json.loads((tmp_path / "s.json").read_text())
    assert set(surprise["auroc"]) == {"teleport", "colour", "frozen"} and (tmp_path / "s.png").stat().st_size > 1000
    assert all(0.0 <= v <= 1.0 for v in surprise["auroc"].values())
    code, out, err = cli(["world", "stress", run, "-n", "3", "-c", "pixel noise", "-c", "background shift", "-c",
                          "random disturbances", "--json", tmp_path / "st.json"], capsys)
    assert code in (0, None), err
    stress = json.loads((tmp_path / "st.json").read_text())
    assert [(r["condition"], r["level"]) for r in stress["conditions"]] == [
        ("clean", 0.0), ("pixel noise", 0.05), ("pixel noise", 0.1), ("pixel noise", 0.2), ("background shift", 0.2),
        ("background shift", 0.4)]
    for row in stress["conditions"]:
        assert np.isfinite(row["probe_r2"]) and 0 <= row["surprise_auroc"] <= 1 and row["plan_success"] is None
    assert stress["needs_simulator"] == ["planning success", "random disturbances"]
    assert stress["probe_columns"] == ["proprio_0", "proprio_1"] and "probe R^2 of proprio_0, proprio_1" in " ".join(out.split())
    text = " ".join(err.split())
    assert "planning success, random disturbances; these need a simulator: add --world NAME" in text


def test_plan_refuses_in_one_line_and_a_built_in_world_is_the_route(file_run, tmp_path, capsys):
    src, run = file_run
    code, _, err = cli(["world", "plan", run], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "without a simulator" in err and "add --world NAME (two-room, push, balls)" in " ".join(err.split())
    code, out, err = cli(["world", "plan", run, "--world", "two-room", "-n", "1", "--budget", "2", "--no-baselines",
                          "--candidates", "8", "--iterations", "1", "--elites", "2"], capsys)
    assert code in (0, None), err
    assert "two-room (--world) with default options" in " ".join(err.split()) and "world model (CEM)" in out
    for args, message in (([run, "--data", tmp_path / "gone.h5"], "does not exist"),
                          ([run, "--set", "noise=0.1"], "name the world with --world NAME"),
                          ([run, "--world", "balls"], "world balls has 0-D actions"),
                          ([run, "--steps", "30"], "longer than every held-out episode")):
        code, _, err = cli(["world", "surprise", *args], capsys)
        assert code == 2 and err.count("\n") == 1 and message in " ".join(err.split()), (args, err)
    episodes = swm_episodes(src.parent / "sim")  # the same episodes without their state: surprise runs, probe says why not
    np.savez(tmp_path / "nostate.npz", frames=np.concatenate([ep["pixels"] for ep in episodes]),
             actions=np.concatenate([ep["action"] for ep in episodes]), ep_len=[len(ep["action"]) for ep in episodes])
    code, _, err = cli(["world", "probe", run, "--data", tmp_path / "nostate.npz"], capsys)
    assert code == 2 and err.count("\n") == 1 and "stores no true state" in " ".join(err.split()), err
    code, out, err = cli(["world", "surprise", run, "--data", tmp_path / "nostate.npz", "-n", "2", "--steps", "12"], capsys)
    assert code in (0, None) and "frozen" in out and "a seeded split" in " ".join(err.split()), err


def test_the_probe_reads_the_stored_state_and_beats_a_shuffled_state_control(file_run, tmp_path):
    from lejepa_cli.world.probe import probe_world
    from lejepa_cli.world.runs import open_world_run
    from lejepa_cli.world.trajectories import load_trajectories

    src, run = file_run
    source = stored_episodes(src, val_fraction=0.25)
    held = load_trajectories(src, "val", val_fraction=0.25)
    test = source.episodes("test", 20, 24, seed=0)
    assert len(test) == held.num_episodes == 9
    np.testing.assert_array_equal(test.states.reshape(-1, 6), held.state)  # the file's rows, as stored
    np.testing.assert_array_equal(test.frames.reshape(-1, 32, 32, 3), held.frames[np.arange(len(held))])
    # the same frames with every episode's states taken from another episode: nothing to read from the frame
    episodes = swm_episodes(src.parent / "sim")
    shuffled = [{**ep, "state": other["state"], "proprio": other["proprio"]}
                for ep, other in zip(episodes, episodes[1:] + episodes[:1])]
    control = stored_episodes(write_hdf5writer(tmp_path / "shuffled.h5", shuffled), val_fraction=0.25)
    model = open_world_run(run).model
    real, shuffled = (probe_world(model, s, episodes=9, seed=0)["r2"]["proprio_0"] for s in (source, control))
    assert real > 0.5 and real > shuffled + 0.5  # the agent's x (which room it is in): a function of the frame


def test_events_change_exactly_the_intended_frames():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 12, 8, 8, 3), dtype=np.uint8)
    actions = rng.normal(size=(4, 12, 2)).astype(np.float32)
    step = np.array([4, 6, 8, 10])
    events = data_events(frames, actions, step, ("teleport", "colour", "frozen"), np.random.default_rng(1), frameskip=2)
    t = np.arange(12)[None]
    differs = lambda f: (f != frames).any(axis=(2, 3, 4))  # noqa: E731  (N, T)
    moved, moved_actions = events["teleport"]
    assert not differs(moved)[t < step[:, None]].any()
    for i in range(4):  # from the event on, another episode's frames and actions at the same steps
        other = [j for j in range(4) if j != i and np.array_equal(moved[i, step[i]:], frames[j, step[i]:])]
        assert len(other) == 1 and np.array_equal(moved_actions[i, step[i]:], actions[other[0], step[i]:])
    colour, same = events["colour"]
    assert np.array_equal(differs(colour), t == step[:, None]) and same is actions
    frozen, _ = events["frozen"]
    rows = np.arange(4)
    assert np.array_equal(frozen[rows, step], frames[rows, step - 2]) and np.array_equal(differs(frozen), t == step[:, None])
    with pytest.raises(UserError, match="not defined for stored trajectories"):
        data_events(frames, actions, step, ("pass_through",), rng, 2)


def test_camera_conditions_on_stored_frames():
    rng = np.random.default_rng(0)
    light = np.full((2, 6, 8, 8, 3), 220, np.uint8)
    light[:, :, 2:4, 2:4] = (200, 30, 30)  # an object on a light background
    noisy = camera(light, "pixel noise", 0.1, seed=3)
    assert np.array_equal(noisy, camera(light, "pixel noise", 0.1, seed=3))  # the same seed, the same draws
    assert abs(float((noisy.astype(float) - light).std()) - 25.5) < 3
    shifted = background_shift(light, 0.2)
    assert (shifted[:, :, 2:4, 2:4] == light[:, :, 2:4, 2:4]).all() and (shifted[:, :, 0, 0] == 220 - 51).all()
    moving = rng.integers(0, 256, (3, 40, 4, 4, 3), dtype=np.uint8)
    dropped = camera(moving, "dropped frames", 0.5, seed=0)
    repeats = (dropped[:, 1:] == dropped[:, :-1]).all(axis=(2, 3, 4))
    assert 0.3 < repeats.mean() < 0.7 and np.array_equal(dropped[:, 0], moving[:, 0])
    with pytest.raises(UserError, match="needs a simulator"):
        camera(moving, "random disturbances", 0.1, seed=0)
