"""`lejepa reproduce`: the recipes, the verdict, and a tiny end-to-end run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lejepa_cli.cli import app
from lejepa_cli.config import list_presets
from lejepa_cli.errors import UserError
from lejepa_cli.reproduce import RECIPES, reproduce, verdict


def test_verdict_compares_every_pinned_metric_with_its_range():
    expected = {"linear_top1": (0.7, 1.0), "knn_top1": (0.6, 1.0)}
    assert verdict({"linear_top1": 0.8, "knn_top1": 0.65}, expected)[0] == "PASS"
    result, rows = verdict({"linear_top1": 0.8, "knn_top1": 0.5}, expected)
    assert result == "FAIL" and [r["ok"] for r in rows] == [True, False]
    assert verdict({"linear_top1": 0.8}, expected)[0] == "FAIL"  # a missing figure never passes
    assert verdict({"linear_top1": 0.8}, {})[0] == "NO-REFERENCE"


def test_recipes_name_shipped_presets_and_say_where_their_figures_come_from():
    presets = set(list_presets())
    assert {"demo", "fashion-mnist", "imagenette-vit-s", "imagenette-vit-s8", "imagenet100-resnet50",
            "imagenet1k-vit-l"} <= set(RECIPES)
    for recipe in RECIPES.values():
        assert recipe.preset in presets, recipe.name
        assert recipe.source_of_expected and recipe.budget, recipe.name
        for metric, (low, high) in recipe.expected.items():  # fractions (drops and R^2 may go below 0), or seconds
            assert (0.0 <= low < high) if metric.endswith("_seconds") else (-1.0 <= low < high <= 1.0), metric
    assert RECIPES["demo"].expected and RECIPES["fashion-mnist"].expected  # the CPU recipes are pinned


def test_paper_scale_recipes_ask_for_the_users_data(tmp_path):
    for name in ("imagenet100-resnet50", "imagenet1k-vit-l"):
        with pytest.raises(UserError, match="--data"):
            reproduce(name, tmp_path / name, progress=False)
    with pytest.raises(UserError, match="unknown recipe"):
        reproduce("nosuch", tmp_path, progress=False)


def test_reproduce_demo_end_to_end_on_tiny_settings(tmp_path, tiny_overrides):
    """The whole chain (train, probe, verdict, report) through the CLI; tiny settings, so any verdict."""
    sets = [a for o in tiny_overrides for a in ("--set", o)]
    result = CliRunner().invoke(app, ["reproduce", "demo", "--out", str(tmp_path), "--no-progress", *sets])
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert report["recipe"] == "demo" and report["verdict"] in ("PASS", "FAIL")
    assert result.exit_code == (0 if report["verdict"] == "PASS" else 1), result.output
    assert "(recipe changed by --set)" in result.output and "verdict:" in result.output
    assert set(report["measured"]) == {"linear_top1", "knn_top1"}
    assert all(0.0 <= v <= 1.0 for v in report["measured"].values())
    assert [r["metric"] for r in report["checks"]] == list(RECIPES["demo"].expected)
    assert report["config"]["train"]["steps"] == 4 and report["machine"]["torch"]
    assert report["machine"]["cpu_capability"] in result.output
    assert (tmp_path / "run" / "checkpoints" / "step-000000004.safetensors").is_file()
    # Running it again continues the finished run instead of training from scratch.
    again = CliRunner().invoke(app, ["reproduce", "demo", "--out", str(tmp_path), "--no-progress", *sets])
    assert again.exit_code == result.exit_code
    assert json.loads((tmp_path / "reproduce.json").read_text())["measured"] == report["measured"]


def test_a_robust_recipe_takes_the_corruption_views_and_pins_shift_drops(tmp_path, tiny_overrides):
    """demo-robust: the demo with fmnist-robust's corruption keys; its report carries the shift-table drops."""
    from lejepa_cli.config import load_config

    report = reproduce("demo-robust", tmp_path, extra=list(tiny_overrides), progress=False)
    views, robust = report["config"]["views"], load_config("fmnist-robust").views
    assert views["noise_p"] == robust.noise_p > 0 and views["brightness_shift_p"] == robust.brightness_shift_p
    assert views["local_views"] == load_config("demo", tiny_overrides).views.local_views  # the rest stays the demo's
    drops = {k: v for k, v in report["measured"].items() if k.endswith("_linear_drop")}
    assert set(drops) == {"gaussian_noise_1_linear_drop", "gaussian_noise_2_linear_drop", "brightness_2_linear_drop"}
    cells = report["probe"]["shift"]["corruptions"]
    assert drops["gaussian_noise_2_linear_drop"] == cells["gaussian_noise"]["2"]["linear_drop"]
    assert [r["metric"] for r in report["checks"]] == list(RECIPES["demo-robust"].expected)


def test_a_world_recipe_simulates_trains_and_measures_its_figures(tmp_path, monkeypatch):
    """world-tworoom end to end at toy sizes (world, CEM and evaluation shrunk): every pinned figure is measured."""
    import dataclasses

    from test_world_train import TINY_WORLD

    recipe = RECIPES["world-tworoom"]
    small = dataclasses.replace(recipe.world, episodes=6, val_episodes=2, steps=16, size=16, probe_episodes=2,
                                surprise_episodes=2, plan_episodes=2)
    monkeypatch.setitem(RECIPES, "world-tworoom", dataclasses.replace(recipe, world=small))
    small_plan = ["plan.candidates=8", "plan.iterations=2", "plan.elites=2", "plan.horizon=4"]  # the preset's, shrunk
    result = CliRunner().invoke(app, ["reproduce", "world-tworoom", "--out", str(tmp_path), "--no-progress",
                                      *[a for o in [*TINY_WORLD, *small_plan] for a in ("--set", o)]])
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert result.exit_code == (0 if report["verdict"] == "PASS" else 1), result.output
    assert set(recipe.expected) <= set(report["measured"]) and (tmp_path / "data" / "index.json").is_file()
    assert {"probe", "surprise", "plan"} <= set(report["probe"]) and report["probe"]["plan"]["cem"]["cost"] == "min"
    assert report["probe"]["plan"]["cem"]["candidates"] == 8 and report["probe"]["plan"]["cem"]["horizon_blocks"] == 2
    assert 0.0 <= report["measured"]["teleport_auroc"] <= 1.0 and report["config"]["objective"] == "world"


def test_the_robust_world_recipe_trains_a_second_phase_and_pins_stress_rows(tmp_path, monkeypatch):
    """world-tworoom-robust at toy sizes: the robustness phase starts from the first run's weights in its own
    folder, and the stress rows (as deployed, planned, adapted) become figures."""
    import dataclasses

    from safetensors import safe_open

    from lejepa_cli.checkpoint import list_checkpoints
    from test_world_train import TINY_WORLD

    recipe = RECIPES["world-tworoom-robust"]
    small = dataclasses.replace(recipe.world, episodes=6, val_episodes=2, steps=16, size=16, probe_episodes=2,
                                probe_steps=16, surprise_episodes=2, plan_episodes=1, stress_plan_episodes=1, adapt_steps=2,
                                adapt_episodes=4)
    then = [o for o in recipe.then if not o.startswith("train.steps")] + ["train.steps=8"]
    monkeypatch.setitem(RECIPES, "world-tworoom-robust", dataclasses.replace(recipe, world=small, then=tuple(then)))
    small_plan = ["plan.candidates=8", "plan.iterations=2", "plan.elites=2", "plan.horizon=4", "plan.budget=4"]
    result = CliRunner().invoke(app, ["reproduce", "world-tworoom-robust", "--out", str(tmp_path), "--no-progress",
                                      *[a for o in [*TINY_WORLD, *small_plan] for a in ("--set", o)]])
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert result.exit_code == (0 if report["verdict"] == "PASS" else 1), result.output
    assert set(recipe.expected) <= set(report["measured"])
    for level in ("0.05", "0.1", "0.2"):
        assert {f"pixel_noise_{level}_{k}" for k in ("position_r2", "teleport_auroc", "plan_success")} <= set(report["measured"])
    for cond in ("colour_shift_90", "background_shift_0.4"):
        assert {f"{cond}_{k}" for k in ("position_r2", "adapted_position_r2", "adapted_teleport_auroc",
                                        "adapted_adapt_seconds")} <= set(report["measured"])
    assert report["config"]["world"]["camera_views"] == 1 and report["config"]["world"]["freeze_dynamics"]
    first, robust = (list_checkpoints(tmp_path / d / "checkpoints")[-1] for d in ("run", "run-robust"))
    with safe_open(str(first), "pt") as a, safe_open(str(robust), "pt") as b:  # the dynamics came from the first run
        key = next(k for k in a.keys() if k.startswith("model.predictor."))
        assert a.get_tensor(key).equal(b.get_tensor(key))
    assert "step-000000008" in robust.name


def test_report_records_the_cpu_kernel_path(monkeypatch):
    """fp32 figures differ in rounding between AVX-512 and AVX2 kernels: the report says which ran."""
    import torch

    from lejepa_cli.reproduce import machine

    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    m = machine()
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["isa_settings"] == {"DNNL_MAX_CPU_ISA": "AVX2"}
    assert m["threads"] == torch.get_num_threads() and m["threads_choice"]


def test_imagenette_vit_s8_prepares_at_160_and_trains_the_authors_views(tmp_path):
    """The authors' ImageNette recipe on a tiny image folder: prepare at 160 px, 4 x 128 px views and
    no locals from its preset, then probe and a verdict on the one pinned figure (linear top-1)."""
    from data_fixtures import make_image_folder

    from lejepa_cli.data.shards import load_prepared

    small = ["model.arch=vit_micro", "model.patch_size=16", "model.proj_hidden=64", "loss.num_slices=32",
             "train.batch_size=8", "train.steps=2", "train.save_every=2", "train.eval_every=0", "log.every=1",
             "optim.warmup_steps=1", "train.device=cpu"]
    # A class folder without a val/ split is refused before any pretraining.
    with pytest.raises(UserError, match="probes on the 'val' split"):
        reproduce("imagenette-vit-s8", tmp_path / "flat", data=str(make_image_folder(tmp_path / "flat-images", 2)),
                  extra=small, progress=False)
    assert not (tmp_path / "flat" / "run").exists()
    images = tmp_path / "images"
    make_image_folder(images / "train", per_class=6)
    make_image_folder(images / "val", per_class=3, seed=1)
    report = reproduce("imagenette-vit-s8", tmp_path / "work", data=str(images), extra=small, progress=False)
    assert load_prepared(tmp_path / "work" / "prepared", "train").images.shape[1:] == (160, 160, 3)
    views = report["config"]["views"]
    assert (views["global_views"], views["local_views"], views["global_size"]) == (4, 0, 128)
    assert report["config"]["loss"]["lamb"] == 0.02 and report["config"]["model"]["proj_dim"] == 16
    assert [r["metric"] for r in report["checks"]] == ["linear_top1"] and report["verdict"] in ("PASS", "FAIL")


def test_offline_fetch_tells_to_rerun_the_recipe(tmp_path, monkeypatch):
    """A recipe whose download fails says where to put the file and which command to run again."""
    import dataclasses

    from lejepa_cli.data import fetch as fetch_mod

    offline = dataclasses.replace(fetch_mod.DATASETS["imagenette"], url="http://127.0.0.1:1/")
    monkeypatch.setitem(fetch_mod.DATASETS, "imagenette", offline)
    with pytest.raises(UserError) as e:
        reproduce("imagenette-vit-s8", tmp_path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "cannot download http://127.0.0.1:1/imagenette2-160.tgz" in msg
    assert f"by hand to {tmp_path / 'data' / 'imagenette2-160.tgz'}" in msg
    assert msg.endswith(f"re-run `lejepa reproduce imagenette-vit-s8 --out {tmp_path}`")


def test_unknown_recipe_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "lejepa_cli", "reproduce", "nosuch", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown recipe 'nosuch'" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_reproduce_refuses_to_continue_a_run_of_another_config(tmp_path, tiny_overrides):
    """A work folder whose run was trained with other settings is not silently continued."""
    from lejepa_cli.config import load_config
    from lejepa_cli.train import train

    train(load_config("demo", tiny_overrides + ["loss.lamb=0.2"]), tmp_path / "run", progress=False)
    with pytest.raises(UserError, match=r"different config .*loss\.lamb"):
        reproduce("demo", tmp_path, extra=tiny_overrides, progress=False)


def test_help_names_every_recipe():
    import typing

    from lejepa_cli.commands.reproduce import reproduce as command
    from lejepa_cli.reproduce import RECIPES

    help_text = typing.get_type_hints(command, include_extras=True)["name"].__metadata__[0].help
    assert help_text.removeprefix("Recipe: ").rstrip(".").split(", ") == list(RECIPES)
