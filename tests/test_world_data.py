"""Trajectory data: the prepared format, windows, .npz / LeWM-HDF5 sources, the CLI, bad input."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lejepa_cli.cli import main
from lejepa_cli.config import DataConfig
from lejepa_cli.data.prepare import prepare
from lejepa_cli.data.shards import ShardedImages
from lejepa_cli.data.sources import load_dataset
from lejepa_cli.errors import UserError
from lejepa_cli.world.prepare import prepare_trajectory_file, simulate_dataset
from lejepa_cli.world.catalog import make_world
from lejepa_cli.world.sim import simulate
from lejepa_cli.world.trajectories import TrajectoryDataset, is_trajectory_source, load_trajectories, require_windows


def cli(*args) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


def squash(text: str) -> str:
    return "".join(text.split())


def synthetic(lengths: list[int], A: int = 2, R: int = 4) -> TrajectoryDataset:
    """Row t has frame pixels = t % 256, actions (t, -t), state (t,): every gather is checkable."""
    T = int(sum(lengths))
    rows = np.arange(T)
    frames = np.broadcast_to((rows % 256).astype(np.uint8)[:, None, None, None], (T, R, R, 1)).copy()
    actions = np.stack([rows, -rows], 1).astype(np.float32)[:, :A]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TrajectoryDataset(frames, actions, starts, state=rows[:, None].astype(np.float32), state_names=["t"],
                             action_mean=np.zeros(A, np.float32), action_std=np.ones(A, np.float32))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=6), num_frames=st.integers(1, 5), frameskip=st.integers(1, 4))
def test_windows_never_cross_episode_ends(lengths, num_frames, frameskip):
    ds = synthetic(lengths)
    starts = ds.window_starts(num_frames, frameskip)
    episode_of = np.repeat(np.arange(len(lengths)), lengths)
    span = num_frames * frameskip
    expected = [t for t in range(len(ds)) if t + span - 1 < len(ds) and episode_of[t + span - 1] == episode_of[t]]
    assert starts.dtype == np.int64 and starts.tolist() == expected  # exactly the valid starts, in order
    if len(starts) == 0:
        with pytest.raises(UserError, match="no episode is long enough"):
            require_windows(ds, num_frames, frameskip)
        return
    frames, actions, state = ds.windows(starts, num_frames, frameskip)
    rows = starts[:, None] + frameskip * np.arange(num_frames)
    assert frames.shape == (len(starts), num_frames, 4, 4, 1)
    np.testing.assert_array_equal(frames[:, :, 0, 0, 0], rows % 256)
    np.testing.assert_array_equal(state[..., 0], rows)  # state aligned with the window's frames
    assert actions.shape == (len(starts), num_frames, frameskip * 2)
    # block k = a_{t+k*fs} .. a_{t+k*fs+fs-1}, each a_t = (t, -t), concatenated
    expect = (rows[:, :, None] + np.arange(frameskip)).astype(np.float32)
    np.testing.assert_array_equal(actions[:, :, 0::2], expect)
    np.testing.assert_array_equal(actions[:, :, 1::2], -expect)
    assert np.all(episode_of[rows] == episode_of[starts][:, None])


def test_require_windows_names_the_shortest_episode():
    ds = synthetic([5, 3, 7])
    with pytest.raises(UserError) as e:
        require_windows(ds, 4, 2)
    msg = str(e.value)
    assert "4 frames every 2 steps (8 steps" in msg and "longest has 7" in msg and "(episode 1) 3" in msg
    assert "\n" not in msg
    assert len(require_windows(ds, 2, 2)) == (5 - 3) + 0 + (7 - 3)


def test_passive_world_windows_have_no_action_numbers():
    ds = synthetic([6], A=0)
    _, actions, _ = ds.windows(ds.window_starts(2, 3), 2, 3)
    assert actions.shape == (1, 2, 0)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "push"
    simulate_dataset("push", out, episodes=4, steps=12, val_episodes=2, size=16, seed=3, progress=False)
    return out


def test_prepared_folder_is_memory_mapped_and_consistent(simulated):
    index = json.loads((simulated / "index.json").read_text())
    assert index["format"] == "lejepa-trajectories" and index["world"] == "push"
    train, val = load_trajectories(simulated, "train"), load_trajectories(simulated, "val")
    assert isinstance(train.frames, ShardedImages) and isinstance(train.actions, np.memmap)
    assert (len(train), train.num_episodes, len(val), val.num_episodes) == (48, 4, 24, 2)
    assert (train.resolution, train.channels, train.action_dim, train.state_dim) == (16, 3, 2, 10)
    assert train.state_names[-2:] == ["block_mass", "block_friction"] and train.world == "push"
    assert train.world_options["speed"] == 0.03
    np.testing.assert_array_equal(val.action_mean, train.action_mean)  # train statistics for both splits
    np.testing.assert_allclose(train.action_mean, np.asarray(train.actions).mean(0), rtol=1e-5, atol=1e-6)
    assert np.all(train.action_std >= 1e-6) and len(train.mean) == 3
    assert train.fingerprint and train.fingerprint != val.fingerprint
    # The stored episodes are the simulator's: re-simulate and compare.
    chunk = next(simulate(make_world("push", size=16), 4, 12, seed=3))
    np.testing.assert_array_equal(train.frames[np.arange(48)], chunk.frames)
    np.testing.assert_array_equal(np.asarray(train.state), chunk.state)
    assert is_trajectory_source(simulated)
    # The stored world name and options rebuild the simulator (planners and surprise tests need it).
    world = make_world(train.world, size=train.resolution, **train.world_options)
    again = world.render(world.set_state(np.asarray(train.state[:12])))
    assert np.abs(again.astype(int) - train.frames[np.arange(12)].astype(int)).max() <= 1  # float32 state: <= 1 level


def test_simulate_refuses_to_clobber(simulated, tmp_path):
    # same arguments: nothing to do; different ones: refused unless --overwrite
    s = simulate_dataset("push", simulated, episodes=4, steps=12, val_episodes=2, size=16, seed=3, progress=False)
    assert s["up_to_date"]
    with pytest.raises(UserError, match="already holds a different trajectory dataset"):
        simulate_dataset("push", simulated, episodes=5, steps=12, size=16, seed=3, progress=False)
    # killed before index.json was written: the same command starts again without --overwrite
    killed = tmp_path / "killed"
    simulate_dataset("balls", killed, episodes=2, steps=4, size=16, progress=False)
    (killed / "index.json").unlink()
    (killed / "train" / "actions.npy").unlink()
    assert not simulate_dataset("balls", killed, episodes=2, steps=4, size=16, progress=False)["up_to_date"]
    assert load_trajectories(killed, "train").num_episodes == 2
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a trajectory dataset"):
        simulate_dataset("balls", busy, episodes=1, steps=4, size=16, progress=False)
    with pytest.raises(UserError, match="lejepa did not write"):
        simulate_dataset("balls", busy, episodes=1, steps=4, size=16, progress=False, overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine"


def test_cli_simulate_then_info(tmp_path, capsys):
    out = tmp_path / "tr"
    assert cli("world", "simulate", "two-room", "--out", out, "--episodes", 4, "--steps", 12, "--val-episodes", 1,
               "--size", 16, "--seed", 1, "--set", "noise=0.05", "--no-progress") == 0
    assert "train4episodesx12steps" in squash(capsys.readouterr().err)
    assert cli("data", "info", out, "--verify") == 0
    text = squash(capsys.readouterr().out)
    for part in ("train:4episodes,48steps", "val:1episodes,12steps", "two-room", "agent_x", "noise=0.05"):
        assert part in text
    assert re.search(r"actiondim\W*2\W*statedim\W*4", text)
    actions = out / "val" / "actions.npy"
    original = actions.read_bytes()
    actions.write_bytes(original[:-4] + b"\x00\x00\x80\x7f")  # the last action becomes inf
    assert cli("data", "info", out, "--verify") == 1
    assert "val/actions.npy: checksum mismatch" in capsys.readouterr().err
    actions.write_bytes(original)
    ds = load_trajectories(out, "train")
    assert ds.world_options["noise"] == 0.05 and ds.frames.shape == (48, 16, 16, 3)
    assert cli("world", "list") == 0
    listing = capsys.readouterr().out
    assert "two-room" in listing and "block_mass" in listing and "kick_prob" in listing
    assert cli("world", "simulate", "nope", "--out", tmp_path / "x") == 2
    assert "unknown world 'nope'" in capsys.readouterr().err
    assert cli("world", "simulate", "push", "--out", tmp_path / "y", "--set", "mass_max=-1") == 2
    assert cli("world", "simulate", "push", "--out", tmp_path / "z", "--action-noise", "9") == 2
    assert cli("world", "simulate", "push", "--out", tmp_path / "z", "--wander", "2") == 2
    assert "--wander must be a share" in capsys.readouterr().err and not (tmp_path / "z").exists()


def write_npz(path: Path, lengths=(10, 7, 9, 8), A=3, size=(12, 10), with_state=True, key_frames="frames", **extra) -> dict:
    rng = np.random.default_rng(0)
    T = sum(lengths)
    arrays = {key_frames: rng.integers(0, 256, (T, *size, 3), dtype=np.uint8), "actions": rng.normal(size=(T, A)).astype(np.float32),
              "episode_idx": np.repeat(np.arange(len(lengths)) + 100, lengths)}
    if with_state:
        arrays["state"] = rng.normal(size=(T, 2))
        arrays["state_names"] = np.array(["pos", "vel"])
    arrays.update(extra)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return arrays


def test_npz_prepare_round_trip(tmp_path, monkeypatch):
    import lejepa_cli.world.prepare as build
    import lejepa_cli.world.shards as store

    monkeypatch.setattr(build, "FILE_CHUNK_BYTES", 8 * 8 * 3 * 12)  # read a few episodes at a time...
    monkeypatch.setattr(store, "SHARD_BYTES", 8 * 8 * 3 * 5)  # ...into several frame shards
    src = tmp_path / "traj.npz"
    arrays = write_npz(src, size=(8, 8))
    assert is_trajectory_source(src)
    s = prepare_trajectory_file(src, tmp_path / "p", val_fraction=0.25, seed=1, progress=False)
    assert len(json.loads((tmp_path / "p" / "index.json").read_text())["splits"]["train"]["shards"]) > 3
    assert s["kind"] == "trajectories" and s["splits"]["val"] == {"episodes": 1, "steps": s["splits"]["val"]["steps"]}
    train, val = load_trajectories(tmp_path / "p", "train"), load_trajectories(tmp_path / "p", "val")
    assert train.num_episodes == 3 and train.state_names == ["pos", "vel"]
    # every episode lands in exactly one split, unchanged (8 px frames: no resize)
    starts = np.array([0, 10, 17, 26, 34])
    got = [(ds, e) for ds in (train, val) for e in range(ds.num_episodes)]
    matched = 0
    for ds, e in got:
        a, b = ds.episode_starts[e], ds.episode_starts[e + 1]
        for k in range(4):
            if starts[k + 1] - starts[k] == b - a and np.array_equal(arrays["actions"][starts[k]:starts[k + 1]], ds.actions[a:b]):
                np.testing.assert_array_equal(ds.frames[np.arange(a, b)], arrays["frames"][starts[k]:starts[k + 1]])
                np.testing.assert_allclose(ds.state[a:b], arrays["state"][starts[k]:starts[k + 1]], rtol=1e-6)
                matched += 1
    assert matched == 4
    # the raw file loads directly too (one split), and resizing squares non-square frames
    direct = load_trajectories(src, "train")
    assert direct.num_episodes == 4 and len(direct) == 34 and direct.state_dim == 2
    src2 = tmp_path / "wide.npz"
    write_npz(src2, size=(12, 10))
    with pytest.raises(UserError, match="12x10 frames; square frames are needed"):
        load_trajectories(src2, "train")
    prepare_trajectory_file(src2, tmp_path / "r", resolution=8, progress=False)
    assert load_trajectories(tmp_path / "r", "train").frames.shape == (34, 8, 8, 3)
    with pytest.raises(UserError, match="has one split, 'train'"):
        load_trajectories(src, "val")


def write_lewm_h5(path: Path, lengths=(6, 9, 5), channels_first=True, offsets=False) -> dict:
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    T = sum(lengths)
    pixels = rng.integers(0, 256, (T, 3, 8, 8) if channels_first else (T, 8, 8, 3), dtype=np.uint8)
    cols = {"pixels": pixels, "action": rng.normal(size=(T, 2)).astype(np.float32),
            "reward": np.zeros(T, np.float32), "terminated": np.zeros(T, bool),
            "state": rng.normal(size=(T, 4)).astype(np.float32), "proprio": rng.normal(size=(T, 2)).astype(np.float32)}
    if offsets:
        cols["ep_len"] = np.array(lengths)
        cols["ep_offset"] = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    else:
        cols["episode_idx"] = np.repeat(np.arange(len(lengths)), lengths)
        cols["step_idx"] = np.concatenate([np.arange(n) for n in lengths])
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            f.create_dataset(k, data=v)
    return cols


@pytest.mark.parametrize("offsets,channels_first", [(False, True), (True, False)])
def test_lewm_hdf5_prepare_round_trip(tmp_path, offsets, channels_first):
    src = tmp_path / "lewm.h5"
    cols = write_lewm_h5(src, offsets=offsets, channels_first=channels_first)
    assert is_trajectory_source(src)
    direct = load_trajectories(src, "train")
    assert direct.episode_starts.tolist() == [0, 6, 15, 20] and direct.state_dim == 6
    assert direct.state_names == [f"state_{i}" for i in range(4)] + ["proprio_0", "proprio_1"]
    expect = cols["pixels"][[7, 2, 7]]
    np.testing.assert_array_equal(direct.frames[np.array([7, 2, 7])], expect.transpose(0, 2, 3, 1) if channels_first else expect)
    import pickle  # only to check that a DataLoader worker would receive a path, not the file handle

    clone = pickle.loads(pickle.dumps(direct.frames))
    np.testing.assert_array_equal(clone[np.array([3])], direct.frames[np.array([3])])
    assert cli("data", "prepare", src, "--out", tmp_path / "p", "--val-fraction", "0.34", "--resolution", 16) == 0
    train, val = load_trajectories(tmp_path / "p", "train"), load_trajectories(tmp_path / "p", "val")
    assert train.num_episodes + val.num_episodes == 3 and len(train) + len(val) == 20
    assert train.frames.shape[1:] == (16, 16, 3) and train.action_dim == 2
    frames, actions, state = train.windows(require_windows(train, 2, 2), 2, 2)
    assert frames.shape[1:] == (2, 16, 16, 3) and actions.shape[2] == 4 and state.shape[2] == 6


def test_hdf5_without_h5py_is_one_line(tmp_path, monkeypatch):
    src = tmp_path / "x.h5"
    src.write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    with pytest.raises(UserError, match=r"needs h5py: pip install h5py"):
        load_trajectories(src, "train")


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"actions": None}, "no 'actions' (or 'action') array; for a passive video give actions of shape (T, 0)"),
        ({"actions": np.zeros((33, 3), np.float32)}, "34 frames but 33 actions"),
        ({"actions": np.where(np.arange(34)[:, None] == 5, np.nan, 0.0)}, "actions hold NaN or inf (first at row 5)"),
        ({"actions": np.full((34, 1), np.inf)}, "actions hold NaN or inf (first at row 0)"),
        ({"episode_idx": np.array([0, 1] * 17)}, "the rows of an episode are not together"),
        ({"frames": np.zeros((34, 8, 8, 3), np.float32)}, "frames must be uint8"),
        ({"state_names": np.array([{"pickled": 1}], dtype=object)}, "is not a readable .npz file"),  # never unpickled
    ],
)
def test_bad_trajectory_files_are_one_line_errors(tmp_path, capsys, extra, message):
    src = tmp_path / "bad.npz"
    arrays = write_npz(src, size=(8, 8), with_state=False)
    arrays.update(extra)
    np.savez(src, **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(UserError) as e:
        load_trajectories(src, "train")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert cli("data", "prepare", src, "--out", tmp_path / "out") == 2
    assert squash(message) in squash(capsys.readouterr().err)
    assert not (tmp_path / "out" / "index.json").exists()


def test_passive_video_npz(tmp_path):
    src = tmp_path / "video.npz"
    write_npz(src, size=(8, 8), A=0, with_state=False)
    ds = load_trajectories(src, "train")
    assert ds.action_dim == 0 and ds.action_mean.shape == (0,)
    prepare_trajectory_file(src, tmp_path / "p", progress=False)
    assert load_trajectories(tmp_path / "p", "train").actions.shape == (34, 0)


def test_image_and_trajectory_data_refuse_each_other(tmp_path, simulated):
    images = tmp_path / "images.npz"
    np.savez(images, x_train=np.zeros((8, 8, 8), np.uint8))
    prepare(images, tmp_path / "img", progress=False)
    for source in (tmp_path / "img", images):
        with pytest.raises(UserError, match="image dataset: use an image preset"):
            load_trajectories(source, "train")
    assert not is_trajectory_source(images) and not is_trajectory_source(tmp_path / "img")
    traj = tmp_path / "traj.npz"
    write_npz(traj, size=(8, 8))
    for source in (simulated, traj):
        with pytest.raises(UserError, match="is a trajectory dataset .* use a world preset"):
            load_dataset(DataConfig(source=str(source)), "train")
    from lejepa_cli.data.shards import load_prepared

    with pytest.raises(UserError, match="use a world preset"):
        load_prepared(simulated, "train")
    with pytest.raises(UserError, match="split 'test' is not in"):
        load_trajectories(simulated, "test")
