"""The damaged-input matrix: every command x every file-valued argument x every way a file goes bad
ends in exit 2, exactly one line on stderr, no traceback, and nothing written where the command writes.

A SLOT is one file-valued argument of one command: a valid invocation built from the session's
tiny artefacts (conftest.py `artefacts`), and the file in it that gets damaged (the argument
itself, or the file inside a folder argument that the command reads: a run's checkpoint, an
export's weights or config, a dataset's index or actions). Each DAMAGE turns that file into
something else: missing, empty, truncated (an interrupted copy), a directory, a FIFO (must never
be opened: reading one waits forever), a file of another kind, or one without read permission.
The valid invocation itself is checked to run (exit 0) once per slot, so a case cannot pass by
failing for an unrelated reason. Cases run in this process (cli_run.invoke), a few ms each.
Grow it: add a slot for each new file-valued argument (see docs/guarantees.md).
"""

from __future__ import annotations

import io
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from cli_run import invoke
from conftest import TINY
from artifacts import WORLD_RUN

SETS_IMAGE = [x for kv in TINY + ["train.steps=1", "train.save_every=1"] for x in ("--set", kv)]
SETS_WORLD = [x for kv in WORLD_RUN + ["train.steps=1", "train.save_every=1"] for x in ("--set", kv)]
PROBE = ["--epochs", "1", "--no-shift", "--no-conditions", "--no-cache", "--no-progress", "--device", "cpu"]
WORLD = ["-n", "2", "--steps", "16"]
CEM = ["--candidates", "8", "--iterations", "1", "--elites", "2", "--horizon", "2", "--budget", "4"]


@dataclass(frozen=True)
class Slot:
    """`argv(paths, out)` is a valid invocation; `artefact`'s copy is in paths[artefact]; `target` the
    file damaged (relative to that copy; "" is the copy itself)."""

    name: str
    artefact: str
    target: str
    argv: Callable[[dict, Path], list]


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _goal_png(paths: dict, out: Path) -> Path:
    if "goal" not in paths:
        paths["goal"] = out.parent / "goal.png"
        Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(paths["goal"])
    return paths["goal"]


SLOTS = [
    # image training, probing and the rest
    Slot("train --data NPZ", "npz", "", lambda p, o: ["train", "--out", o / "run", "--data", p["npz"], *SETS_IMAGE]),
    Slot("train --data PREPARED (index)", "prepared", "index.json",
         lambda p, o: ["train", "--out", o / "run", "--data", p["prepared"], *SETS_IMAGE]),
    Slot("train --resume CKPT", "run", "checkpoints/step-000000002.safetensors",
         lambda p, o: ["train", "--out", o / "run", "--resume", p["run"] / "checkpoints/step-000000002.safetensors"]),
    Slot("train --init-from EXPORT (weights)", "export", "model.safetensors",
         lambda p, o: ["train", "--out", o / "run", "--init-from", p["export"], *SETS_IMAGE]),
    Slot("train --init-from EXPORT (config)", "export", "config.json",
         lambda p, o: ["train", "--out", o / "run", "--init-from", p["export"], *SETS_IMAGE]),
    Slot("probe CKPT", "checkpoint", "", lambda p, o: ["probe", p["checkpoint"], "--json", o / "r.json", *PROBE]),
    Slot("probe RUN (checkpoint)", "run", "checkpoints/step-000000002.safetensors",
         lambda p, o: ["probe", p["run"], "--json", o / "r.json", *PROBE]),
    Slot("probe EXPORT (weights)", "export", "model.safetensors",
         lambda p, o: ["probe", p["export"], "--json", o / "r.json", "--data", p["npz"], *PROBE]),
    Slot("probe EXPORT (config)", "export", "config.json",
         lambda p, o: ["probe", p["export"], "--json", o / "r.json", "--data", p["npz"], *PROBE]),
    Slot("probe --data NPZ", "npz", "",
         lambda p, o: ["probe", p["export"], "--data", p["npz"], "--json", o / "r.json", *PROBE]),
    Slot("viz CKPT", "checkpoint", "",
         lambda p, o: ["viz", p["checkpoint"], "--out", o / "viz", "--num-images", "2", "--device", "cpu"]),
    Slot("viz --image", "goal", "",
         lambda p, o: ["viz", p["export"], "--out", o / "viz", "--image", _goal_png(p, o), "--device", "cpu"]),
    Slot("export CKPT", "checkpoint", "", lambda p, o: ["export", p["checkpoint"], "--out", o / "x"]),
    Slot("export EXPORT (weights)", "export", "model.safetensors", lambda p, o: ["export", p["export"], "--out", o / "x"]),
    Slot("embed EXPORT (weights)", "export", "model.safetensors",
         lambda p, o: ["embed", p["export"], p["npz"], "--out", o / "e.npy", "--no-progress", "--device", "cpu"]),
    Slot("embed DATA NPZ", "npz", "",
         lambda p, o: ["embed", p["export"], p["npz"], "--out", o / "e.npy", "--no-progress", "--device", "cpu"]),
    Slot("adapt CKPT", "checkpoint", "", lambda p, o: ["adapt", p["checkpoint"], "--data", p["npz"], "--out", o / "x",
                                                       "--steps", "1", "--batch-size", "8", "--device", "cpu"]),
    Slot("adapt --data NPZ", "npz", "", lambda p, o: ["adapt", p["export"], "--data", p["npz"], "--out", o / "x",
                                                      "--steps", "1", "--batch-size", "8", "--device", "cpu"]),
    Slot("data prepare NPZ", "npz", "", lambda p, o: ["data", "prepare", p["npz"], "--out", o / "prep", "--workers", "0"]),
    Slot("data info PREPARED (index)", "prepared", "index.json", lambda p, o: ["data", "info", p["prepared"]]),
    Slot("train --preset YAML", "preset", "",
         lambda p, o: ["train", "--preset", p["preset"], "--out", o / "run", *SETS_IMAGE]),
    # world models
    Slot("train --data TRAJECTORY NPZ", "traj_npz", "",
         lambda p, o: ["train", "--preset", "world-tworoom", "--out", o / "run", "--data", p["traj_npz"],
                       "--set", "data.val_fraction=0.34", *SETS_WORLD]),
    Slot("data prepare TRAJECTORY NPZ", "traj_npz", "",
         lambda p, o: ["data", "prepare", p["traj_npz"], "--out", o / "prep", "--val-fraction", "0.34"]),
    Slot("data info TRAJECTORY NPZ", "traj_npz", "", lambda p, o: ["data", "info", p["traj_npz"]]),
    Slot("data prepare HDF5", "traj_h5", "",
         lambda p, o: ["data", "prepare", p["traj_h5"], "--out", o / "prep", "--val-fraction", "0.34"]),
    Slot("data info HDF5", "traj_h5", "", lambda p, o: ["data", "info", p["traj_h5"]]),
    Slot("train --data WORLD (index)", "world_data", "index.json",
         lambda p, o: ["train", "--preset", "world-tworoom", "--out", o / "run", "--data", p["world_data"], *SETS_WORLD]),
    Slot("train --data WORLD (actions)", "world_data", "train/actions.npy",
         lambda p, o: ["train", "--preset", "world-tworoom", "--out", o / "run", "--data", p["world_data"], *SETS_WORLD]),
    Slot("train --data WORLD (episode starts)", "world_data", "train/episode_starts.npy",
         lambda p, o: ["train", "--preset", "world-tworoom", "--out", o / "run", "--data", p["world_data"], *SETS_WORLD]),
    Slot("data info WORLD (index)", "world_data", "index.json", lambda p, o: ["data", "info", p["world_data"]]),
    Slot("export WORLD CKPT", "world_checkpoint", "", lambda p, o: ["export", p["world_checkpoint"], "--out", o / "x"]),
    Slot("world probe EXPORT (world weights)", "world_export", "world.safetensors",
         lambda p, o: ["world", "probe", p["world_export"], *WORLD, "--json", o / "w.json"]),
    Slot("world probe EXPORT (weights)", "world_export", "model.safetensors",
         lambda p, o: ["world", "probe", p["world_export"], *WORLD, "--json", o / "w.json"]),
    Slot("world probe EXPORT (config)", "world_export", "config.json",
         lambda p, o: ["world", "probe", p["world_export"], *WORLD, "--json", o / "w.json"]),
    Slot("world surprise CKPT", "world_checkpoint", "",
         lambda p, o: ["world", "surprise", p["world_checkpoint"], *WORLD, "--plot", o / "s.png"]),
    Slot("world stress RUN (checkpoint)", "world_run", "checkpoints/step-000000002.safetensors",
         lambda p, o: ["world", "stress", p["world_run"], *WORLD, "--plan-episodes", "0", "-c", "pixel noise",
                       "--json", o / "st.json"]),
    Slot("world plan --goal", "goal", "", lambda p, o: ["world", "plan", p["world_export"], "-n", "1", *CEM,
                                                        "--goal", _goal_png(p, o), "--json", o / "p.json"]),
]
DAMAGES = ["missing", "empty", "truncated", "directory", "fifo", "wrong kind", "no permission"]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how != "no permission":
        path.unlink()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "directory":
        path.mkdir()
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "wrong kind":  # a PNG where data is expected; a JSON document where an image is
        path.write_bytes(b'{"not": "an image"}\n' if data.startswith(b"\x89PNG") else _png_bytes())
    elif how == "no permission":
        path.chmod(0)


def _copy(artefacts: dict, tmp: Path, damaged: str) -> dict:
    """The artefacts, with a copy of the one to be damaged (the others are only read)."""
    paths = dict(artefacts)
    key = {"checkpoint": "run", "world_checkpoint": "world_run"}.get(damaged, damaged)
    if artefacts.get(key) is not None:
        src = artefacts[key]
        paths[key] = tmp / "in" / src.name
        paths[key].parent.mkdir()
        (shutil.copytree if src.is_dir() else shutil.copy)(src, paths[key])
    paths["checkpoint"] = paths["run"] / artefacts["checkpoint"].relative_to(artefacts["run"])
    paths["world_checkpoint"] = paths["world_run"] / artefacts["world_checkpoint"].relative_to(artefacts["world_run"])
    return paths


class FifoWatch:
    """Opens the FIFO's write end whenever a reader waits on it, so a reader that should never have
    opened it gets EOF instead of hanging the test; `blocked` says that happened."""

    def __init__(self, path: Path):
        self.path, self.blocked, self.done = path, False, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.05):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue  # no reader (ENXIO), or no FIFO any more
            self.blocked = True
            os.close(fd)

    def stop(self) -> bool:
        self.done.set()
        self.thread.join()
        return self.blocked


def _run_slot(slot: Slot, paths: dict, out: Path, capsys) -> tuple[int, str]:
    if paths.get(slot.artefact, "") is None:
        pytest.skip(f"{slot.artefact}: needs an optional package (h5py)")
    out.mkdir()
    argv = slot.argv(paths, out)  # builds the goal image when the slot needs one
    return invoke(argv, capsys)[::2]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # a command that writes a default path writes it here


def _distinct(slots: list[Slot]) -> list[Slot]:
    """One slot per distinct valid invocation (several slots damage different files of one)."""
    fake = {k: Path(k) for k in ("npz", "prepared", "run", "export", "world_data", "world_run", "world_export",
                                 "checkpoint", "world_checkpoint", "goal", "traj_npz", "traj_h5", "preset")}
    seen: dict[tuple, Slot] = {}
    for slot in slots:
        seen.setdefault(tuple(map(str, slot.argv(fake, Path("out")))), slot)
    return list(seen.values())


VALID = _distinct(SLOTS)


@pytest.mark.parametrize("slot", VALID, ids=[s.name for s in VALID])
def test_the_valid_invocation_runs(slot, artefacts, tmp_path, capsys):
    paths = _copy(artefacts, tmp_path, slot.artefact)
    code, err = _run_slot(slot, paths, tmp_path / "out", capsys)
    assert code == 0, err


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("slot", SLOTS, ids=[s.name for s in SLOTS])
def test_a_damaged_input_is_one_line_exit_2_and_nothing_written(slot, damage, artefacts, tmp_path, capsys):
    if damage == "no permission" and os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    paths = _copy(artefacts, tmp_path, slot.artefact)
    if paths.get(slot.artefact, "") is None:
        pytest.skip(f"{slot.artefact}: needs an optional package (h5py)")
    out = tmp_path / "out"
    if slot.artefact == "goal":
        _goal_png(paths, out)
    target = paths[slot.artefact] / slot.target if slot.target else paths[slot.artefact]
    _damage(target, damage)
    watch = FifoWatch(target) if damage == "fifo" else None
    try:
        code, err = _run_slot(slot, paths, out, capsys)
    finally:
        if damage == "no permission":
            target.chmod(0o644)
    assert not (watch and watch.stop()), f"{slot.name}: the command opened the FIFO {target} and waited on it"
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error:"), err
    assert code == 2, err
    assert not [p for p in out.rglob("*")], f"written despite the error: {list(out.rglob('*'))}"


class _Payload:
    """Unpickling this creates the folder `marker`: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_an_npy_that_would_need_pickle_is_damaged_and_never_unpickled(artefacts, tmp_path, capsys):
    """The issue's case: a corrupt actions.npy said to pass allow_pickle; it must say the file is damaged."""
    data, marker = tmp_path / "data", tmp_path / "unpickled"
    shutil.copytree(artefacts["world_data"], data)
    with open(data / "train" / "actions.npy", "wb") as f:
        np.save(f, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    code, _, err = invoke(["train", "--preset", "world-tworoom", "--out", tmp_path / "run", "--data", data,
                           *SETS_WORLD], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "actions.npy" in lines[0] and "damaged" in lines[0] and "allow_pickle" not in lines[0]
    assert not marker.exists() and not (tmp_path / "run").exists()
