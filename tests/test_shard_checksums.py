"""Training verifies each shard against index.json's sha256 when it first opens it; old datasets
without checksums still load, with one note."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lejepa_cli.data import shards
from lejepa_cli.data.prepare import prepare
from lejepa_cli.world.prepare import simulate_dataset
from tests.cli_run import invoke
from tests.conftest import TINY
from tests.data_fixtures import make_image_folder
from tests.test_world_train import TINY_WORLD


def _flip_a_pixel(shard: Path) -> None:
    """Change one byte inside the frames (past the .npy header): the file still loads as before."""
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    np.load(shard, mmap_mode="r", allow_pickle=False)  # the damage is silent to the .npy reader


def _sets(options: list[str], *extra: str) -> list[str]:
    return [x for o in [*options, *extra] for x in ("--set", o)]


def _one_line(err: str) -> str:
    """The one error line, last (after the run's description line), and no traceback."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert sum(x.startswith("error:") for x in lines) == 1 and lines[-1].startswith("error:"), err
    assert "Traceback" not in err
    return lines[-1]


def test_a_flipped_byte_in_a_frame_shard_stops_world_training_naming_the_shard(tmp_path, capsys):
    data = tmp_path / "world"
    simulate_dataset("two-room", data, episodes=4, steps=16, val_episodes=2, size=16, seed=0, progress=False)
    shard = data / "train" / "frames-00000.npy"
    _flip_a_pixel(shard)
    code, _, err = invoke(["train", "--preset", "world-tworoom", "--data", data, "--out", tmp_path / "run",
                           "--no-progress", *_sets(TINY_WORLD, "train.steps=2", "train.eval_every=0")], capsys)
    line = _one_line(err)
    assert code == 2 and f"shard {shard} does not match its checksum" in line


def test_a_flipped_byte_in_an_image_shard_stops_training_naming_the_shard(tmp_path, capsys):
    data = tmp_path / "prepared"
    prepare(make_image_folder(tmp_path / "imgs", per_class=8), data, resolution=16, progress=False)
    shard = data / "train" / shards.shard_name(0)
    _flip_a_pixel(shard)
    code, _, err = invoke(["train", "--preset", "demo", "--data", data, "--out", tmp_path / "run", "--no-progress",
                           *_sets([o for o in TINY if not o.startswith("data.")], "train.steps=1")], capsys)
    assert code == 2 and f"shard {shard} does not match its checksum" in _one_line(err)


def test_a_dataset_without_checksums_loads_and_says_so_once(tmp_path, capsys):
    data = tmp_path / "prepared"
    prepare(make_image_folder(tmp_path / "imgs", per_class=4), data, resolution=16, progress=False)
    index = json.loads((data / "index.json").read_text())
    for split in index["splits"].values():
        for s in split["shards"]:
            del s["sha256"]  # as an older writer left it
    (data / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    first = shards.load_prepared(data, "train")
    again = shards.load_prepared(data, "train")
    assert first.images[np.arange(len(first))].shape == (len(first), 16, 16, 3)  # read, unverified
    assert len(again) == len(first)
    err = capsys.readouterr().err
    assert err.count("has shards without checksums") == 1 and "read without verification" in err
    assert any("no checksum" in p for p in shards.verify(data))


def test_verify_benchmark_reports_seconds_per_gb():
    from benchmarks import bench_verify

    got = bench_verify.run(total=4 << 20)
    assert got["bytes"] >= 4 << 20 and got["shards"] == 1
    for case in ("warm", "cold"):
        assert got[case]["s_per_gb"] > 0 and got[case]["gb_per_s"] > 0
