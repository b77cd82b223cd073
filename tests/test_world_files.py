"""Trajectory files as stable-worldmodel writes them: every layout reads, prepares and trains, with
frames, actions and state as the writer stored them, bit for bit, and each action row between
the frames it moves the agent between.

The fixtures are written at test time with h5py (and pylance), each following one writer's code
row for row (named in its docstring). They record a toy agent on a 16 x 16 grid whose position
is its state and whose move is its action, so a test can tell which action row leads from which
frame to which. Optional packages a test needs but does not find make it skip, saying which.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lejepa_cli.cli import main
from lejepa_cli.errors import UserError
from lejepa_cli.world.trajectories import is_trajectory_source, load_trajectories

h5py = pytest.importorskip("h5py", reason="h5py is not installed (pip install 'lejepa-cli[hdf5]')")

SIDE = 16
STEPS = (13, 15, 14, 16, 12, 15, 14, 13)  # env steps per episode; with the reset frame, one more row each
TINY_WORLD = [  # as tests/test_world_train.py: 16 px frames, one predictor block, milliseconds a step
    "views.global_size=16", "model.patch_size=8", "model.proj_hidden=32", "model.proj_dim=16",
    "world.depth=1", "world.heads=2", "world.head_dim=8", "world.mlp_dim=32", "world.frameskip=2",
    "world.eval_windows=16", "world.eval_horizon=3", "loss.num_slices=32", "train.batch_size=8",
    "train.eval_every=3", "log.every=1", "train.device=cpu", "train.steps=3", "train.save_every=3",
]


def cli(args: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# ------------------------------------------------------------------------------------------------
# The toy environment, recorded as stable-worldmodel records an env


def render(pos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark noise (every frame differs) and the agent as the one white pixel at (x, y)."""
    frame = rng.integers(0, 64, (SIDE, SIDE, 3), dtype=np.uint8)
    frame[int(pos[1]), int(pos[0])] = 255
    return frame


def episode_infos(rng: np.random.Generator, steps: int) -> list[dict]:
    """One episode's infos as EverythingToInfoWrapper (stable_worldmodel/wrapper/default.py) makes
    them: reset() records action = NaN (np.full_like of a sampled action), reward NaN, step_idx 0;
    step(action) records the frame after the step, the action applied and step_idx k."""
    pos = rng.integers(3, SIDE - 3, 2).astype(np.float32)
    goal = rng.integers(0, SIDE, 2).astype(np.float32)

    def info(action: np.ndarray, step: int, reward: float) -> dict:
        return {"pixels": render(pos, rng), "action": action, "proprio": pos.copy(), "state": np.concatenate([pos, goal]),
                "step_idx": step, "reward": reward, "terminated": False, "truncated": step == steps}

    infos = [info(np.full(2, np.nan, np.float32), 0, np.nan)]
    for k in range(1, steps + 1):
        move = rng.integers(-1, 2, 2).astype(np.float32)
        move[(pos + move < 0) | (pos + move > SIDE - 1)] = 0  # stay on the grid
        pos = pos + move
        infos.append(info(move, k, 0.0))
    return infos


def collect(steps=STEPS, reset_recorded: bool = True, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Episodes as World.collect hands them to a writer (stable_worldmodel/world/world.py): the infos
    on_step saw, then the action column moved up one row (`ep['action'].append(ep['action'].pop(0))`),
    so the reset's NaN lands in the last row. reset_recorded=False is 0.1.1's collect, whose on_step
    ran after env steps only: rows start at step_idx 1 and the last row gets the first action."""
    rng = np.random.default_rng(seed)
    episodes = []
    for n in steps:
        rows = episode_infos(rng, n)[0 if reset_recorded else 1 :]
        ep = {key: [row[key] for row in rows] for key in rows[0]}
        ep["action"].append(ep["action"].pop(0))
        episodes.append({key: np.asarray(value) for key, value in ep.items()})
    return episodes


# ------------------------------------------------------------------------------------------------
# The writers' layouts


def write_hdf5writer(path: Path, episodes: list[dict]) -> Path:
    """HDF5Writer.write_episode (stable_worldmodel/data/formats/hdf5.py, the same in 0.1.1 and today,
    behind World.collect(path, format="hdf5")): one resizable dataset per column with chunks of one
    row and no compression, then ep_len (int32) and ep_offset (int64), one entry per episode."""
    with h5py.File(path, "w", libver="latest") as f:
        for col, values in episodes[0].items():
            shape = values.shape[1:]
            f.create_dataset(col, shape=(0, *shape), maxshape=(None, *shape), dtype=values.dtype, chunks=(1, *shape))
        f.create_dataset("ep_len", shape=(0,), maxshape=(None,), dtype=np.int32)
        f.create_dataset("ep_offset", shape=(0,), maxshape=(None,), dtype=np.int64)
        ptr = 0
        for ep in episodes:
            n = len(ep["action"])
            for col, values in ep.items():
                f[col].resize(ptr + n, axis=0)
                f[col][ptr : ptr + n] = values
            for key, value in (("ep_len", n), ("ep_offset", ptr)):
                f[key].resize(f[key].shape[0] + 1, axis=0)
                f[key][-1] = value
            ptr += n
    return path


def write_record_dataset(path: Path, episodes: list[dict], offsets: bool = True) -> Path:
    """World.record_dataset of early 2026, the writer of LeWM's time (stable_worldmodel/world.py at
    6a5048f: _init_h5_datasets, _write_episode, _handle_done_ep): columns whose per-step value has 2+
    dimensions (pixels) in chunks of 100 rows compressed with hdf5plugin.Blosc(cname='lz4', clevel=5,
    shuffle=SHUFFLE), the others in chunks of 1000, uncompressed; ep_offset (int64), ep_len (int32)
    and ep_idx (int32, the episode's number on every row). offsets=False leaves out ep_offset and
    ep_len: a file that marks its episodes with ep_idx alone."""
    hdf5plugin = pytest.importorskip("hdf5plugin", reason="hdf5plugin is not installed (pip install 'lejepa-cli[hdf5]')")
    blosc = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
    with h5py.File(path, "w", libver="latest", fs_strategy="page", fs_page_size=4 * 1024 * 1024) as f:
        for col, values in episodes[0].items():
            shape = values.shape[1:]
            big = len(shape) >= 2
            f.create_dataset(col, shape=(0, *shape), maxshape=(None, *shape), dtype=values.dtype,
                             chunks=(100 if big else 1000, *shape), compression=blosc if big else None)
        if offsets:
            f.create_dataset("ep_offset", shape=(0,), maxshape=(None,), dtype=np.int64)
            f.create_dataset("ep_len", shape=(0,), maxshape=(None,), dtype=np.int32)
        f.create_dataset("ep_idx", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1000,))
        ptr = 0
        for e, ep in enumerate(episodes):
            n = len(ep["step_idx"])
            for col, values in {**ep, "ep_idx": np.full(n, e)}.items():
                f[col].resize(ptr + n, axis=0)
                f[col][ptr:] = values
            if offsets:
                for key, value in (("ep_offset", ptr), ("ep_len", n)):
                    f[key].resize(f[key].shape[0] + 1, axis=0)
                    f[key][-1] = value
            ptr += n
    return path


def jpeg(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def unjpeg(blob: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(img.convert("RGB"))


def write_lance(path: Path, episodes: list[dict]) -> Path:
    """LanceWriter (stable_worldmodel/data/formats/lance.py: _init_schema, _build_batch), behind
    World.collect(path), its default format: episode_idx and step_idx int32 made by the writer (the
    env's own step_idx column is dropped, its name being reserved), pixels one JPEG of quality 95 in
    a binary column, every other numeric column (bool included) a fixed-size list of float32."""
    lance = pytest.importorskip("lance", reason="pylance is not installed (pip install 'lejepa-cli[lance]')")
    import pyarrow as pa

    columns = [c for c in episodes[0] if c != "step_idx"]
    dims = {c: int(np.prod(episodes[0][c].shape[1:])) for c in columns if c != "pixels"}
    fields = [pa.field("episode_idx", pa.int32()), pa.field("step_idx", pa.int32())]
    fields += [pa.field(c, pa.binary() if c == "pixels" else pa.list_(pa.float32(), dims[c])) for c in columns]
    schema = pa.schema(fields)
    batches = []
    for e, ep in enumerate(episodes):
        n = len(ep["action"])
        arrays = [pa.array(np.full(n, e, np.int32)), pa.array(np.arange(n, dtype=np.int32))]
        for c in columns:
            if c == "pixels":
                arrays.append(pa.array([jpeg(f) for f in ep[c]], type=pa.binary()))
            else:
                flat = np.asarray(ep[c], dtype=np.float32).reshape(n, dims[c])
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), dims[c]))
        batches.append(pa.record_batch(arrays, schema=schema))
    lance.write_dataset(pa.Table.from_batches(batches, schema=schema), str(path))
    return path


LAYOUTS = {  # name: (writer, reset frame recorded)
    "swm-0.1.1": (write_hdf5writer, False),
    "swm-current": (write_hdf5writer, True),
    "swm-early-2026": (write_record_dataset, True),
    "swm-ep_idx-only": (lambda p, eps: write_record_dataset(p, eps, offsets=False), True),
    "swm-lance": (write_lance, True),
}


def write_layout(name: str, folder: Path, steps=STEPS) -> tuple[Path, list[dict]]:
    writer, reset = LAYOUTS[name]
    episodes = collect(steps, reset_recorded=reset)
    return writer(folder / f"{name}{'.lance' if 'lance' in name else '.h5'}", episodes), episodes


def expected(episodes: list[dict], lance: bool) -> dict[str, np.ndarray]:
    """What the file holds, as lejepa must read it: frames (JPEG-decoded for Lance), actions with the
    NaN rows at 0, state then proprio."""
    frames = np.concatenate([[unjpeg(jpeg(f)) for f in ep["pixels"]] if lance else ep["pixels"] for ep in episodes])
    actions = np.concatenate([ep["action"] for ep in episodes]).astype(np.float32)
    return {"frames": frames, "actions": np.nan_to_num(actions, nan=0.0),
            "state": np.concatenate([np.concatenate([ep["state"], ep["proprio"]], 1) for ep in episodes]).astype(np.float32),
            "starts": np.concatenate([[0], np.cumsum([len(ep["action"]) for ep in episodes])]),
            "nan_rows": int(np.isnan(actions).any(1).sum())}


def check_alignment(ds) -> None:
    """Inside every episode a_t moves the agent from frame t to frame t + 1 (the white pixel of the
    frames and the stored position agree), and a window's action block k leads from its frame k to k + 1."""
    for e in range(ds.num_episodes):
        a, b = ds.episode_starts[e], ds.episode_starts[e + 1]
        pos = ds.state[a:b, :2]
        np.testing.assert_array_equal(pos[1:] - pos[:-1], ds.actions[a : b - 1])
        frames = ds.frames[np.arange(a, b)].astype(int).sum(-1).reshape(b - a, -1)
        np.testing.assert_array_equal(np.stack(np.divmod(frames.argmax(1), SIDE), 1)[:, ::-1], pos)
    starts = ds.window_starts(4, 2)
    frames, actions, state = ds.windows(starts, 4, 2)
    moves = actions.reshape(len(starts), 4, 2, 2).sum(2)  # (B, F, A): the two actions of each block, summed
    np.testing.assert_array_equal(moves[:, :-1], state[:, 1:, :2] - state[:, :-1, :2])


# ------------------------------------------------------------------------------------------------
# Every layout reads, bit for bit, and lines up


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_stable_worldmodel_layout_reads_bit_for_bit_and_lines_up(layout, tmp_path):
    src, episodes = write_layout(layout, tmp_path)
    assert is_trajectory_source(src)
    want = expected(episodes, lance="lance" in layout)
    ds = load_trajectories(src, "train")
    np.testing.assert_array_equal(ds.episode_starts, want["starts"])
    np.testing.assert_array_equal(ds.frames[np.arange(len(ds))], want["frames"])
    np.testing.assert_array_equal(ds.actions, want["actions"])
    np.testing.assert_array_equal(ds.state, want["state"])
    assert ds.state_names == ["state_0", "state_1", "state_2", "state_3", "proprio_0", "proprio_1"]
    # the current and early writers leave NaN in every episode's last action row; 0.1.1 none (its
    # last row holds the episode's first action, moved there with the rest)
    assert ds.zeroed_rows == want["nan_rows"] == (0 if layout == "swm-0.1.1" else len(STEPS))
    if layout == "swm-0.1.1":
        first_moves = [ep["action"][-1] for ep in episodes]
        np.testing.assert_array_equal(ds.actions[ds.episode_starts[1:] - 1], first_moves)
    check_alignment(ds)


@pytest.mark.parametrize("layout", ["swm-0.1.1", "swm-current", "swm-early-2026", "swm-lance"])
def test_every_layout_prepares_and_trains_with_held_out_rollout_errors(layout, tmp_path, capsys):
    src, episodes = write_layout(layout, tmp_path)
    want = expected(episodes, lance="lance" in layout)
    code, _, err = cli(["data", "prepare", src, "--out", tmp_path / "prep", "--val-fraction", "0.25"], capsys)
    assert code in (0, None), err
    assert ("were set to 0, as LeWM's train.py does" in err) == (layout != "swm-0.1.1")
    found = 0
    for split in ("train", "val"):  # every episode in one split, unchanged
        ds = load_trajectories(tmp_path / "prep", split)
        for e in range(ds.num_episodes):
            a, b = ds.episode_starts[e], ds.episode_starts[e + 1]
            k = int(np.flatnonzero(np.all(want["state"][want["starts"][:-1]] == ds.state[a], axis=1))[0])
            rows = np.arange(want["starts"][k], want["starts"][k + 1])
            np.testing.assert_array_equal(ds.frames[np.arange(a, b)], want["frames"][rows])
            np.testing.assert_array_equal(ds.actions[a:b], want["actions"][rows])
            np.testing.assert_array_equal(ds.state[a:b], want["state"][rows])
            found += 1
    assert found == len(STEPS)
    code, _, err = cli(["train", "--preset", "world-tworoom", "--data", src, "--out", tmp_path / "run", "--no-progress",
                        *[x for o in TINY_WORLD for x in ("--set", o)], "--set", "data.val_fraction=0.25"], capsys)
    assert code in (0, None), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and np.isfinite(summary["one_step_err"]) and np.isfinite(summary["rollout3_err"])


def test_val_fraction_on_a_raw_file_holds_out_what_prepare_holds_out(tmp_path, capsys):
    src, _ = write_layout("swm-current", tmp_path)
    assert cli(["data", "prepare", src, "--out", tmp_path / "prep", "--val-fraction", "0.25"], capsys)[0] in (0, None)
    for split in ("train", "val"):
        raw, prepared = load_trajectories(src, split, val_fraction=0.25), load_trajectories(tmp_path / "prep", split)
        np.testing.assert_array_equal(raw.episode_starts, prepared.episode_starts)
        np.testing.assert_array_equal(raw.frames[np.arange(len(raw))], prepared.frames[np.arange(len(prepared))])
        np.testing.assert_array_equal(raw.actions, prepared.actions)
        np.testing.assert_array_equal(raw.state, prepared.state)
        assert raw.mean == prepared.mean and raw.std == prepared.std  # the train episodes' statistics, both splits
        np.testing.assert_array_equal(raw.action_mean, prepared.action_mean)
        np.testing.assert_array_equal(raw.action_std, prepared.action_std)
    assert load_trajectories(src, "val", val_fraction=0.25).num_episodes == 2
    with pytest.raises(UserError, match="has one split, 'train'; for a 'val' split add --set data.val_fraction=0.1"):
        load_trajectories(src, "val")
    with pytest.raises(UserError, match=r"data.val_fraction 0.99 of 8 episodes leaves none to train on"):
        load_trajectories(src, "train", val_fraction=0.99)


def test_training_on_a_raw_file_says_what_it_zeroed_and_that_it_has_no_held_out_split(tmp_path, capsys):
    src, _ = write_layout("swm-current", tmp_path)
    code, out, err = cli(["train", "--preset", "world-tworoom", "--data", src, "--out", tmp_path / "run",
                          "--no-progress", *[x for o in TINY_WORLD for x in ("--set", o)]], capsys)
    assert code in (0, None), err
    text = " ".join((out + err).split())
    assert "8 end-of-episode action rows held NaN or inf" in text
    assert "this run logs no held-out rollout errors; add --set data.val_fraction=0.1" in text
    assert "one_step_err" not in json.loads((tmp_path / "run" / "summary.json").read_text())


# ------------------------------------------------------------------------------------------------
# Refusals: one line each


def test_nan_actions_away_from_an_episode_end_are_one_line_errors(tmp_path, capsys):
    episodes = collect()
    episodes[2]["action"][4] = np.nan
    src = write_hdf5writer(tmp_path / "inside.h5", episodes)
    row = sum(len(ep["action"]) for ep in episodes[:2]) + 4
    code, _, err = cli(["data", "prepare", src, "--out", tmp_path / "p"], capsys)
    assert code == 2 and f"actions hold NaN or inf (first at row {row}) at step 4 of episode 2" in " ".join(err.split())
    assert "Traceback" not in err
    # a file whose rows hold the action that led TO their frame (not moved up): NaN in the first row
    unshifted = collect()
    for ep in unshifted:
        ep["action"] = np.roll(ep["action"], 1, axis=0)
    src = write_hdf5writer(tmp_path / "unshifted.h5", unshifted)
    with pytest.raises(UserError, match=r"first at row 0\) at step 0 of episode 0 .* move every episode's actions up one row"):
        load_trajectories(src, "train")


def test_an_npz_with_nan_end_of_episode_actions_reads_them_as_zero(tmp_path):
    episodes = collect()
    src = tmp_path / "mine.npz"
    np.savez(src, frames=np.concatenate([ep["pixels"] for ep in episodes]),
             actions=np.concatenate([ep["action"] for ep in episodes]),
             ep_len=np.array([len(ep["action"]) for ep in episodes]))
    ds = load_trajectories(src, "train")
    assert ds.zeroed_rows == len(STEPS) and np.isfinite(ds.actions).all()
    np.testing.assert_array_equal(ds.actions, expected(episodes, lance=False)["actions"])


def test_episode_columns_that_disagree_are_one_line_errors(tmp_path):
    pytest.importorskip("hdf5plugin", reason="hdf5plugin is not installed (pip install 'lejepa-cli[hdf5]')")
    src = write_record_dataset(tmp_path / "early.h5", collect())
    with h5py.File(src, "r+") as f:
        f["ep_idx"][STEPS[0] + 1] = 0  # episode 1's first row, claimed by episode 0
    with pytest.raises(UserError, match="ep_idx and ep_offset / ep_len disagree about where episodes start"):
        load_trajectories(src, "train")


def write_blosc_pixels_without_the_plugin(path: Path, episodes: list[dict]) -> Path:
    """A file laid out as write_record_dataset's, but written without hdf5plugin: the pixels' pipeline
    names Blosc-LZ4 (filter 32001, cd_values as hdf5plugin.Blosc(cname='lz4') stores them) and their
    chunks are written raw, so reading them needs the filter exactly as a real file does."""
    write_hdf5writer(path, [{k: v for k, v in ep.items() if k != "pixels"} for ep in episodes])
    frames = np.concatenate([ep["pixels"] for ep in episodes])
    with h5py.File(path, "r+") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((100, *frames.shape[1:]))
        dcpl.set_filter(32001, h5py.h5z.FLAG_OPTIONAL, (2, 2, 1, 0, 5, 1, 1))
        space = h5py.h5s.create_simple(frames.shape)
        pixels = h5py.Dataset(h5py.h5d.create(f.id, b"pixels", h5py.h5t.NATIVE_UINT8, space, dcpl=dcpl))
        for start in range(0, len(frames), 100):
            pixels.id.write_direct_chunk((start, 0, 0, 0), frames[start : start + 100].tobytes())
    return path


def test_compressed_pixels_without_hdf5plugin_are_one_line_naming_filter_and_package(tmp_path):
    src = write_blosc_pixels_without_the_plugin(tmp_path / "early.h5", collect())
    script = ("import sys; sys.modules['hdf5plugin'] = None; from lejepa_cli.cli import main; "
              "main(sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "HDF5_PLUGIN_PATH"}  # HDF5 must not find the plugin itself
    for args in (["data", "prepare", str(src), "--out", str(tmp_path / "p")],
                 ["train", "--preset", "world-tworoom", "--data", str(src), "--out", str(tmp_path / "r")]):
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300)
        err = " ".join(done.stderr.split())
        assert done.returncode == 2, done.stderr
        assert "'pixels' is compressed with Blosc-LZ4 (HDF5 filter 32001)" in err and "pip install hdf5plugin" in err
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # `data info` still describes it, and says what it would take to read the frames
    done = subprocess.run([sys.executable, "-c", script, "data", "info", str(src)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Blosc-LZ4 (not decodable here: pip install hdf5plugin)" in " ".join(done.stdout.split())


def test_missing_pylance_and_broken_lance_datasets_are_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "empty.lance"
    broken.mkdir()
    assert is_trajectory_source(broken)
    if not _has("lance"):
        pytest.skip("pylance is not installed (pip install 'lejepa-cli[lance]')")
    with pytest.raises(UserError, match="empty.lance is not a readable Lance dataset"):
        load_trajectories(broken, "train")
    src, _ = write_layout("swm-lance", tmp_path)
    monkeypatch.setitem(sys.modules, "lance", None)  # import lance -> ImportError
    with pytest.raises(UserError, match=r"reading Lance datasets needs pylance: pip install pylance"):
        load_trajectories(src, "train")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------
# `lejepa data info FILE`


@pytest.mark.parametrize("layout", ["swm-0.1.1", "swm-current", "swm-lance"])
def test_data_info_describes_a_raw_file(layout, tmp_path, capsys):
    src, episodes = write_layout(layout, tmp_path)
    code, out, err = cli(["data", "info", src, "--verify"], capsys)
    assert code in (0, None), err
    text = " ".join(out.replace("\u2502", " ").split())  # the table's row: label, value
    rows = sum(len(ep["action"]) for ep in episodes)
    for part in ("8 (boundaries from", f"steps {rows};", "16 x 16 x 3 uint8", "action width 2",
                 "state width 6 (state_0, state_1, state_2, state_3, proprio_0, proprio_1)"):
        assert part in text, (part, text)
    assert ("8, each episode's last: read as 0" in text) == (layout != "swm-0.1.1")
    assert ("step_idx starts at 1" in text) == (layout == "swm-0.1.1")
    assert "verified: every frame decodes" in err and f"lejepa data prepare {src} --out DIR" in " ".join(err.split())
    assert "not a prepared dataset" not in err


def test_data_info_and_prepare_of_a_missing_trajectory_file_say_so(tmp_path, capsys):
    for name in ("gone.h5", "gone.lance", "gone.npz"):
        code, _, err = cli(["data", "info", tmp_path / name], capsys)
        assert code == 2 and f"{tmp_path / name} does not exist" in " ".join(err.split()) and "--out" not in err
    for name in ("gone.h5", "gone.lance"):
        code, _, err = cli(["data", "prepare", tmp_path / name, "--out", tmp_path / "p"], capsys)
        assert code == 2 and f"trajectory file {tmp_path / name} does not exist" in " ".join(err.split())


# ------------------------------------------------------------------------------------------------
# stable-worldmodel's own writers, where it is installed


@pytest.mark.parametrize("fmt", ["hdf5", "lance"])
def test_files_from_stable_worldmodels_own_writers(fmt, tmp_path):
    """The writers themselves (HDF5Writer / LanceWriter), fed the episodes World.collect builds."""
    module = pytest.importorskip(f"stable_worldmodel.data.formats.{fmt}", reason="stable-worldmodel is not installed")
    episodes = collect()
    src = tmp_path / f"own.{'h5' if fmt == 'hdf5' else 'lance'}"
    writer = module.HDF5Writer if fmt == "hdf5" else module.LanceWriter
    with writer(src, mode="overwrite") as w:
        w.write_episodes([{k: list(v) for k, v in ep.items()} for ep in episodes])
    want = expected(episodes, lance=fmt == "lance")
    ds = load_trajectories(src, "train")
    np.testing.assert_array_equal(ds.frames[np.arange(len(ds))], want["frames"])
    np.testing.assert_array_equal(ds.actions, want["actions"])
    np.testing.assert_array_equal(ds.state, want["state"])
    assert ds.zeroed_rows == len(STEPS)
    check_alignment(ds)
