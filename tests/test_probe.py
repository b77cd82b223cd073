"""`lejepa probe` end to end on a tiny run, and its pieces: linear grid, few-shot, shift, cache,
label-free ranking, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY
from lejepa_cli import probe as probe_mod
from lejepa_cli.cli import app
from lejepa_cli.config import load_config
from lejepa_cli.export import load_encoder
from lejepa_cli.probe import (
    LinearHead, ProbeOptions, encoder_digest, fewshot_accuracy, head_accuracy, run_probe, split_train_val, train_linear_grid,
)
from lejepa_cli.selection import rank_checkpoints, spearman
from lejepa_cli.shift import CORRUPTIONS, SEVERITIES, make_corruption
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
    real = probe_mod.extract_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "extract_features", counting)
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
    from lejepa_cli import probe as probe_mod

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
