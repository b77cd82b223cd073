"""Smoke tests of the benchmark suite on tiny sizes: the functions run and return what the JSON promises.

No timed assertions: timings on a shared CI machine mean nothing. What is checked for real: the
FLOP counter's CPU attention formulas, FLOPs linear in the batch, the SIGReg benchmark's
agreement with the reference, the memory figures' arithmetic, the accelerator-path facts, and
that the suite runner and `lejepa bench` report a failing module without losing the others.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

import benchmarks.__main__ as suite
from benchmarks import bench_memory, bench_resnet_stem, bench_sigreg, bench_step, bench_views
from benchmarks.machine import describe
from lejepa_cli.cli import app
from lejepa_cli.data.loader import BatchLoader, StepSampler

# Tiny heads and few SIGReg directions keep every case well under a second of compute.
TINY = ("model.proj_hidden=64", "model.proj_dim=16", "loss.num_slices=32")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_machine_description_names_the_hardware():
    info = describe(torch.device("cpu"))
    assert info["device"] == "cpu" and info["gpu"] is None
    assert info["threads"] == torch.get_num_threads() and info["cpus_usable"] >= 1
    assert info["torch"] == torch.__version__ and info["cpu"]
    assert len(info["load_average_1_5_15min"]) == 3
    assert set(info["cpu_flags"]) <= {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16",
                                      "amx_tile", "amx_bf16"}


def test_cpu_attention_flops_are_counted():
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))  # (N, H, T, d)
    with FlopCounterMode(display=False, custom_mapping=bench_step._CPU_SDPA_FLOPS) as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    one = 2 * 2 * 3 * 10 * 10 * 8  # one (T x d) @ (d x T)-sized matmul per sample and head
    # forward: q @ k^T, p @ v; backward (flash): scores again, then dV, dP, dQ, dK
    assert counter.get_total_flops() == (2 + 5) * one


def _run_and_batch(batch: int):
    run = bench_step.build_case("demo", 32, batch, torch.device("cpu"), TINY)
    loader = BatchLoader(run.train_data, StepSampler(len(run.train_data), batch, 0), run.device)
    try:
        _, _, b = next(loader.iterate(0, 1))
    finally:
        loader.close()
    return run, b


def test_encoder_flops_are_linear_in_the_batch():
    (run2, b2), (run4, b4) = _run_and_batch(2), _run_and_batch(4)
    (f2, ops2), (f4, ops4) = bench_step.encoder_flops(run2, b2), bench_step.encoder_flops(run4, b4)
    assert f2 > 0 and f4 == 2 * f2
    assert sum(ops2.values()) == f2 and {k: 2 * v for k, v in ops2.items()} == ops4
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops2  # attention is counted on the CPU too
    h2, h4 = bench_step.head_flops(run2, b2), bench_step.head_flops(run4, b4)
    assert h2 > 0 and h4 > h2  # projector + SIGReg: linear in the batch up to the direction draw


def test_step_case_returns_the_breakdown():
    r = bench_step.measure_case("demo", 32, 4, steps=1, warmup=0, overrides=TINY)
    assert set(r["phase_ms"]) == set(bench_step.PHASES) == set(r["phase_process_cpu_ms"])
    assert sum(r["phase_fraction"].values()) == pytest.approx(1.0, abs=0.01)
    assert r["encoder_gflop_fwd_bwd"] > 0 and 0 < r["mfu_vs_best_square_matmul"] <= r["mfu_vs_square_matmul"]
    assert r["encoder_shape_matmul"]["m_k_n"] == [2 * 4 * 17, 128, 512]  # Vg * N * (16 patches + CLS), D, 4D
    assert r["encoder_profile"]["matmul_like_share"] > 0 and r["projector_loss_gflop_fwd_bwd"] >= 0
    assert "aten::addmm" in r["encoder_profile"]["flop_counted_kernels"]
    assert {"foreach", "trainer_uses"} <= set(r["adamw_step_ms"])
    assert r["limits"] and all(isinstance(s, str) for s in r["limits"])
    json.dumps(r)


def test_accelerator_paths_are_all_in_place():
    paths = bench_step.accelerator_paths()
    missing = [name for name in bench_step._PATHS if paths[name] is None]
    assert not missing, f"accelerator paths not found in the code: {missing}"
    assert paths["scaled_dot_product_attention"]["where"].startswith("lejepa_cli/models/vit.py:")
    assert paths["host_sync_calls_in_lejepa_step"] == []


def test_memory_case_in_process_and_summary():
    r = bench_memory.measure("demo", 2, False, overrides=TINY)
    assert r["grads_adamw_mib"] == pytest.approx(3 * r["weights_mib"], abs=0.2)
    assert r["saved_for_backward_mib"] > 0 and r["first_step_s"] > 0 and r["preset_batch"] == 64
    base = {**r, "preset": "p", "preset_batch": 10}
    rows = [
        {**base, "batch": 2, "step_peak_above_build_mib": 100.0, "saved_for_backward_mib": 40.0, "first_step_s": 1.0},
        {**base, "batch": 4, "step_peak_above_build_mib": 160.0, "saved_for_backward_mib": 80.0, "first_step_s": 2.0},
        {**base, "batch": 4, "grad_checkpointing": True, "step_peak_above_build_mib": 110.0,
         "saved_for_backward_mib": 8.0, "first_step_s": 3.0},
    ]
    s = bench_memory._summary(rows)
    assert s["per_image_mib"]["p"] == {"step_peak": 30.0, "saved_for_backward": 20.0, "preset_batch": 10,
                                       "saved_for_backward_at_preset_batch_gib_extrapolated": round(200 / 1024, 2)}
    assert s["grad_checkpointing"]["p@4"] == {"step_peak_saves_mib": 50.0, "saved_for_backward_ratio_on_over_off": 0.1,
                                              "first_step_time_ratio_on_over_off": 1.5}


def test_saved_for_backward_counts_activations_not_parameters():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with bench_memory._SavedTensors([lin]) as saved:
        torch.tanh(lin(x)).sum().backward()  # linear saves x (and its weight), tanh saves its output
    assert saved.nbytes == 2 * 4 * 8 * 4


def test_memory_case_in_a_fresh_process():
    r = bench_memory.measure_in_subprocess("demo", 2, False, threads=1)
    assert r["preset"] == "demo" and r["batch"] == 2 and r["arch"] == "vit_micro"
    assert r["step_peak_above_build_mib"] > 0
    if Path("/proc/self/status").exists():  # Linux: the child's own high-water mark, not the parent's via exec
        assert r["peak_reset"] is True and r["peak_source"] == "VmHWM"


def test_sigreg_bench_matches_the_reference_on_tiny_sizes():
    r = bench_sigreg._measure(64, 16, 32, 17, torch.device("cpu"), quick=True)
    assert r["value_rel_err"] < 1e-5 and r["grad_max_rel_err"] < 1e-4
    assert {"reference_ms", "ours_ms", "matmul_floor_ms", "speedup_vs_reference", "reference_peak_mib"} <= set(r)


def test_sigreg_bench_times_one_and_two_threads_side_by_side():
    before = torch.get_num_threads()
    r = bench_sigreg._threads_side_by_side(32, 8, 16, 17, reps=1)
    assert torch.get_num_threads() == before  # the caller's thread count is restored
    assert r["1_thread"]["ours_ms"] > 0 and r["2_threads"]["ours_ms"] > 0
    assert r["1_thread"]["process_cpu_ms"] >= 0 and "load_average_1min" in r


def test_resnet_stem_bench_times_every_variant_on_a_tiny_batch():
    r = bench_resnet_stem.run(quick=True, batch=4, rounds=1)
    assert set(r["images_per_s"]) == set(bench_resnet_stem.VARIANTS)
    assert all(v > 0 for v in r["images_per_s"].values())
    assert r["ratio_to_contiguous_stride1"]["contiguous_stride1"] == 1.0 and "cpu" in json.dumps(r["machine"]).lower()


def test_views_bench_runs_a_tiny_case(monkeypatch):
    pytest.importorskip("kornia")
    monkeypatch.setattr(bench_views, "CASES", {"tiny": (16, 16, 8, 4, 4)})
    r = bench_views.run(quick=True)
    assert r["machine"]["device"] == "cpu"
    case = r["cases"]["tiny"]
    assert case["batch"] == 4 and case["ours_images_per_s"] > 0 and case["ours_over_kornia"] > 0


def _fake(result=None, error=None):
    def run(quick, threads=None):
        if error:
            raise error
        return {"quick": quick, **(result or {})}

    return types.SimpleNamespace(run=run)


def test_suite_reports_a_failing_module_and_keeps_the_others(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "benchmarks.bench_sigreg", _fake({"ok": 1}))
    monkeypatch.setitem(__import__("sys").modules, "benchmarks.bench_views", _fake(error=RuntimeError("boom")))
    doc = suite.run_suite(quick=True, only=["sigreg", "views"], progress=lambda m: None)
    assert doc["results"]["sigreg"] == {"quick": True, "ok": 1}
    assert doc["results"]["views"]["error"] == "RuntimeError: boom"
    assert suite.failed(doc) == ["views"]
    assert set(doc["timing"]) == {"sigreg", "views", "total_wall_s"}
    assert doc["machine"]["device"] in ("cpu", "cuda")


def test_threads_drop_to_one_on_an_oversubscribed_cpu(monkeypatch):
    assert suite.choose_threads(3) == (3, "asked for")
    torch.set_num_threads(2)
    monkeypatch.setattr(suite.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(suite.os, "getloadavg", lambda: (1e6, 1e6, 1e6))
    threads, why = suite.choose_threads(None)
    assert threads == 1 and "load average" in why
    monkeypatch.setattr(suite.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert suite.choose_threads(None) == (None, "torch's default")


def test_lejepa_bench_command(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "benchmarks.bench_sigreg", _fake({"ok": 1}))
    monkeypatch.setitem(__import__("sys").modules, "benchmarks.bench_views", _fake(error=ValueError("bad")))
    out = tmp_path / "b" / "bench.json"
    ok = CliRunner().invoke(app, ["bench", "--quick", "--only", "sigreg", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["results"]["sigreg"] == {"quick": True, "ok": 1}
    bad = CliRunner().invoke(app, ["bench", "--only", "sigreg", "--only", "views"])
    assert bad.exit_code == 1
    assert "views" in bad.output


def test_loader_benchmark_pipelines_make_the_same_views_from_the_same_files(tmp_path):
    """Both data paths of bench_loader run on the same files and give the recipe's views."""
    from benchmarks import bench_loader
    from lejepa_cli.config import load_config
    from lejepa_cli.data.prepare import prepare
    from lejepa_cli.data.shards import load_prepared

    paths = bench_loader.write_images(tmp_path / "images", 8, (96, 72))  # > 64 px: JPEG, as photos ship
    assert len(paths) == 8 and all(p.suffix == ".jpg" and p.stat().st_size > 0 for p in paths)
    cfg = load_config("demo").views
    views = bench_loader.PilMultiCrop(cfg, (0.5,) * 3, (0.25,) * 3)(
        bench_loader.Image.open(paths[0]).convert("RGB"), bench_loader.np.random.default_rng(0))
    assert len(views) == cfg.global_views + cfg.local_views
    assert views[0].shape == (3, cfg.global_size, cfg.global_size) and views[-1].shape == (3, cfg.local_size, cfg.local_size)
    assert all(v.min() >= -2.0 and v.max() <= 2.0 for v in views)  # (x - 0.5) / 0.25 for x in [0, 1]
    prepare(tmp_path / "images", tmp_path / "prepared", resolution=32, workers=0, progress=False)
    data = load_prepared(tmp_path / "prepared", "train")
    assert bench_loader.ours_images_per_s(tmp_path / "prepared", cfg, batch=4, batches=2) > 0
    assert bench_loader.conventional_images_per_s(paths, cfg, data.mean, data.std, batch=4, workers=0, batches=2) > 0


def test_selection_sweep_trains_scores_and_reuses_its_runs(tmp_path):
    """Two tiny runs through `python -m benchmarks.sweep_selection`; the second call reuses them."""
    import subprocess
    import sys

    from conftest import TINY as TINY_RUN

    sets = [a for o in TINY_RUN if not o.startswith(("train.steps", "train.save_every")) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "benchmarks.sweep_selection", "--preset", "demo", "--steps", "2",
           "--lambdas", "0.05,0.5", "--lrs", "0.001", "--jobs", "1", "--out", str(tmp_path), *sets]
    first = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout)
    assert [r["run"] for r in first["runs"]] == ["lamb0.05-lr0.001", "lamb0.5-lr0.001"]
    assert (first["runs_trained_now"], first["runs_reused"]) == (2, 0)
    assert all(0 <= r["linear_top1"] <= 1 and r["label_free_score"] > 0 and r["train_s"] > 0 for r in first["runs"])
    assert set(first["spearman_with_linear_top1"]) == {"label_free_score", "fixed_batch_loss", "train_loss_scaled", "train_loss"}
    again = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout)
    assert (again["runs_trained_now"], again["runs_reused"]) == (0, 2)
    assert [r["label_free_score"] for r in again["runs"]] == [r["label_free_score"] for r in first["runs"]]


def test_plan_bench_times_each_profile_on_one_and_two_threads():
    from benchmarks import bench_plan
    from lejepa_cli.config import PlanConfig
    from test_world_train import TINY_WORLD

    small = {"small": PlanConfig(candidates=8, iterations=2, elites=2, horizon=4),
             "smaller": PlanConfig(candidates=4, iterations=1, elites=1, horizon=2)}
    r = bench_plan.run(quick=True, overrides=tuple(TINY_WORLD), profiles=small, episodes=2)
    assert [c["profile"] for c in r["cases"]] == ["small", "smaller"] and r["episodes_planned_together"] == 2
    assert r["cases"][0]["settings"]["horizon_blocks"] == 2 and r["cases"][1]["settings"]["candidates"] == 4
    assert all(c[f"{kind}s_per_decision_{n}"] > 0 for c in r["cases"] for kind in ("", "cpu_")
               for n in ("1_thread", "2_threads"))
    assert r["model"] == "world-tworoom, random init" and "load_average_1_5_15min" in r["machine"]


def test_plan_errors_compares_the_model_along_each_sequence_with_the_simulator():
    from benchmarks import bench_plan, plan_errors
    from lejepa_cli.config import PlanConfig
    from lejepa_cli.world.catalog import make_world
    from test_world_train import TINY_WORLD

    model, world = bench_plan.random_model(tuple(TINY_WORLD)), make_world("two-room", size=64)
    settings = PlanConfig(candidates=16, iterations=3, elites=4, horizon=8)  # 4 blocks of frameskip 2
    r = plan_errors.diagnose(model, world, problems=3, seed=0, settings=settings, warm_blocks=2)
    assert r["horizon_blocks"] == 4 and set(r["sequences"]) == set(plan_errors.SEQUENCES)
    for figures in r["sequences"].values():
        assert all(len(v) == 4 and np.isfinite(v).all() for k, v in figures.items() if isinstance(v, list))
        assert figures["latent_err"][0] > 0 and figures["copy_err"][0] > 0
    # The true-dynamics planner really heads for the goal; random actions barely move the agent.
    oracle, random = r["sequences"]["oracle_plan"], r["sequences"]["random"]
    assert oracle["goal_distance_true"][-1] < r["start_goal_distance"] - 0.05
    assert oracle["goal_distance_true"][-1] < random["goal_distance_true"][-1]


def test_bench_world_camera_times_the_clean_step_beside_both_robustness_steps():
    from benchmarks import bench_world_camera

    r = bench_world_camera.measure("world-tworoom", batch=4, rounds=1, warmup=0)
    assert set(r["step_ms"]) == {"clean", "whole_windows", "one_frame"} and all(v > 0 for v in r["step_ms"].values())
    assert set(r["ratio_to_clean"]) == {"whole_windows", "one_frame"} and r["frames_per_window"] == 4
    assert r["batch"] == 4 and r["machine"]["threads"] == 1
