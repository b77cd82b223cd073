"""`lejepa probe` end to end on a tiny run, and its pieces: linear grid, few-shot, shift, cache,
label-free ranking, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY
from lejepa_cli.image import features as features_mod
from lejepa_cli.image import probe as probe_mod
from lejepa_cli.cli import app
from lejepa_cli.config import load_config
from lejepa_cli.export import load_encoder
from lejepa_cli.image.probe import ProbeOptions, encoder_digest, run_probe
from lejepa_cli.image.classifiers import LinearHead, fewshot_accuracy, head_accuracy, split_train_val, train_linear_grid
from lejepa_cli.image.selection import rank_checkpoints, spearman
from lejepa_cli.image.corruptions import CORRUPTIONS, SEVERITIES, make_corruption
from lejepa_cli.train import train

STABLE_KEYS = ("linear_top1", "linear_top5", "knn_top1", "fewshot", "shift", "conditions")
RUN = ["train.steps=2", "train.save_every=1"]
FAST = ["--epochs", "3", "--shift-images", "8", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step tiny run with checkpoints at steps 1 and 2 (trained once for the whole module)."""
    out = tmp_path_factory.mktemp("run")
    train(load_config("demo", TINY + RUN), out, progress=False)
    return out


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def count_extractions(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = features_mod.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "extract_features", counting)
    return calls


def test_probe_cli_writes_report_plots_and_second_run_hits_cache(run_dir, tmp_path, cache_dir, monkeypatch):
    runner = CliRunner()
    out_json, plots = tmp_path / "probe.json", tmp_path / "plots"
    calls = count_extractions(monkeypatch)
    result = runner.invoke(app, ["probe", str(run_dir), "--json", str(out_json), "--plots", str(plots), *FAST])
    assert result.exit_code == 0, result.output
    assert "linear top-1" in result.output and "verdict" in result.output
    report = json.loads(out_json.read_text())
    for key in STABLE_KEYS:
        assert key in report, key
    assert 0 <= report["linear_top5"] <= 1 and report["linear_top1"] <= report["linear_top5"]
    assert set(report["knn_top1"]) == {"10", "20", "200"}  # keyed as asked, though the train split has 64 images
    assert set(report["fewshot"]["top1"]) == {"1", "5", "10"}
    assert set(report["shift"]["corruptions"]) == set(CORRUPTIONS)
    cell = report["shift"]["corruptions"]["blur"]["3"]
    assert cell["linear_drop"] == pytest.approx(report["shift"]["clean"]["linear_top1"] - cell["linear_top1"])
    assert report["conditions"]["verdict"] and "projector" in report["conditions"]  # a training checkpoint has one
    assert report["step"] == 2 and report["data"]["train"]["images"] == 64
    first = len(calls)
    assert first == 2 + 1 + 15 + 1  # train, eval, shift clean subset + 5 x 3 corrupted, embeddings
    assert len(list((cache_dir / "features").glob("*.safetensors"))) == first
    for name in ("training_curves", "spectrum", "shift", "pca_maps"):
        with Image.open(plots / f"{name}.png") as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    # Second probe of the same checkpoint and data: every feature comes from the cache.
    again = tmp_path / "again.json"
    result = runner.invoke(app, ["probe", str(run_dir), "--json", str(again), *FAST])
    assert result.exit_code == 0, result.output
    assert len(calls) == first
    second = json.loads(again.read_text())
    assert second["timing"]["extractions"] == 0
    assert second["linear_top1"] == report["linear_top1"] and second["knn_top1"] == report["knn_top1"]


def test_random_init_baseline_has_other_weights(run_dir):
    trained = load_encoder(run_dir)
    rand = run_probe(run_dir, ProbeOptions(epochs=2, shift=False, conditions=False, progress=False, random_init=True))
    assert rand["random_init"] and rand["step"] is None
    assert rand["encoder"]["digest"] != encoder_digest(trained)
    assert rand["encoder"]["arch_config"] == trained.arch_config()
    assert rand["shift"] is None and rand["conditions"] is None  # skipped parts keep their keys


def test_collapsed_encoder_gets_collapse_verdict(run_dir, monkeypatch):
    real = probe_mod.load_probe_encoder

    def collapsed(*args, **kwargs):
        enc = real(*args, **kwargs)
        enc.forward = lambda x: torch.full((len(x), enc.embed_dim), 0.5)
        enc.probe_features = lambda x: torch.full((len(x), enc.feature_dim), 0.5)
        return enc

    monkeypatch.setattr(probe_mod, "load_probe_encoder", collapsed)
    report = run_probe(run_dir, ProbeOptions(epochs=2, shift=False, cache=False, progress=False))
    assert report["conditions"]["failed"] == ["collapse"]
    assert report["conditions"]["verdict"].startswith("collapse")
    assert report["conditions"]["projector"]["failed"] == ["collapse"]  # constant h -> constant z
    assert report["knn_top1"]["20"] <= 0.25  # nothing to tell classes apart (10 classes)


def test_label_free_ranking_over_run(run_dir):
    result = rank_checkpoints(run_dir, num_images=16, num_slices=64, device="cpu", probe_epochs=2)
    rows = result["checkpoints"]
    assert sorted(r["step"] for r in rows) == [1, 2]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["score"] <= rows[1]["score"]
    assert result["best"] == rows[0]["checkpoint"]
    lamb = load_config("demo", TINY + RUN).loss.lamb
    for r in rows:
        assert r["score"] == pytest.approx(((1 - lamb) * r["pred"] + lamb * r["sigreg"]) / lamb**0.4, rel=1e-5)
        assert 0 <= r["linear_top1"] <= 1
    assert result["spearman"] is None or abs(result["spearman"]) == pytest.approx(1.0)  # two points
    # Fixed batch, views and directions: the scores are a deterministic function of the weights.
    again = rank_checkpoints(run_dir, num_images=16, num_slices=64, device="cpu", with_labels=False)
    assert [r["score"] for r in again["checkpoints"]] == [r["score"] for r in rows]
    assert again["spearman"] is None


def test_label_free_score_normalises_with_batch_statistics(run_dir, monkeypatch):
    """BatchNorm's running averages do not enter the score: training never normalised with them."""
    from lejepa_cli.image import probe as probe_mod

    before = rank_checkpoints(run_dir, num_images=16, num_slices=64, device="cpu", with_labels=False)
    load = probe_mod.load_projector

    def stale_running_stats(path, device):
        projector = load(path, device)
        for module in projector.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.fill_(5.0)
                module.running_var.fill_(100.0)
        return projector

    monkeypatch.setattr(probe_mod, "load_projector", stale_running_stats)
    after = rank_checkpoints(run_dir, num_images=16, num_slices=64, device="cpu", with_labels=False)
    assert [r["score"] for r in after["checkpoints"]] == [r["score"] for r in before["checkpoints"]]


def test_label_free_cli(run_dir, tmp_path):
    out = tmp_path / "rank.json"
    result = CliRunner().invoke(app, ["probe", "--label-free", str(run_dir), "--json", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "label-free ranking" in result.output
    assert len(json.loads(out.read_text())["checkpoints"]) == 2


def test_viz_writes_pngs(run_dir, tmp_path):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(img)
    result = CliRunner().invoke(app, ["viz", str(run_dir), "--out", str(tmp_path / "viz"), "--image", str(img),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for name in ("training_curves", "pca_maps"):
        with Image.open(tmp_path / "viz" / f"{name}.png") as im:
            im.verify()


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)  # ties get average ranks


def clusters(n_per: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(1234))
    y = torch.arange(classes).repeat_interleave(n_per)
    return centres[y] + spread * torch.randn(len(y), dim, generator=gen), y


def test_linear_grid_learns_and_heads_train_independently():
    x, y = clusters(60, 5, 16, 1.0, seed=0)
    tx, ty = clusters(20, 5, 16, 1.0, seed=1)
    fit, val = split_train_val(len(x), 0.2, seed=0)
    assert len(set(fit) & set(val)) == 0 and len(fit) + len(val) == len(x)
    grid = train_linear_grid(x[fit], y[fit], x[val], y[val], 5, lrs=(1e-3, 1e-2), epochs=20, batch_size=32)
    assert set(grid.val_top1) == {1e-3, 1e-2} and grid.best_lr in grid.val_top1
    top1, top5 = head_accuracy(grid.head, tx, ty)
    assert top1 > 0.9 and top5 == 1.0
    # Trained together == trained alone: the 1e-3 head does not feel the 1e-2 head.
    alone = train_linear_grid(x[fit], y[fit], x[val], y[val], 5, lrs=(1e-3,), epochs=20, batch_size=32)
    both = train_linear_grid(x[fit], y[fit], x[val], y[val], 5, lrs=(1e-3, 1e-5), epochs=20, batch_size=32)
    assert both.val_top1[1e-3] == alone.val_top1[1e-3] > both.val_top1[1e-5]
    assert both.best_lr == 1e-3 and isinstance(both.head, LinearHead)  # the pick is the best on validation
    for a, b in zip(alone.head.parameters(), both.head.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_fewshot_separable_vs_random():
    x, y = clusters(30, 4, 8, 0.3, seed=2)
    tx, ty = clusters(10, 4, 8, 0.3, seed=3)
    good = fewshot_accuracy(x, y, tx, ty, 4, shots=(1, 5), draws=4)
    assert good["top1"]["1"] > 0.9 and good["top1"]["5"] > 0.95 and set(good["std"]) == {"1", "5"}
    noise = torch.randn(len(x), 8, generator=torch.Generator().manual_seed(5))
    bad = fewshot_accuracy(noise, y, torch.randn(len(tx), 8), ty, 4, shots=(5,), draws=20)
    assert bad["top1"]["5"] < 0.5


def test_corruptions_grow_with_severity_and_are_deterministic():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(40, 200, (4, 3, 32, 32), dtype=np.uint8))
    for name in CORRUPTIONS:
        dists = []
        for sev in SEVERITIES:
            out = make_corruption(name, sev)(images)
            assert out.dtype == torch.uint8 and out.shape == images.shape
            assert torch.equal(out, make_corruption(name, sev)(images)), name  # same seed, same result
            dists.append(float((out.float() - images.float()).abs().mean()))
        assert 0 < dists[0] < dists[1] < dists[2], (name, dists)
    with pytest.raises(ValueError, match="severity"):
        make_corruption("blur", 4)


# ---- bad values, outputs and caches: one-line errors before the work, never a traceback ---------------------


def user_error(result) -> str:
    """The one-line UserError a CliRunner run ended with (`lejepa` prints it and exits 2)."""
    from lejepa_cli.errors import UserError

    assert isinstance(result.exception, UserError), result.output
    assert "\n" not in str(result.exception)
    return str(result.exception)


@pytest.mark.parametrize("bad", [
    {"epochs": 0}, {"epochs": -1}, {"epochs": 10**9}, {"max_train": 0}, {"max_train": 1}, {"shift_images": 0},
    {"batch_size": 0}, {"batch_size": -5}, {"max_eval": 0}, {"val_fraction": 0.0}, {"val_fraction": float("nan")},
    {"lrs": ()}, {"lrs": (float("inf"),)}, {"knn_ks": (0,)}, {"shots": ()}, {"fewshot_draws": 0}, {"seed": -1},
    {"epochs": 2.5}, {"preset": "demo"},  # a preset without random_init has no weights to probe
])
def test_probe_options_out_of_range_are_one_line_user_errors(run_dir, bad):
    from lejepa_cli.errors import UserError

    with pytest.raises(UserError) as e:
        run_probe(run_dir, ProbeOptions(progress=False, **bad))
    assert "\n" not in str(e.value) and str(e.value).strip()


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--max-train", "1"], ["--shift-images", "0"], ["--batch-size", "0"], ["--no-cache", "--batch-size", "-5"],
])
def test_probe_cli_rejects_bad_numbers_before_loading_anything(run_dir, argv, monkeypatch):
    calls = count_extractions(monkeypatch)
    result = CliRunner().invoke(app, ["probe", str(run_dir), *argv, "--no-progress"])
    assert result.exit_code == 2 and not calls, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_random_init_baseline_of_a_preset_before_any_run(tmp_path):
    """`lejepa probe --random-init --preset P`: the untrained encoder P would train, on P's data."""
    import yaml

    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump(load_config("demo", TINY).to_dict()))
    out = tmp_path / "baseline.json"
    argv = ["probe", "--random-init", "--preset", str(preset), "--epochs", "2", "--no-shift", "--no-conditions",
            "--no-progress", "--json", str(out)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["random_init"] and report["step"] is None and report["checkpoint"] == f"preset {preset}"
    assert report["encoder"]["arch_config"]["arch"] == "vit_micro" and report["data"]["train"]["images"] == 64
    again = run_probe(None, ProbeOptions(random_init=True, preset=str(preset), epochs=2, shift=False,
                                         conditions=False, progress=False))
    assert again["encoder"]["digest"] == report["encoder"]["digest"]  # seeded: the same baseline every time
    assert again["linear_top1"] == report["linear_top1"]


@pytest.mark.parametrize("argv, says", [
    (["probe"], "--random-init --preset NAME"),
    (["probe", "--preset", "demo"], "add --random-init"),
])
def test_probe_without_an_encoder_says_what_to_give(argv, says):
    assert says in user_error(CliRunner().invoke(app, argv))


def test_the_probe_command_defaults_are_the_library_defaults():
    import inspect

    from lejepa_cli.commands.probe import probe

    params = inspect.signature(probe).parameters
    defaults = ProbeOptions()
    for name in ("data", "train_split", "eval_split", "epochs", "max_train", "shift", "shift_images", "adapt",
                 "conditions", "cache", "device", "batch_size", "random_init", "preset", "plots"):
        assert params[name].default == getattr(defaults, name), name
    assert params["no_progress"].default is not defaults.progress


def test_json_path_that_cannot_be_written_fails_before_the_work(run_dir, tmp_path, monkeypatch):
    calls = count_extractions(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    for target, says in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "r.json", "is a file, not a folder")):
        message = user_error(CliRunner().invoke(app, ["probe", str(run_dir), "--json", str(target), *FAST]))
        assert says in message and str(target) in message and ".tmp" not in message
    assert not calls  # nothing extracted: the error came first


def test_unwritable_cache_runs_uncached_with_one_warning(run_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "a_file" / "cache"))  # cannot be created
    report = run_probe(run_dir, ProbeOptions(epochs=2, shift=False, progress=False))
    assert 0 <= report["linear_top1"] <= 1 and report["conditions"]["verdict"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "not writable" in line]
    assert len(warnings) == 1 and "without the cache" in warnings[0]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_folder_runs_uncached(run_dir, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "ro"
    cache.mkdir()
    cache.chmod(0o555)
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(cache))
    try:
        report = run_probe(run_dir, ProbeOptions(epochs=2, shift=False, conditions=False, progress=False))
    finally:
        cache.chmod(0o755)
    assert report["timing"]["extractions"] == 2 and not any(cache.iterdir())
    assert sum("not writable" in line for line in capsys.readouterr().err.splitlines()) == 1


def test_cache_that_fails_mid_write_is_dropped_not_fatal(run_dir, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(features_mod, "_save_features", full_disk)
    report = run_probe(run_dir, ProbeOptions(epochs=2, shift=False, conditions=False, progress=False))
    assert report["timing"]["extractions"] == 2
    assert sum("No space left" in line for line in capsys.readouterr().err.splitlines()) == 1  # warned once


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_blamed_on_the_option_given(run_dir):
    message = user_error(CliRunner().invoke(app, ["probe", str(run_dir), "--device", "cuda", *FAST]))
    assert message.startswith("--device cuda:") and "train.device" not in message


def test_viz_image_count_is_bounded(run_dir, tmp_path):
    from lejepa_cli.errors import UserError
    from lejepa_cli.image.limits import MAX_PCA_IMAGES
    from lejepa_cli.image.viz import write_viz

    for n in (0, -3, MAX_PCA_IMAGES + 1):
        result = CliRunner().invoke(app, ["viz", str(run_dir), "--num-images", str(n), "--out", str(tmp_path / "v")])
        assert result.exit_code == 2, (n, result.output)
        with pytest.raises(UserError, match=f"between 1 and {MAX_PCA_IMAGES}"):
            write_viz(run_dir, tmp_path / "v", num_images=n, device="cpu")
    assert f"1<=x<={MAX_PCA_IMAGES}" in CliRunner().invoke(app, ["viz", "--help"]).output  # the bound is in --help
    # The most allowed: several rows of image / map pairs, drawn in seconds.
    written = write_viz(run_dir, tmp_path / "v", num_images=MAX_PCA_IMAGES, device="cpu")
    with Image.open(written[-1]) as im:
        assert im.size[1] > 380 * 3 // 2  # 16 pairs at 8 per row: 2 rows
