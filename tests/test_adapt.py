"""`lejepa adapt` and `lejepa probe --adapt`: BatchNorm re-estimation, LeJEPA fine-tuning, the
export it writes, its one-line refusals, and the conditions check's reading of h vs z."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY
from lejepa_cli.image.adapt import adapted_copy, batchnorm_layers, reestimate_batchnorm
from lejepa_cli.cli import main
from lejepa_cli.image.conditions import explain
from lejepa_cli.config import load_config
from lejepa_cli.data.dataset import ImageDataset
from lejepa_cli.export import load_encoder
from lejepa_cli.models import build_backbone
from lejepa_cli.image.probe import ProbeOptions, run_probe
from lejepa_cli.image.report import report_tables
from lejepa_cli.train import train
from test_probe import cache_dir, run_dir  # noqa: F401  (fixtures: a private feature cache, the tiny ViT run)

RUN = ["train.steps=2", "train.save_every=2"]
RESNET = ["model.arch=resnet_micro", "model.small_stem=true", "model.drop_path=0.0"]


def cli(capsys, *args: str | Path) -> tuple[int, str]:
    """`lejepa ARGS` in this process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapt") / "resnet"
    train(load_config("demo", TINY + RUN + RESNET), out, progress=False)
    return out


@pytest.fixture(scope="module")
def vit_run(run_dir) -> Path:
    """test_probe's tiny ViT-Micro run (LayerNorm only), trained once for this module."""
    return run_dir


def _dataset(n: int, size: int = 16, channels: int = 3, seed: int = 0, offset: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = np.clip(rng.integers(0, 200, (n, size, size, channels)) + offset, 0, 255).astype(np.uint8)
    return ImageDataset(images=images, mean=(0.5,) * channels, std=(0.25,) * channels, name="t", fingerprint="")


def _encoder() -> torch.nn.Module:
    enc = build_backbone("resnet_micro", img_size=16, in_chans=3, small_stem=True)
    enc.lejepa_info = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "channels": 3}
    return enc.eval()


def test_batchnorm_statistics_become_those_of_the_target_images() -> None:
    enc, data = _encoder(), _dataset(24, offset=50)
    seen: list[torch.Tensor] = []
    hook = enc.conv1.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    momentum = enc.bn1.momentum
    assert reestimate_batchnorm(enc, data, device=torch.device("cpu"), batch_size=24) == 24
    hook.remove()
    out = seen[0]  # (N, C, H, W): conv1's output over the one batch, feeding bn1
    assert torch.allclose(enc.bn1.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(enc.bn1.running_var, out.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    assert enc.bn1.momentum == momentum and not enc.training and not any(bn.training for bn in batchnorm_layers(enc))


def test_statistics_average_every_batch_and_the_original_is_untouched() -> None:
    enc, data = _encoder(), _dataset(32, seed=1)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    whole = adapted_copy(enc, data, device=torch.device("cpu"), batch_size=32)
    halves = adapted_copy(enc, data, device=torch.device("cpu"), batch_size=16)
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    # Equal batches: the cumulative average of batch means is the mean over all images.
    assert torch.allclose(whole.bn1.running_mean, halves.bn1.running_mean, atol=1e-5)
    assert not torch.allclose(whole.bn1.running_mean, enc.bn1.running_mean)
    # Only statistics change: every weight is the original's.
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), enc.parameters()))


def _npz(path: Path, images: np.ndarray) -> Path:
    np.savez(path, x_train=images)
    return path


def test_adapt_cli_statistics_only_writes_an_export_and_never_overwrites(resnet_run, tmp_path, capsys) -> None:
    target = _npz(tmp_path / "target.npz", np.clip(_dataset(40, seed=2).images.astype(int) + 60, 0, 255).astype(np.uint8))
    out = tmp_path / "adapted"
    code, err = cli(capsys, "adapt", resnet_run, "--data", target, "--out", out, "--device", "cpu")
    assert code == 0 and "BatchNorm statistics" in err and "40 images" in err
    config = json.loads((out / "config.json").read_text())["lejepa"]
    assert config["adaptation"]["method"] == "batchnorm-stats" and config["adaptation"]["target"]["images"] == 40
    assert config["probe"] is None  # the source's metrics no longer describe this encoder
    adapted, source = load_encoder(out), load_encoder(resnet_run)
    a, s = adapted.state_dict(), source.state_dict()
    assert set(a) == set(s)
    assert not torch.equal(a["bn1.running_mean"], s["bn1.running_mean"])
    assert all(torch.equal(a[k], s[k]) for k in s if "running" not in k and "num_batches" not in k)
    weights = (out / "model.safetensors").read_bytes()
    code, err = cli(capsys, "adapt", resnet_run, "--data", target, "--out", out, "--device", "cpu")
    assert code == 2 and "--overwrite" in err and (out / "model.safetensors").read_bytes() == weights
    code, err = cli(capsys, "adapt", resnet_run, "--data", target, "--out", out, "--device", "cpu", "--overwrite")
    assert code == 0


def test_adapt_cli_fine_tunes_an_export_with_a_fresh_projector(vit_run, tmp_path, capsys) -> None:
    export = tmp_path / "export"
    assert cli(capsys, "export", vit_run, "--out", export)[0] == 0
    target = _npz(tmp_path / "target.npz", _dataset(24, seed=3).images)
    out = tmp_path / "adapted"
    code, err = cli(capsys, "adapt", export, "--data", target, "--out", out, "--steps", "2", "--batch-size", "8",
                    "--lr", "1e-3", "--device", "cpu")
    assert code == 0, err
    assert "fresh" in err and "2 LeJEPA steps" in err
    info = json.loads((out / "config.json").read_text())["lejepa"]["adaptation"]
    assert info["method"] == "lejepa-finetune" and info["projector"] == "fresh" and info["steps"] == 2
    before, after = load_file(str(export / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("case", ["empty", "one", "grey", "vit-stats-only", "file-out", "steps", "batch", "lr", "seed"])
def test_bad_input_to_adapt_is_one_line_and_exit_2(case, resnet_run, vit_run, tmp_path, capsys) -> None:
    rgb = _npz(tmp_path / "rgb.npz", _dataset(8, seed=4).images)
    args = {
        "empty": [resnet_run, "--data", _npz(tmp_path / "empty.npz", np.zeros((0, 16, 16, 3), np.uint8))],
        "one": [resnet_run, "--data", _npz(tmp_path / "one.npz", np.zeros((1, 16, 16, 3), np.uint8))],
        "grey": [resnet_run, "--data", _npz(tmp_path / "grey.npz", np.zeros((8, 16, 16), np.uint8))],
        "vit-stats-only": [vit_run, "--data", rgb],
        "file-out": [resnet_run, "--data", rgb],
        "steps": [resnet_run, "--data", rgb, "--steps", "-1"],
        "batch": [resnet_run, "--data", rgb, "--batch-size", "1"],
        "lr": [resnet_run, "--data", rgb, "--steps", "1", "--lr", "0"],
        "seed": [resnet_run, "--data", rgb, "--seed", "-3"],
    }[case]
    out = tmp_path / "out"
    if case == "file-out":
        out.write_text("mine")
    code, err = cli(capsys, "adapt", *args, "--out", out, "--device", "cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    expected = {"empty": "no images", "one": "at least 2", "grey": "1-channel", "vit-stats-only": "--steps", "file-out": "is a file",
                "steps": "--steps", "batch": "--batch-size", "lr": "--lr", "seed": "--seed"}[case]
    assert expected in lines[0]
    assert (out.read_text() == "mine") if case == "file-out" else not out.exists()


def test_probe_adapt_reports_clean_corrupted_and_adapted(resnet_run, tmp_path) -> None:
    opts = ProbeOptions(device="cpu", epochs=2, shift_images=16, adapt=True, progress=False, plots=tmp_path / "plots")
    report = run_probe(resnet_run, opts)
    shift, adapted = report["shift"], report["shift"]["adapted"]
    assert adapted["method"] == "batchnorm-stats" and set(adapted["corruptions"]) == set(shift["corruptions"])
    assert adapted["source_images"] == report["data"]["train"]["images"]  # source statistics from the clean train split
    for name, per in shift["corruptions"].items():
        assert set(adapted["corruptions"][name]) == set(per)
        for cell in adapted["corruptions"][name].values():
            assert 0 <= cell["linear_top1"] <= 1 and 0 <= cell["knn_top1"] <= 1
    assert (tmp_path / "plots" / "shift_adapted.png").stat().st_size > 0
    table = next(t for t in report_tables(report) if "adaptation" in str(t.title))
    assert [c.header for c in table.columns][2:5] == ["linear clean %", "corrupted", "adapted"]
    json.dumps(report, allow_nan=False)


def test_probe_adapt_refuses_a_vit_and_no_shift(vit_run, resnet_run, capsys) -> None:
    code, err = cli(capsys, "probe", vit_run, "--adapt", "--no-progress", "--device", "cpu")
    assert code == 2 and "BatchNorm" in err and "lejepa adapt --steps" in err
    code, err = cli(capsys, "probe", resnet_run, "--adapt", "--no-shift", "--no-progress", "--device", "cpu")
    assert code == 2 and "--no-shift" in err


def _cond(verdict: str, failed: list[str], dim: int) -> dict:
    return {"verdict": verdict, "failed": failed, "dim": dim}


def test_conditions_reading_says_which_embedding_and_weighs_the_probe() -> None:
    cond = _cond("near isotropic Gaussian (95% of projections pass at 5%, effective rank 90 of 96)", [], 96)
    cond["projector"] = _cond("collapse: effective rank 5.7 of 128 dimensions", ["collapse"], 128)
    good = explain(cond, linear_top1=0.9, num_classes=10)
    assert good[0].startswith("backbone h") and good[1].startswith("projector z (SIGReg's target, 128 dims")
    assert "collapse: effective rank 5.7 of 128" in good[1]
    assert "backbone h probes at 0.90: the encoder is fine, the projector is narrow" in good[1]
    weak = explain(cond, linear_top1=0.2, num_classes=10)
    assert "fine" not in weak[1] and "only 0.20" in weak[1]
    cond_h = _cond("anisotropy (effective rank 12 of 512)", ["anisotropy"], 512)
    assert "the encoder is fine" in explain(cond_h, linear_top1=0.9, num_classes=10)[0]
    assert len(explain(cond_h)) == 1  # no probe: the verdict alone, still naming the space
