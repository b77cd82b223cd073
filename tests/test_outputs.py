"""No command replaces a file it did not write without --overwrite; names the writers cannot produce are
refused before the work; writes are atomic (nothing half-written, no temporary file left behind).

For each command that writes files: a file of the user's at the output path stays untouched
without --overwrite (exit 2, one line on stderr) and is replaced with it (exit 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_run import invoke
from lejepa_cli.errors import RunFailed, UserError
from lejepa_cli.outputs import (
    REPORT_MARKER, atomic_output, check_output_file, check_output_folder, is_own_image, save_safetensors, write_report,
)

USER = b"the user's own file\n"
PROBE_FAST = ["--epochs", "1", "--shift-images", "4", "--no-shift", "--no-conditions", "--no-cache", "--no-progress",
              "--device", "cpu", "--batch-size", "64"]
WORLD_FAST = ["-n", "2", "--steps", "16"]
CEM_FAST = ["--candidates", "8", "--iterations", "1", "--elites", "2", "--horizon", "2"]


def _cases(a: dict, tmp: Path) -> dict[str, tuple[list, Path]]:
    """command -> (argv, the user's file that sits where the command writes)."""
    return {
        "probe --json": (["probe", a["run"], "--json", tmp / "r.json", *PROBE_FAST], tmp / "r.json"),
        "probe --plots": (["probe", a["run"], "--plots", tmp / "plots", *PROBE_FAST], tmp / "plots" / "pca_maps.png"),
        "viz --out": (["viz", a["run"], "--out", tmp / "viz", "--num-images", "2", "--device", "cpu"],
                      tmp / "viz" / "training_curves.png"),
        "embed --out": (["embed", a["export"], a["npz"], "--out", tmp / "e.npy", "--no-progress", "--device", "cpu"],
                        tmp / "e.npy"),
        "embed --out (ids beside it)": (["embed", a["export"], a["npz"], "--out", tmp / "e.npy", "--no-progress",
                                         "--device", "cpu"], tmp / "e.ids.json"),
        "export --out": (["export", a["run"], "--out", tmp / "x"], tmp / "x" / "model.safetensors"),
        "export --out (world)": (["export", a["world_run"], "--out", tmp / "x"], tmp / "x" / "world.safetensors"),
        "adapt --out": (["adapt", a["export"], "--data", a["npz"], "--out", tmp / "x", "--device", "cpu", "--steps", "1",
                         "--batch-size", "8"],
                        tmp / "x" / "model.safetensors"),
        "world plan --json": (["world", "plan", a["world_run"], *WORLD_FAST[:2], "--budget", "4", *CEM_FAST,
                               "--no-baselines", "--json", tmp / "p.json"], tmp / "p.json"),
        "world plan --save-video": (["world", "plan", a["world_run"], *WORLD_FAST[:2], "--budget", "4", *CEM_FAST,
                                     "--no-baselines", "--save-video", tmp / "v.gif"], tmp / "v.gif"),
        "world probe --json": (["world", "probe", a["world_export"], *WORLD_FAST, "--json", tmp / "w.json"],
                               tmp / "w.json"),
        "world surprise --plot": (["world", "surprise", a["world_run"], *WORLD_FAST, "--plot", tmp / "s.png"],
                                  tmp / "s.png"),
        "world stress --plot": (["world", "stress", a["world_run"], *WORLD_FAST, "--plan-episodes", "0",
                                 "-c", "pixel noise", "--plot", tmp / "st.svg"], tmp / "st.svg"),
    }


CASES = list(_cases({k: Path(k) for k in ("run", "export", "npz", "world_run", "world_export")}, Path("t")))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_a_file_of_the_users_is_replaced_only_with_overwrite(case, artefacts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "cache"))
    argv, target = _cases(artefacts, tmp_path)[case]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(USER)
    code, _, err = invoke(argv, capsys)
    line = _one_error_line(err)
    assert code == 2 and "--overwrite" in line, err
    assert target.read_bytes() == USER
    code, _, err = invoke([*argv, "--overwrite"], capsys)
    assert code == 0, err
    assert target.exists() and target.read_bytes() != USER
    assert not list(tmp_path.rglob("*.tmp*")), list(tmp_path.rglob("*.tmp*"))


def test_the_commands_own_report_and_plots_are_replaced_without_overwrite(artefacts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "cache"))
    report, plots = tmp_path / "r.json", tmp_path / "plots"
    argv = ["probe", artefacts["run"], "--json", report, "--plots", plots, *PROBE_FAST]
    assert invoke(argv, capsys)[0] == 0
    assert json.loads(report.read_text())[REPORT_MARKER] == "probe" and is_own_image(plots / "pca_maps.png")
    report.write_text(report.read_text().replace('"step"', '"step_of_the_earlier_run"'))
    code, _, err = invoke(argv, capsys)
    assert code == 0, err
    assert "step_of_the_earlier_run" not in report.read_text()
    # Another command's report is not this command's own: refused.
    write_report({"x": 1}, tmp_path / "other.json", "world probe")
    code, _, err = invoke(["probe", artefacts["run"], "--json", tmp_path / "other.json", *PROBE_FAST], capsys)
    assert code == 2 and "--overwrite" in _one_error_line(err)


def test_reports_never_land_on_a_dataset_or_a_runs_files(artefacts, tmp_path, capsys):
    """The issue's cases: `world probe RUN --json DATASET/index.json`, `probe RUN --json RUN/config.yaml`."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(artefacts["world_data"], data)
    shutil.copytree(artefacts["run"], run)
    index, config = (data / "index.json").read_bytes(), (run / "config.yaml").read_bytes()
    code, _, err = invoke(["world", "probe", artefacts["world_run"], *WORLD_FAST, "--json", data / "index.json"], capsys)
    assert code == 2 and "already exists" in _one_error_line(err)
    code, _, err = invoke(["probe", run, "--json", run / "config.yaml", *PROBE_FAST], capsys)
    assert code == 2 and "'.yaml'" in _one_error_line(err) and ".json" in err
    code, _, err = invoke(["probe", run, "--json", run / "config.yaml", "--overwrite", *PROBE_FAST], capsys)
    assert code == 2  # --overwrite does not make a .yaml a report
    assert (data / "index.json").read_bytes() == index and (run / "config.yaml").read_bytes() == config


@pytest.mark.parametrize("argv,option", [
    (["world", "surprise", "RUN", "--plot", "s.xyz"], "--plot"),
    (["world", "stress", "RUN", "--plot", "s"], "--plot"),
    (["world", "plan", "RUN", "--save-video", "v.mp4"], "--save-video"),
    (["world", "probe", "RUN", "--json", "p.txt"], "--json"),
    (["probe", "RUN", "--json", "p.csv"], "--json"),
    (["bench", "--out", "b.yaml"], "--out"),
    (["embed", "RUN", "DATA", "--out", "e.csv"], "--out"),
])
def test_names_the_writer_cannot_produce_are_refused_before_the_work(argv, option, artefacts, tmp_path, capsys,
                                                                     monkeypatch):
    import lejepa_cli.world.runs as runs
    import lejepa_cli.image.probe as probe

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(runs, "open_world_run", no_work)
    monkeypatch.setattr(probe, "run_probe", no_work)
    swap = {"RUN": artefacts["world_run"] if argv[0] == "world" else artefacts["run"], "DATA": artefacts["npz"]}
    argv = [swap.get(a, tmp_path / a if "." in a or a == "s" else a) for a in argv]
    code, _, err = invoke(argv, capsys)
    line = _one_error_line(err)
    assert code == 2 and option in line and "give a name ending in" in line
    assert not [p for p in tmp_path.iterdir()]


def test_bench_out_refuses_a_users_file_before_benchmarking(tmp_path, capsys, monkeypatch):
    import lejepa_cli.commands.bench as bench

    monkeypatch.setattr(bench, "load_suite", lambda: (_ for _ in ()).throw(AssertionError("benchmarked first")))
    (tmp_path / "b.json").write_bytes(USER)
    code, _, err = invoke(["bench", "--out", tmp_path / "b.json"], capsys)
    assert code == 2 and "--overwrite" in _one_error_line(err) and (tmp_path / "b.json").read_bytes() == USER


# ---- the helper itself ------------------------------------------------------------------------------


def test_check_output_file_rules(tmp_path):
    (tmp_path / "mine.json").write_bytes(USER)
    write_report({"a": 1}, tmp_path / "own.json", "probe")
    assert check_output_file(tmp_path / "own.json", "--json", report="probe") == tmp_path / "own.json"
    assert check_output_file(tmp_path / "mine.json", "--json", overwrite=True) == tmp_path / "mine.json"
    for path, kw, says in (
        (tmp_path / "mine.json", {}, "already exists; pass --overwrite"),
        (tmp_path / "own.json", {"report": "world plan"}, "already exists"),  # another command's report
        (tmp_path / "r.yaml", {"suffixes": (".json",)}, "cannot write '.yaml'; give a name ending in .json"),
        (tmp_path / "r", {"suffixes": (".json",)}, "cannot write no extension"),
    ):
        with pytest.raises(UserError, match=says):
            check_output_file(path, "--json", **kw)
    import os

    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UserError, match="broken link"):
        check_output_file(tmp_path / "dangling.json", "--json", overwrite=True)
    with pytest.raises(UserError, match="not a regular file"):
        check_output_file(tmp_path / "fifo.json", "--json", overwrite=True)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(USER)
    with pytest.raises(UserError, match="a.png already exists"):
        check_output_folder(tmp_path / "plots", "--plots", files=("a.png", "b.png"))
    check_output_folder(tmp_path / "plots", "--plots", files=("a.png",), overwrite=True)


def test_atomic_output_leaves_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(USER)
    with pytest.raises(ValueError):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".png"
            tmp.write_bytes(b"half")
            raise ValueError("the writer failed")
    assert target.read_bytes() == USER and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    with atomic_output(target) as tmp:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp)
    with Image.open(target) as im:
        assert im.format == "PNG"
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import safetensors.torch
    import torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(RunFailed, match=r"could not write .*model.safetensors: .*No space left"):
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert not list(tmp_path.iterdir())

    def disk_full(self, data, encoding=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError) as info:
        write_report({"a": 1}, tmp_path / "r.json", "probe")
    assert info.value.filename == str(tmp_path / "r.json") and not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["data prepare", "world simulate", "train"])
def test_a_folder_output_holding_the_users_files_is_refused(command, artefacts, tmp_path, capsys):
    """Commands that write a whole folder (datasets, runs) leave a folder of the user's alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(USER)
    argv = {
        "data prepare": ["data", "prepare", artefacts["npz"], "--out", out, "--workers", "0"],
        "world simulate": ["world", "simulate", "two-room", "--out", out, "--episodes", "2", "--steps", "8",
                           "--val-episodes", "1", "--size", "16", "--no-progress"],
        "train": ["train", "--out", out, "--set", "train.steps=1", "--no-progress"],
    }[command]
    code, _, err = invoke(argv, capsys)
    assert code == 2 and _one_error_line(err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_bytes() == USER
