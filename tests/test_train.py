"""Training end to end on tiny data: run folder, checkpoints, exact resume, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint
from lejepa_cli.config import load_config
from lejepa_cli.errors import RunFailed, UserError
from lejepa_cli.train import lr_at, train


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim.", "probe_optim."))}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_folder_layout(tmp_path, tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    summary = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in step_lines] == [1, 2, 3, 4]
    for key in ("loss", "pred", "sigreg", "loss_scaled", "lr", "images_per_s", "data_wait", "probe_acc"):
        assert key in step_lines[0], key
    ckpts = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert ckpts == ["step-000000002.safetensors", "step-000000004.safetensors"]
    with safe_open(str(run / "checkpoints" / ckpts[-1]), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["step"]) == 4
        assert json.loads(meta["config"])["train"]["steps"] == 4
        assert any(k.startswith("optim.") for k in f.keys())
    assert 0.0 <= summary["knn_top1"] <= 1.0 and "online_probe_top1" in summary


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path, tiny_overrides):
    cfg = load_config("demo", tiny_overrides)
    train(cfg, tmp_path, progress=False)
    with pytest.raises(UserError, match="--resume auto"):
        train(cfg, tmp_path, progress=False)
    train(cfg, tmp_path, progress=False, overwrite=True)


def test_resume_is_bit_exact(tmp_path, tiny_overrides):
    cfg = load_config("demo", tiny_overrides + ["train.grad_accum=2"])
    train(cfg, tmp_path / "straight", progress=False)
    # Same run "killed" after the step-2 checkpoint: drop the later checkpoint and resume.
    train(cfg, tmp_path / "resumed", progress=False)
    (tmp_path / "resumed" / "checkpoints" / "step-000000004.safetensors").unlink()
    train(cfg, tmp_path / "resumed", progress=False, resume="auto")
    assert_same(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # lines after the resumed step were trimmed, not duplicated


def test_prepared_folder_trains_and_resumes_mid_epoch_exactly(tmp_path, tiny_overrides, capsys):
    """`lejepa train --data DIR` on `lejepa data prepare` shards: 40 images, batch 8 = 5 steps per
    epoch; a run stopped after step 3 (mid-epoch 0) resumes to the same weights as a straight run."""
    import numpy as np
    from PIL import Image

    from lejepa_cli.cli import main
    from lejepa_cli.data.prepare import prepare

    rng = np.random.default_rng(0)
    for i in range(40):
        folder = tmp_path / "images" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    prepare(tmp_path / "images", tmp_path / "prepared", resolution=16, workers=0, progress=False)
    keep = [o for o in tiny_overrides if not o.startswith(("data.", "train.batch_size", "train.steps", "train.save_every"))]
    sets = [a for o in keep + ["train.batch_size=8", "train.steps=7", "train.save_every=3"] for a in ("--set", o)]

    def lejepa_train(out: str, *extra: str) -> None:
        with pytest.raises(SystemExit) as info:
            main(["train", "--preset", "demo", "--data", str(tmp_path / "prepared"), "--out", str(tmp_path / out),
                  "--no-progress", *sets, *extra])
        assert info.value.code in (0, None), capsys.readouterr().err

    lejepa_train("straight")
    lejepa_train("resumed")
    ckpts = list_checkpoints(tmp_path / "resumed" / "checkpoints")
    assert [p.name for p in ckpts] == [f"step-00000000{s}.safetensors" for s in (3, 6, 7)]
    for later in ckpts[1:]:  # as if killed after the step-3 checkpoint
        later.unlink()
    position = load_checkpoint(ckpts[0])[1]["data_position"]
    assert position == {"step": 3, "epoch": 0, "batch_in_epoch": 3, "steps_per_epoch": 5}
    lejepa_train("resumed", "--resume", "auto")
    assert "resuming from" in capsys.readouterr().err
    assert_same(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_overrides):
    sets = [a for o in tiny_overrides if not o.startswith(("train.steps", "train.save_every")) for a in ("--set", o)]
    sets += ["--set", "train.steps=40", "--set", "train.save_every=5", "--no-progress"]
    cmd = [sys.executable, "-m", "lejepa_cli", "train", "--preset", "demo"]
    straight = subprocess.run(cmd + ["--out", str(tmp_path / "a")] + sets, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")] + sets, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "b" / "checkpoints") and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(tmp_path / "b" / "checkpoints")[-1].name != "step-000000040.safetensors"
    resumed = subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--resume", "auto"] + sets, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_overrides, monkeypatch):
    import lejepa_cli.image.objective as image_mod

    real = image_mod.lejepa_loss

    def poisoned(z, *, step, **kw):
        parts = real(z, step=step, **kw)
        if step == 2:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(image_mod, "lejepa_loss", poisoned)
    cfg = load_config("demo", tiny_overrides)
    with pytest.raises(RunFailed, match="non-finite loss at step 2"):
        train(cfg, tmp_path, progress=False)
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000000002.safetensors"]
    tensors, _ = load_checkpoint(ckpts[0])
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())


def test_skip_mode_survives_a_nonfinite_step(tmp_path, tiny_overrides, monkeypatch):
    import lejepa_cli.image.objective as image_mod

    real = image_mod.lejepa_loss

    def poisoned(z, *, step, **kw):
        parts = real(z, step=step, **kw)
        if step == 1:
            parts["loss"] = parts["loss"] * float("inf")
        return parts

    monkeypatch.setattr(image_mod, "lejepa_loss", poisoned)
    cfg = load_config("demo", tiny_overrides + ["train.on_nonfinite=skip"])
    train(cfg, tmp_path, progress=False)
    tensors, _ = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_lr_schedule_is_warmup_then_cosine():
    cfg = load_config("demo", ["train.steps=100", "optim.lr=1.0", "optim.warmup_steps=10", "optim.min_lr_ratio=0.001"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.001)


def test_no_weight_decay_on_norms_biases_pos_embed_cls():
    from lejepa_cli.models import build_backbone
    from lejepa_cli.train import param_groups

    vit = build_backbone("vit_tiny", img_size=16, patch_size=4, in_chans=3)
    decay, no_decay = param_groups(vit, 0.05)
    names = {id(p): n for n, p in vit.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias"} <= nd
    assert "blocks.0.attn.qkv.weight" not in nd and decay["weight_decay"] == 0.05


def test_periodic_evaluation_starts_at_step_zero_and_summary_keeps_it(tmp_path, tiny_overrides):
    """eval_every > 0: the curve starts with the untrained encoder, so the summary can show the gain."""
    cfg = load_config("demo", tiny_overrides + ["train.eval_every=2"])
    summary = train(cfg, tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "knn_top1" in x]
    assert [x["step"] for x in evals] == [0, 2, 4]
    assert evals[0]["train_s"] == 0.0 and evals[1]["train_s"] > 0
    assert summary["knn_top1_before_training"] == evals[0]["knn_top1"]
    assert summary["online_probe_top1_before_training"] == evals[0]["online_probe_top1"]
    # --resume auto on a folder that never reached a checkpoint starts again from 0: one step-0 line, not two.
    (tmp_path / "run" / "checkpoints").rename(tmp_path / "old-checkpoints")
    train(cfg, tmp_path / "run", progress=False, resume="auto")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "knn_top1" in x] == [0, 2, 4]


def test_result_table_never_cuts_paths_and_is_plain_when_piped(tmp_path, tiny_overrides, capsys, monkeypatch):
    """Piped: `key: value` lines; on a narrow terminal: a table whose path cells fold instead of '…'."""
    import io

    from rich.console import Console

    from lejepa_cli import cli

    out = tmp_path / "a-rather-long-folder-name-for-the-run" / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--out", str(out), "--no-progress", *sum((["--set", o] for o in tiny_overrides), [])])
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    ckpt = out / "checkpoints" / "step-000000004.safetensors"
    assert f"checkpoint: {ckpt}" in lines
    protocol = next(x for x in lines if x.startswith("knn_protocol: "))
    assert "k=20 on the embedding h" in protocol and "64 of 64 train images" in protocol
    summary = json.loads((out / "summary.json").read_text())
    terminal = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=terminal, force_terminal=True, width=50))
    cli.print_result(summary, "run")
    text = terminal.getvalue()
    assert "…" not in text and "".join(str(ckpt).split()) in "".join(text.replace("│", "").split())
