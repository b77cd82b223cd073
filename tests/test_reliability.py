"""Runs survive damaged, foreign and missing files, a full or read-only disk, and bad data; kills and
non-finite numbers are in test_training_faults.py, which shares this module's helpers.

Subprocesses run with OMP_NUM_THREADS=1: on a loaded 2-core machine two OpenMP threads spin
against each other and a 0.1 s step takes seconds. The in-process tests use one thread for the
same reason (restored after each test).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

import lejepa_cli.checkpoint as checkpoint_mod
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint
from lejepa_cli.cli import main
from lejepa_cli.config import load_config
from lejepa_cli.train import train

REPO = Path(__file__).resolve().parents[1]
# TINY made cheaper still: 8 images a step, global views only, 2x2 patches of 8 px.
FAST = TINY + ["train.batch_size=8", "views.local_views=0", "model.patch_size=8",
               "data.builtin_train=32", "data.builtin_val=16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "400", "LEJEPA_DEBUG": "0"}
TEMP = re.compile(r"^\.")  # a write in progress: safetensors' .tmpXXXX, then our .step-*.tmp-PID


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _cli_on_one_thread(monkeypatch):
    """A CLI run in this process takes its thread count from the environment (threads.apply_default):
    pinned like the in-process runs, a resumed run is compared with one made on as many threads (under
    OMP_NUM_THREADS=2 the CLI would otherwise train on 2 and leave torch there for the next test)."""
    monkeypatch.setenv("LEJEPA_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(1)


def fast(*extra: str) -> list[str]:
    return FAST + list(extra)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def step_records(run: Path) -> list[dict]:
    """metrics.jsonl lines of training steps, without the timing fields that differ run to run."""
    timing = {"images_per_s", "data_wait", "train_s"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in x.items() if k not in timing} for x in lines]


def newest_step(run: Path) -> int:
    ckpts = list_checkpoints(run / "checkpoints")
    return int(ckpts[-1].name[5:14]) if ckpts else 0


def temp_files(run: Path) -> set[str]:
    folder = run / "checkpoints"
    return {e.name for e in os.scandir(folder) if TEMP.match(e.name)} if folder.is_dir() else set()


def one_error_line(text: str) -> str:
    """The single non-empty line of `text`, which must be an error line without a traceback."""
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


def squash(text: str) -> str:
    """`text` without whitespace: rich wraps long lines (paths included) at the console width."""
    return "".join(text.split())


def final_error_line(text: str) -> str:
    """The last line of a run's stderr, which must be its only error line, without a traceback."""
    lines = [x for x in text.splitlines() if x.strip()]
    assert "Traceback" not in text and lines and lines[-1].startswith("error: "), text
    assert sum(x.startswith("error:") for x in lines) == 1, text
    return lines[-1]


def run_cli(capsys, *argv: str | Path) -> tuple[int, str]:
    """`lejepa ARGV` in this process: (exit code, stderr). Anything but SystemExit fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return int(exit_info.value.code or 0), capsys.readouterr().err


# ---- damaged, foreign and missing files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (treated as read-only by the tests)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_config("demo", fast()), run, progress=False)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000002.safetensors", "step-000000004.safetensors"]
    return run


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def damaged_files(good: Path, folder: Path) -> dict[str, Path]:
    """Every way a checkpoint can be broken or not be one, as files in `folder`."""
    import pickle
    import struct
    import zipfile

    from safetensors.torch import save_file

    data, rng = good.read_bytes(), random.Random(7)
    end = header_end(data)
    step_value = data.index(b'"step":"') + len(b'"step":"')  # the digit of metadata "step": "4"
    variants: dict[str, bytes | None] = {
        "truncated-half": data[: len(data) // 2],
        "truncated-in-header": data[: end // 2],
        "truncated-last-byte": data[:-1],
        "empty": b"",
        "five-bytes": data[:5],
        "header-claims-10GB": struct.pack("<Q", 10 << 30) + data[8:4096],
        "header-not-json": struct.pack("<Q", 64) + bytes(range(64)) + data[end:],
        "metadata-step-4-to-5": flip(data, step_value),  # still valid JSON: only the checksum sees it
        "text": b"these are my notes, not a checkpoint\n",
        "pickle": pickle.dumps({"model": [1.0, 2.0]}, protocol=4),
        "directory": None,
    }
    for key in ("config", "data", "backbone", "format"):  # each metadata value left as text that is not JSON
        start = data.index(f'"{key}":"'.encode()) + len(f'"{key}":"')
        variants[f"metadata-{key}-not-json"] = flip(data, start, 5)  # its opening brace or quote, changed
    for k in range(3):
        variants[f"bitflip-tensor-data-{k}"] = flip(data, rng.randrange(end, len(data)), rng.randrange(8))
        variants[f"bitflip-header-{k}"] = flip(data, rng.randrange(8, end), rng.randrange(8))
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, content in variants.items():
        path = folder / f"{name}.safetensors"
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        out[name] = path
    with zipfile.ZipFile(folder / "zip.safetensors", "w") as z:  # what torch.save writes: a zip around a pickle
        z.writestr("archive/data.pkl", pickle.dumps({"w": [0.0]}))
    out["zip-pickle"] = folder / "zip.safetensors"
    save_file({"w": torch.zeros(3)}, str(folder / "other-safetensors.safetensors"), metadata={"format": "pt"})
    out["safetensors-not-ours"] = folder / "other-safetensors.safetensors"
    out["missing"] = folder / "missing.safetensors"
    return out


def test_damaged_checkpoints_are_one_line_errors_for_every_command(trained, tmp_path, capsys):
    files = damaged_files(trained / "checkpoints" / "step-000000004.safetensors", tmp_path / "bad")
    commands = {
        "train --resume": lambda f, o: ["train", "--resume", f, "--out", o, "--no-progress"],
        "probe": lambda f, o: ["probe", f, "--no-progress", "--device", "cpu", "--no-cache"],
        "export": lambda f, o: ["export", f, "--out", o],
    }
    tried = 0
    for name, path in files.items():
        for command, argv in commands.items():
            out = tmp_path / "out" / f"{name}-{command.split()[0]}"
            code, err = run_cli(capsys, *argv(path, out))
            line = one_error_line(err)
            assert code == 2, (name, command, line)
            assert not out.exists() or not any(out.iterdir()), (name, command)  # nothing written
            tried += 1
    assert tried == len(files) * 3 >= 60
    print(f"\ndamaged files tried: {len(files)} kinds x {len(commands)} commands = {tried}, all one-line errors")


def test_resume_into_another_architecture_is_one_line(trained, tmp_path, capsys):
    ckpt = trained / "checkpoints" / "step-000000004.safetensors"
    for override in ("model.patch_size=4", "model.arch=resnet18", "model.proj_dim=8"):
        code, err = run_cli(capsys, "train", "--resume", ckpt, "--out", tmp_path / "o", "--set", override, "--no-progress")
        line = one_error_line(err)
        assert code == 2 and "checkpoint does not fit this model" in line, line
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    code, err = run_cli(capsys, "train", "--resume", "auto", "--out", run, "--set", "model.arch=resnet18", "--no-progress")
    assert code == 2 and "does not fit this model (backbone)" in one_error_line(err)
    assert len(list_checkpoints(run / "checkpoints")) == 2  # nothing deleted


def copy_with_damaged_newest(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the trained run whose newest checkpoint has one bit flipped in its tensor data: (run, newest)."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = run / "checkpoints" / "step-000000004.safetensors"
    data = newest.read_bytes()
    newest.write_bytes(flip(data, len(data) - 100))
    return run, newest


def test_auto_resume_skips_a_damaged_newest_checkpoint_and_ends_identical(trained, tmp_path, capsys):
    run, newest = copy_with_damaged_newest(trained, tmp_path)
    capsys.readouterr()
    train(load_config("demo", fast()), run, progress=False, resume="auto")
    err = squash(capsys.readouterr().err)
    assert squash(f"skipping damaged checkpoint: {newest} is damaged") in err
    assert squash(f"resuming from {run / 'checkpoints' / 'step-000000002.safetensors'} at step 2") in err
    assert_identical(tensors_of(newest), tensors_of(trained / "checkpoints" / newest.name))  # redone exactly


def test_auto_resume_refuses_when_no_checkpoint_loads(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for ckpt in list_checkpoints(run / "checkpoints"):
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    code, err = run_cli(capsys, "train", "--resume", "auto", "--out", run, "--no-progress")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and sum("skipping damaged checkpoint" in x for x in lines) == 2
    assert lines[-1].startswith("error: none of the 2 checkpoints") and "--overwrite" in lines[-1]
    assert all(p.stat().st_size == 1000 for p in list_checkpoints(run / "checkpoints"))  # left for the user


def test_cli_auto_resume_warns_once_per_damaged_checkpoint_and_ends_identical(trained, tmp_path, capsys):
    """The CLI scans the checkpoints once: one warning for the damaged file, then the same run as before."""
    run, newest = copy_with_damaged_newest(trained, tmp_path)  # its summary.json says step 4: not finished now
    code, err = run_cli(capsys, "train", "--resume", "auto", "--out", run, "--no-progress")
    assert code == 0 and err.count("skipping damaged checkpoint") == 1, err
    assert_identical(tensors_of(newest), tensors_of(trained / "checkpoints" / newest.name))


def test_resume_auto_on_a_finished_run_leaves_it_alone(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    code, err = run_cli(capsys, "train", "--resume", "auto", "--out", run, "--no-progress", "--set", "train.steps=4")
    assert code == 0
    assert squash(f"already finished at step 4 (summary in {run / 'summary.json'})") in squash(err)
    assert {name: (run / name).read_bytes() for name in before} == before
    # The library call does the same; a longer train.steps continues the run.
    assert train(load_config("demo", fast()), run, progress=False, resume="auto") == json.loads(before["summary.json"])
    assert {name: (run / name).read_bytes() for name in before} == before
    summary = train(load_config("demo", fast("train.steps=5")), run, progress=False, resume="auto")
    assert summary["step"] == 5


def test_conflicting_resume_flags_are_one_line_errors(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, err = run_cli(capsys, "train", "--resume", "auto", "--overwrite", "--out", run, "--no-progress")
    assert code == 2 and "give only one" in one_error_line(err) and "--overwrite" in err
    code, err = run_cli(capsys, "train", "--preset", "vit-s", "--resume", "auto", "--out", run, "--no-progress")
    line = one_error_line(err)
    assert code == 2 and "--preset vit-s differs from the config stored in" in line and "model.arch" in line
    assert "drop --preset" in line
    assert (run / "summary.json").read_bytes() == (trained / "summary.json").read_bytes()


def test_resume_auto_on_an_empty_folder_says_it_starts_a_new_run(tmp_path, capsys):
    out = tmp_path / "fresh"
    code, err = run_cli(capsys, "train", "--resume", "auto", "--out", out, "--no-progress", *sum((["--set", o] for o in fast()), []))
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 0 and lines[0] == f"nothing to resume in {out}: starting a new run"
    assert list_checkpoints(out / "checkpoints")


def test_out_that_is_a_file_is_a_one_line_usage_error(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("mine")
    for out in (target, target / "sub"):
        code, err = run_cli(capsys, "train", "--out", out, "--no-progress", *sum((["--set", o] for o in fast()), []))
        assert code == 2 and "is not a folder" in one_error_line(err)
    assert target.read_text() == "mine"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_get_the_mode_other_files_get(tmp_path, umask):
    from lejepa_cli.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "c.safetensors", {"x": torch.zeros(2)}, {"step": 1})
        (tmp_path / "other.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.safetensors").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "c.safetensors").stat().st_mode == (tmp_path / "other.json").stat().st_mode


# ---- full disk, read-only folder ------------------------------------------------------------------------


def _failing_save(monkeypatch, error: Exception, after: int) -> None:
    """safetensors' save_file writes part of the file and then fails, from the `after`+1-th call on."""
    real, calls = checkpoint_mod.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) <= after:
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 4096)  # a partial write, then the disk is full
        raise error

    monkeypatch.setattr(checkpoint_mod, "save_file", save_file)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    checkpoint_mod.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
], ids=["oserror", "safetensors-error"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, error):
    _failing_save(monkeypatch, error, after=1)
    sets = [a for o in fast() for a in ("--set", o)]
    code, err = run_cli(capsys, "train", "--out", tmp_path / "run", "--no-progress", *sets)
    line = final_error_line(err)
    assert code == 1 and "could not write checkpoint" in line and "No space left on device" in line
    assert "step-000000004" in line and "the previous checkpoints are intact" in line
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000000002.safetensors"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step-000000002.safetensors")[1]["step"] == 2
    assert not temp_files(tmp_path / "run")


def _make_read_only(folder: Path, monkeypatch) -> str:
    """Make `folder` refuse new files: chmod (not root), chattr +i (root), else a simulated EROFS."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return "chmod"
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return "chattr"
    _failing_save(monkeypatch, OSError(errno.EROFS, "Read-only file system"), after=0)
    return "simulated"


def test_read_only_checkpoint_folder_ends_the_run_cleanly(trained, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in list_checkpoints(run / "checkpoints")}
    how = _make_read_only(run / "checkpoints", monkeypatch)
    try:
        code, err = run_cli(capsys, "train", "--resume", "auto", "--out", run, "--set", "train.steps=6", "--no-progress")
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(run / "checkpoints")], check=True)
        (run / "checkpoints").chmod(0o755)
    line = final_error_line(err)
    assert code == 1 and "could not write checkpoint" in line and "step-000000006" in line, (how, line)
    assert {p.name: p.read_bytes() for p in list_checkpoints(run / "checkpoints")} == before
    assert not temp_files(run)


# ---- bad data (test_data_prepare.py covers corrupt files, pixel-limit skips, the info/verify functions) ------


def _png_claiming(width: int, height: int) -> bytes:
    """A 4x4 PNG whose header says width x height (CRC fixed): a decompression bomb's calling card."""
    import io
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_images_claiming_absurd_sizes_are_refused_without_decoding(trained, tmp_path, capsys):
    from PIL import Image

    from lejepa_cli.data.prepare import info, prepare

    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (40 * i, 90, 10)).save(src / f"ok{i}.png")
    (src / "bomb.png").write_bytes(_png_claiming(60_000, 60_000))  # 3.6 G pixels, 10.8 GB decoded
    (src / "wide.png").write_bytes(_png_claiming(1_000_000, 1))  # 1 M pixels: small enough, but a broken file
    t0 = time.perf_counter()
    summary = prepare(src, tmp_path / "out", resolution=8, workers=0, progress=False)
    assert time.perf_counter() - t0 < 30 and summary["splits"] == {"train": 3}
    skipped = {r["path"]: r["reason"] for r in info(tmp_path / "out")["skipped"]}
    assert skipped["bomb.png"].startswith("too large") and "wide.png" in skipped
    code, err = run_cli(capsys, "viz", trained, "--image", src / "bomb.png", "--out", tmp_path / "viz", "--device", "cpu")
    assert code == 2 and "cannot read image" in one_error_line(err)


def test_label_files_of_the_wrong_length_are_one_line_errors(tmp_path, capsys):
    import numpy as np
    from data_fixtures import make_idx_folder, write_idx

    idx = tmp_path / "mnist"
    arrays = make_idx_folder(idx, n_train=20, n_test=5)
    write_idx(idx / "train-labels-idx1-ubyte.gz", arrays["train-labels-idx1-ubyte.gz"][:19])
    npz = tmp_path / "arrays.npz"
    np.savez(npz, x_train=np.zeros((10, 8, 8), np.uint8), y_train=np.zeros(9, np.int64))
    sets = [a for o in fast() for a in ("--set", o)]
    for source, expected in ((idx, "has 19 labels for 20 images"), (npz, "labels have shape (9,), expected (10,)")):
        code, err = run_cli(capsys, "data", "prepare", source, "--out", tmp_path / "p", "--workers", "0")
        assert code == 2 and expected in one_error_line(err)
        code, err = run_cli(capsys, "train", "--data", source, "--out", tmp_path / "t", "--no-progress", *sets)
        assert code == 2 and expected in one_error_line(err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "t").exists()


def test_empty_sources_are_one_line_errors(tmp_path, capsys):
    import numpy as np

    empty = tmp_path / "empty"
    empty.mkdir()
    classes = tmp_path / "classes"  # class folders without images
    for name in ("cat", "dog"):
        (classes / name).mkdir(parents=True)
    (classes / "dog" / ".hidden.png").write_bytes(b"")
    blank_idx = tmp_path / "blank-idx"
    blank_idx.mkdir()
    (blank_idx / "train-images-idx3-ubyte").write_bytes(b"")
    np.savez(tmp_path / "nothing.npz")
    sets = [a for o in fast() for a in ("--set", o)]
    tried = 0
    for source in (empty, classes, blank_idx, tmp_path / "nothing.npz"):
        code, err = run_cli(capsys, "data", "prepare", source, "--out", tmp_path / "p", "--workers", "0")
        assert code == 2, one_error_line(err)
        if source != classes:  # a folder of images is read by `data prepare`, not by train
            code, err = run_cli(capsys, "train", "--data", source, "--out", tmp_path / "t", "--no-progress", *sets)
            assert code == 2, one_error_line(err)
        tried += 1
    assert tried == 4 and not (tmp_path / "t").exists()


def test_a_source_changed_after_preparation_is_reported(tmp_path, capsys):
    from PIL import Image

    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (80 * i, 20, 200 if cls == "a" else 0)).save(src / cls / f"{i}.png")
    out = tmp_path / "prepared"
    assert run_cli(capsys, "data", "prepare", src, "--out", out, "--workers", "0")[0] == 0

    def info(*extra: str) -> tuple[str, str]:
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "info", str(out), *extra])
        assert exit_info.value.code in (0, None)
        captured = capsys.readouterr()
        status = re.search(r"source status\W+(\w+)", captured.out)
        return status.group(1) if status else captured.out, squash(captured.err)

    assert info() == ("unchanged", "")
    Image.new("RGB", (10, 10), (0, 255, 0)).save(src / "a" / "1.png")  # same name and size, new pixels
    status, err = info("--verify")
    assert status == "changed" and squash("the source changed since it was prepared") in err
    assert squash("verified: every shard matches its checksum") in err  # the prepared copy itself is intact
    shutil.rmtree(src)
    assert info()[0] == "missing"
