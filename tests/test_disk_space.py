"""Free disk space is checked before `world simulate`, `data prepare`, `embed` and `export` write anything."""

from __future__ import annotations

import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from lejepa_cli.data import disk
from tests.cli_run import invoke
from tests.data_fixtures import make_image_folder

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int) -> None:
    """The filesystem reports `free` bytes free (a real tiny disk cannot be mounted here)."""
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - free, free))


def _one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_world_simulate_larger_than_the_free_disk_refuses_before_writing(tmp_path, monkeypatch, capsys):
    _free(monkeypatch, 50_000_000)
    out = tmp_path / "sim"
    code, _, err = invoke(["world", "simulate", "two-room", "--out", out, "--episodes", 1000, "--steps", 100,
                           "--size", 32, "--no-progress"], capsys)
    line = _one_error_line(err)
    assert code == 2
    # 1040 episodes x 100 frames of 32 x 32 x 3 bytes (+ actions and state): ~320 MB
    assert "the trajectory dataset (104000 frames of 32x32x3) needs about 3" in line and "50.0 MB free" in line
    assert not out.exists()


def test_world_simulate_that_fits_still_writes(tmp_path, monkeypatch, capsys):
    _free(monkeypatch, 50 << 20)
    code, _, err = invoke(["world", "simulate", "two-room", "--out", tmp_path / "sim", "--episodes", 2, "--steps", 10,
                           "--val-episodes", 1, "--size", 16, "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "sim" / "index.json").is_file()


def test_data_prepare_refuses_before_writing(tmp_path, monkeypatch, capsys):
    src = make_image_folder(tmp_path / "imgs", per_class=4)
    _free(monkeypatch, 1000)
    out = tmp_path / "prepared"
    code, _, err = invoke(["data", "prepare", src, "--out", out, "--resolution", 32], capsys)
    line = _one_error_line(err)
    assert code == 2 and re.search(r"the prepared dataset \(\d+ images of 32x32x3\) needs about [\d.]+ kB", line)
    assert not out.exists() or not any(out.rglob("*.npy"))


def _tiny_export(path: Path) -> Path:
    from lejepa_cli.export import export_backbone
    from lejepa_cli.models import build_backbone

    net = build_backbone("vit_micro", img_size=32, patch_size=8, in_chans=3)
    export_backbone(net, path, mean=[0.5] * 3, std=[0.25] * 3)
    return path


def test_export_and_embed_refuse_before_writing(tmp_path, monkeypatch, capsys):
    exported = _tiny_export(tmp_path / "enc")
    weights = (exported / "model.safetensors").stat().st_size
    _free(monkeypatch, weights // 2)
    code, _, err = invoke(["export", exported, "--out", tmp_path / "again"], capsys)
    assert code == 2 and "the export (model.safetensors) needs about" in _one_error_line(err)
    assert not (tmp_path / "again").exists()

    src = make_image_folder(tmp_path / "imgs", per_class=4)
    _free(monkeypatch, 100)
    out = tmp_path / "emb.npy"
    code, _, err = invoke(["embed", exported, src, "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert code == 2 and re.search(r"the embeddings \(\d+ x \d+ float32\) needs about", _one_error_line(err))
    assert not out.exists() and not list(tmp_path.glob(".emb*"))


def test_free_bytes_measures_the_nearest_existing_folder(tmp_path):
    free, folder = disk.free_bytes(tmp_path / "not" / "yet" / "there.npy")
    assert folder == tmp_path and free == shutil.disk_usage(tmp_path).free
