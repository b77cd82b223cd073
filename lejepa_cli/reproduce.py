"""`lejepa reproduce NAME`: a pinned recipe end to end (data -> pretrain -> probe) with a verdict.

Each recipe pins a preset, its overrides, where the data comes from and the range its figures
are expected to land in. The verdict compares the measured linear and kNN top-1 with that range
(PASS / FAIL), and reports time taken and the machine, so a result can be checked by anyone.

    lejepa reproduce demo                 # minutes on a laptop CPU
    lejepa reproduce fashion-mnist        # the CPU recipe for 28 px data (~28 min pretraining on 2 cores)
    lejepa reproduce imagenette-vit-s8    # GPU recipes: fetch their data, or bring it with --data
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lejepa_cli._version import __version__
from lejepa_cli.errors import UserError
from lejepa_cli.outputs import atomic_output
from lejepa_cli.world.reproduce import WorldRecipe


@dataclass(frozen=True)
class Recipe:
    name: str
    preset: str
    about: str
    fetch: str | None = None  # a `lejepa data fetch` name, or None for built-in / user data
    prepare: bool = False  # decode the fetched folder into shards first (image folders)
    resolution: int | None = None  # stored resolution for prepare
    overrides: tuple[str, ...] = ()
    # Shift-table cells (corruption, severity) whose linear-top-1 drop from clean the recipe pins,
    # as metrics named "<corruption>_<severity>_linear_drop"; any: the probe runs its shift table.
    shift_drops: tuple[tuple[str, int], ...] = ()
    corruptions_from: str | None = None  # copy this preset's corruption-view keys (views.noise_p, ...) over the preset's
    world: WorldRecipe | None = None  # a world-model recipe: simulated data, world figures (world/reproduce.py)
    # A second phase: these overrides on top of the recipe's, trained from the first run's last checkpoint in
    # out/`then_dir` (resumable too); the figures are that run's. E.g. a robustness phase on a finished run.
    then: tuple[str, ...] = ()
    then_dir: str = "run-then"
    # Expected ranges per metric (inclusive). Empty: no reference figure is pinned yet.
    expected: dict[str, tuple[float, float]] = field(default_factory=dict)
    source_of_expected: str = ""
    budget: str = ""  # what running it costs, as measured or as the paper states


# Push-T under LeWM's protocol (stable-worldmodel scripts/plan/config/pusht.yaml, solver/cem.yaml): 50 problems, the
# start a held-out episode's first state set in the simulator, the goal its state 25 steps later, budget 50 steps,
# CEM 300 x 30, top 30, horizon 5 blocks of 5 actions; success: block within 20 px and pi/9 of the goal pose. The
# held-out episodes are our pushing policy's (LeWM's expert set cannot be downloaded here). The true-dynamics ceiling
# steps pymunk once per candidate and step, so it runs on 4 problems with a smaller CEM.
PUSHT = WorldRecipe("gym:gym_pusht/PushT-v0", episodes=400, val_episodes=40, steps=100, size=64,
                    position=("agent_x", "agent_y", "block_x", "block_y"), probe_episodes=20, probe_steps=60,
                    surprise_episodes=20, plan_episodes=50,  # planner: the preset's plan section (LeWM's CEM)
                    oracle_episodes=4, oracle_search=(("candidates", 64), ("iterations", 5), ("elites", 8)))

TWOROOM = WorldRecipe("two-room", position=("agent_x", "agent_y"))

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(
        "demo", "demo", "ViT-Micro/8 on the built-in shapes; proves the tool learns, in minutes on a CPU",
        # Floors ~10 (linear) and ~5 (kNN, the noisier) points under the lowest of the seeds x kernel
        # paths measured (docs/recipes.md); the near-collapsed lambda-0.05 run on AVX-512 (kNN 0.668) fails.
        expected={"linear_top1": (0.72, 1.0), "knn_top1": (0.68, 1.0)},
        source_of_expected=("measured here (2-core AMD EPYC, 2026-12-03), seeds 0-4 x AVX-512 / AVX2 kernels, 10 runs: "
                            "linear 0.820-0.881 (mean 0.846), kNN 0.734-0.822 (mean 0.778); the same ViT at random "
                            "init gives 0.194 / 0.179, raw-pixel logistic regression 0.264"),
        budget="~6.5 min on an idle 2-core CPU (6.4 pretraining, 0.1 probe; lambda changes no compute)",
    ),
    Recipe(
        "fashion-mnist", "fmnist", "ResNet-Micro on Fashion-MNIST (28 px, grayscale), sized for a 2-core CPU",
        fetch="fashion-mnist",
        expected={"linear_top1": (0.88, 1.0), "knn_top1": (0.85, 1.0)},
        source_of_expected=("measured here (2-core AMD EPYC, 2026-12-02): linear 0.903, kNN 0.876 on the official "
                            "test split; the same architecture at random init 0.588 / 0.563, raw-pixel logistic "
                            "regression 0.842, the issue's target 0.90"),
        budget="~30 min on a 2-core CPU (26.4 pretraining incl. 0.5 min of evaluations, 2.8 probe)",
    ),
    Recipe(
        "fashion-mnist-robust", "fmnist-robust",
        "the fashion-mnist recipe with corruption views: holds up under sensor noise and brightness shifts",
        fetch="fashion-mnist",
        shift_drops=(("gaussian_noise", 1), ("gaussian_noise", 2), ("brightness", 2)),
        # Clean floors as fashion-mnist's; drops (fractions of top-1) capped at issue 21's targets.
        expected={"linear_top1": (0.88, 1.0), "knn_top1": (0.85, 1.0), "gaussian_noise_1_linear_drop": (-1.0, 0.05),
                  "gaussian_noise_2_linear_drop": (-1.0, 0.10), "brightness_2_linear_drop": (-1.0, 0.05)},
        source_of_expected=("measured here (2-core AMD EPYC with AVX-512, 2026-12-04): linear 0.899, kNN 0.874; noise "
                            "severity 1 / 2 cost 1.2 / 3.1 points, brightness severity 2 1.5 (fashion-mnist without "
                            "corruption views: 38 / 60 and 8)"),
        budget=("15.8 min end to end on one thread of a 2-core CPU beside another run (2026-12-04: pretraining 13.1, "
                "probe and shift table 2.7): PASS, 0.899 / 0.874, drops 1.2 / 3.1 / 1.5"),
    ),
    Recipe(
        "demo-robust", "demo", "the demo with fmnist-robust's corruption views, unchanged: does it keep its accuracy?",
        corruptions_from="fmnist-robust",
        shift_drops=(("gaussian_noise", 1), ("gaussian_noise", 2), ("brightness", 2)),
        # The floors are the lowest of the ten uncorrupted demo runs (docs/recipes.md): keeping the demo's
        # accuracy means landing inside its own spread. fmnist-robust corrupts the global views only
        # (views.corrupt_views: global; all of Fashion-MNIST's views), so the demo's local crops stay clean.
        expected={"linear_top1": (0.82, 1.0), "knn_top1": (0.734, 1.0), "gaussian_noise_1_linear_drop": (-1.0, 0.08)},
        source_of_expected=("the demo's own spread, measured here (lowest of 10 runs: linear 0.820, kNN 0.734); "
                            "measured with these views (AVX-512, 2026-12-04, seeds 0 / 1 / 2): linear 0.833 / 0.836 / "
                            "0.846, kNN 0.739 / 0.751 / 0.745, noise severity 1 cost 5.9 / 3.9 / 4.1 points (uncorrupted "
                            "demo, seed 0: 0.875 / 0.813, noise 1 13.1)"),
        budget="8.6 min on one thread beside other runs (2026-12-04: pretraining 8.4, probe 0.2)",
    ),
    Recipe(
        "world-tworoom", "world-tworoom",
        "a LeWM world model of the built-in two-room world: simulate, train, probe, detect teleports, plan",
        world=TWOROOM,  # planner: the preset's plan section
        # Floors under what was measured (planning 18 / 20 and 19 / 20 on two seeds' problems).
        expected={"position_r2": (0.90, 1.0), "teleport_auroc": (0.95, 1.0), "success_rate": (0.75, 1.0),
                  "random_success_rate": (0.0, 0.10), "oracle_success_rate": (0.80, 1.0)},
        source_of_expected=("measured here (2-core AMD EPYC with AVX-512, 2026-12-04, one thread beside other jobs) on "
                            "the recipe's run: position R^2 0.960 (agent_y; agent_x 0.991; random init 0.40 / 0.54), "
                            "teleport AUROC 1.000, planning 90 % (world model; 95 % with --seed 1), 5 % (random), "
                            "100 % (true dynamics)"),
        budget=("6.5 min end to end on an idle 2-core CPU (2026-12-04: data 0.1, training 5.1, evaluation 1.3; "
                "planning 0.37 s per decision)"),
    ),
    Recipe(
        "world-tworoom-robust", "world-tworoom",
        "world-tworoom, then a camera-robustness phase (a noisy copy of one frame per window, frozen dynamics): stress, "
        "adaptation, planning",
        world=dataclasses.replace(TWOROOM, stress=("pixel noise",), stress_plan_episodes=20,
                                  stress_adapt=("colour shift", "background shift"), adapt_steps=200),
        # The robustness phase (docs/world.md, "Training against the camera"): a noisy copy of one frame per window
        # pulled to its clean latent, the dynamics held fixed, a constant lr; lr 1e-3 x 3000 steps was the best of
        # 1e-4 / 3e-4 / 1e-3 (and 3e-4 x 6000, as good at twice the cost). One copied frame (1.2x a clean step)
        # gives what copies of the whole window (1.9x) gave; 2000 steps pass the noise rows but adapt to 0.80 / 0.81.
        then=("world.camera_views=1", "world.camera_frames=1", "world.camera_noise=0.2", "world.camera_invariance=1",
              "world.freeze_dynamics=true", "train.steps=3000", "optim.lr=1e-3", "optim.warmup_steps=1",
              "optim.min_lr_ratio=1.0"),
        then_dir="run-robust",
        # Issue 29's targets: clean within 0.02 of world-tworoom (stress's clean row 0.975 / 1.000, planning 90 %),
        # noise 0.1 R^2 >= 0.90 and AUROC >= 0.95, noise 0.2 R^2 >= 0.75, planning under noise 0.1 >= 80 %, and after
        # <= 5 minutes of label-free adaptation (160 target episodes) colour 90 / background 0.4 R^2 >= 0.85, AUROC >= 0.90.
        expected={"clean_position_r2": (0.955, 1.0), "clean_teleport_auroc": (0.98, 1.0), "clean_plan_success": (0.85, 1.0),
                  "pixel_noise_0.1_position_r2": (0.90, 1.0), "pixel_noise_0.1_teleport_auroc": (0.95, 1.0),
                  "pixel_noise_0.2_position_r2": (0.75, 1.0), "pixel_noise_0.1_plan_success": (0.80, 1.0),
                  "random_success_rate": (0.0, 0.10),
                  **{f"{row}_adapted_{k}": r for row in ("colour_shift_90", "background_shift_0.4")
                     for k, r in (("position_r2", (0.85, 1.0)), ("teleport_auroc", (0.90, 1.0)),
                                  ("adapt_seconds", (0.0, 300.0)))}},
        source_of_expected=("measured here (2-core Intel Xeon with AVX-512, 2026-12-07, one thread beside two other "
                            "jobs) on the recipe's runs: stress clean row R^2 0.970, AUROC 1.000, planning 95 %; pixel "
                            "noise 0.05 / 0.1 / 0.2 R^2 0.963 / 0.955 / 0.911, AUROC 1.000 each, planning 95 / 95 / 100 % "
                            "(random 5 %, true dynamics 100 %); adapted in 200 steps on 160 target episodes (45 s): colour "
                            "shift 90 R^2 0.882, background shift 0.4 0.895, AUROC 1.000; before this phase: noise 0.1 / "
                            "0.2 R^2 -8.6 / -140. With copies of whole windows (2026-12-06, AMD EPYC): 0.968; 0.962 / "
                            "0.954 / 0.921; adapted 0.869 / 0.857"),
        budget=("about 38 min end to end on a 2-core CPU beside two other jobs (2026-12-07: data 0.1, training 11.1 "
                "for 4000 clean steps + 13.6 for 3000 robust steps, evaluation 13.0); the robust steps cost 1.2x a clean "
                "one, so the recipe trains 1.9x the clean preset"),
    ),
    Recipe(
        "world-push", "world-push",
        "a LeWM world model of the built-in push world (hidden block mass and friction): probe, detect, plan",
        world=WorldRecipe("push", position=("agent_x", "agent_y", "block_x", "block_y"), hidden=("block_mass",),
                          probe_episodes=400, probe_steps=100),  # planner: the preset's plan section
        # A mass is one number per episode: its probes need many episodes (history R^2 0.06 / 0.20 / 0.41 / 0.53
        # fitted on 100 / 200 / 400 / 800). The world model's own planning success (0 %) is reported, not pinned.
        expected={"position_r2": (0.80, 1.0), "block_mass_r2_frame": (-1.0, 0.2), "block_mass_r2_history": (0.45, 1.0),
                  "teleport_auroc": (0.95, 1.0), "random_success_rate": (0.0, 0.10), "oracle_success_rate": (0.80, 1.0)},
        source_of_expected=("measured here (2-core AMD EPYC with AVX-512, 2026-12-04, one thread beside other jobs) on "
                            "the recipe's run: positions linear R^2 0.957-0.989 (random init 0.55-0.63), block mass "
                            "0.08 from one frame and 0.53 from the 3-frame history (MLP; random init 0.51), teleport "
                            "AUROC 0.999; planning on 20 episodes: world model 0 %, random 0 %, true dynamics 100 %; "
                            "train.seed=1: positions 0.985, mass 0.09 / 0.58, planning 5 % / 0 % / 100 %"),
        budget=("11.4 min end to end on a 2-core CPU beside other runs (2026-12-04: data 0.1, training 8.8, "
                "evaluation 2.5 with probes on 1200 episodes): PASS; world model planning 0 %"),
    ),
    Recipe(
        "world-pusht", "world-pusht",
        "a LeWM world model of Push-T (gym-pusht) under LeWM's protocol: 50 problems, goal 25 steps ahead, budget 50",
        world=PUSHT,
        # Floors under rung A of docs/world-use.md (20 problems); the world model's success (5 %) and the
        # coverage scores are reported, not pinned: the issue's >= 50 % is not reached at this size.
        expected={"position_r2": (0.45, 1.0), "teleport_auroc": (0.95, 1.0), "random_success_rate": (0.0, 0.10),
                  "oracle_success_rate": (0.5, 1.0)},
        source_of_expected=("measured here (2-core AMD EPYC shared with ~8 jobs, 2026-12-05) on the preset's run, with 20 "
                            "plan problems instead of 50: position R^2 0.56 (agent_y; block x / y 0.79 / 0.75, angle -0.13), "
                            "teleport AUROC 0.999, planning 5 % (world model), 0 % (random), 75 % (true dynamics, 3 / 4); "
                            "coverage 0.18 / 0.11 / 0.58"),
        budget=("measured here beside ~8 other jobs: data 4.8 min, training 9.3 min, evaluation 38 min on 20 problems "
                "(7.8 s per decision); 50 problems take about 2.5x that evaluation"),
    ),
    Recipe(
        "world-pusht-gpu", "world-pusht-gpu",
        "Push-T at LeWM's sizes (224 px, ViT-Tiny/14, 6-block predictor) on one GPU; the same protocol",
        world=dataclasses.replace(PUSHT, size=224),
        source_of_expected=("expected, not yet measured here (no GPU lent): LeWM reports 96 % on Push-T at budget 50 "
                            "(stable-worldmodel baselines page; 224 px, expert demonstrations, hours on a GPU); this "
                            "recipe trains on the pushing policy's data instead, so no range is pinned"),
        budget="unmeasured: ~45k frames at 224 px simulated on the CPU, 25k steps of batch 128 on one GPU",
    ),
    Recipe(
        "imagenette-vit-s", "vit-s", "ViT-S/16 on ImageNette (10 classes, 224 px); one GPU",
        fetch="imagenette-320", prepare=True, resolution=256,
        overrides=("train.steps=14800", "train.batch_size=256", "train.save_every=1000"),
        source_of_expected="expected, not yet measured here: no reference figure is pinned (no GPU in this workplace)",
        budget="~400 epochs of 9.5k images; expected hours on one GPU, not yet measured",
    ),
    Recipe(
        "imagenette-vit-s8", "vit-s8-128",
        "ViT-S/8 at 128 px on ImageNette (160 px), 800 epochs: the authors' published example; one GPU",
        fetch="imagenette", prepare=True, resolution=160,
        expected={"linear_top1": (0.88, 1.0)},
        source_of_expected=("the authors' figure, not yet measured here: 90.7% online linear top-1 after 800 epochs "
                            "(rbalestr-lab/lejepa MINIMAL.md, 2025-11-20); kNN is not pinned (they report none)"),
        budget="authors: ~200 min on one GPU (~15 s per epoch); not yet measured here",
    ),
    Recipe(
        "imagenet100-resnet50", "resnet50", "ResNet-50 on ImageNet-100 (ImageNet layout folder you provide); GPUs",
        prepare=True, resolution=256,
        # 400 epochs of ImageNet-100's 126,689 training images at lambda 0.05 (docs/method.md sections 3-5: the default, and ~400
        # epochs on smaller data); the one public setting reported near the paper's figure is the same.
        overrides=("train.steps=198000", "train.batch_size=256", "loss.lamb=0.05"),
        expected={"linear_top1": (0.80, 0.87)},
        source_of_expected=("the paper's table, as quoted in galilai-group/lejepa issues #28 and #29 (the table "
                            "itself is an image not readable here): ResNet-50 ~83-84% linear top-1 on ImageNet-100; "
                            "a user reports 82% with 400 epochs, 4 global views, lambda 0.05, lr 5e-4. Not yet "
                            "measured here"),
        budget="400 epochs; arithmetic, not yet measured: ~6 h at 100 TFLOP/s sustained on one GPU, likely 2-3x that",
    ),
    Recipe(
        "imagenet1k-vit-l", "vit-l", "ViT-L/14 on ImageNet-1K, 100 epochs (the paper's setting); many GPUs",
        prepare=True, resolution=256,
        overrides=("train.steps=250000", "train.batch_size=512"),
        expected={"linear_top1": (0.75, 0.80)},
        source_of_expected="paper: ViT-L/14 reaches 77.1% linear top-1 after 100 epochs (docs/method.md section 7)",
        budget="the paper's scale: many GPU-days",
    ),
]}


# Environment variables that pick the CPU kernels: fp32 results differ in rounding between
# instruction sets (AVX-512 vs AVX2), so a run's figures are tied to the path it took.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA")


def machine() -> dict[str, Any]:
    """The hardware and software a report's figures came from, including the CPU kernel path."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # here, so the CLI can list RECIPES without importing torch

    from lejepa_cli import threads

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_settings": {k: os.environ[k] for k in ISA_VARIABLES if os.environ.get(k)},
            "threads": torch.get_num_threads(), "threads_choice": threads.choice(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "lejepa_cli": __version__}


def verdict(measured: dict[str, float], expected: dict[str, tuple[float, float]]) -> tuple[str, list[dict[str, Any]]]:
    """PASS when every expected metric lies in its range; NO-REFERENCE when none is pinned."""
    rows = [{"metric": k, "measured": measured.get(k), "low": lo, "high": hi,
             "ok": measured.get(k) is not None and lo <= measured[k] <= hi} for k, (lo, hi) in expected.items()]
    if not rows:
        return "NO-REFERENCE", rows
    return ("PASS" if all(r["ok"] for r in rows) else "FAIL"), rows


def resolve_data(recipe: Recipe, work: Path, data: str | None) -> str:
    """The data source for the recipe: the user's, a fetched copy, or a prepared folder."""
    from lejepa_cli.data.shards import is_prepared

    if data is None and recipe.fetch is None and recipe.preset != "demo":
        raise UserError(f"recipe '{recipe.name}' needs your data: pass --data FOLDER (ImageNet layout, train/ and val/)")
    source: str | None = data
    if source is None and recipe.fetch is not None:
        from lejepa_cli.data.fetch import fetch

        source = str(fetch(recipe.fetch, work / "data", rerun=f"lejepa reproduce {recipe.name} --out {work}"))
    if source is None:
        return "builtin"
    if recipe.prepare and not is_prepared(Path(source)):
        from lejepa_cli.data.prepare import prepare

        prepared = work / "prepared"
        if not is_prepared(prepared):
            prepare(source, prepared, resolution=recipe.resolution)
        source = str(prepared)
    return source


def _check_eval_split(source: str, split: str, name: str) -> None:
    """Fail before pretraining, not after it, when the data has no split for the final probe."""
    from lejepa_cli.data.shards import is_prepared, read_index

    if is_prepared(Path(source)) and split not in read_index(Path(source))["splits"]:
        raise UserError(f"recipe '{name}' probes on the '{split}' split, which {source} lacks: pass --data a folder "
                        f"with train/ and {split}/ sub-folders, or one made by `lejepa data prepare --val-fraction 0.1`")


def corruption_overrides(preset: str | None) -> list[str]:
    """`--set` items that give a config `preset`'s corruption views (every probability and strength key)."""
    if preset is None:
        return []
    from lejepa_cli.config import load_config
    from lejepa_cli.image.corruptions import OPS

    views = load_config(preset).views
    keys = [key for pair in OPS.values() for key in pair] + ["corrupt_views"]
    return [f"views.{key}={json.dumps(getattr(views, key), separators=(',', ':'))}" for key in keys]


def _probe_figures(run_dir: Path, source: str, recipe: Recipe, progress: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """An image recipe's figures: linear and kNN top-1, and the shift-table drops it pins."""
    from lejepa_cli.image.probe import ProbeOptions, run_probe

    report = run_probe(run_dir, ProbeOptions(data=source, shift=bool(recipe.shift_drops), conditions=False, progress=progress))
    measured = {"linear_top1": report["linear_top1"], "knn_top1": report["knn_top1"]["20"]}
    for corruption, severity in recipe.shift_drops:
        measured[f"{corruption}_{severity}_linear_drop"] = report["shift"]["corruptions"][corruption][str(severity)]["linear_drop"]
    return measured, report


def _train_then(recipe: Recipe, overrides: list[str], first: Path, out: Path, progress: bool):
    """The recipe's second phase from the first run's last checkpoint; returns its config and folder."""
    from lejepa_cli.checkpoint import list_checkpoints
    from lejepa_cli.config import load_config
    from lejepa_cli.train import train

    cfg = load_config(recipe.preset, [*overrides, *recipe.then])
    run_dir = out / recipe.then_dir
    # "auto": continue the phase from its newest good checkpoint; with none, start from the first run's weights
    train(cfg, run_dir, resume="auto", init_from=list_checkpoints(first / "checkpoints")[-1], progress=progress)
    return cfg, run_dir


def reproduce(name: str, out: Path, *, data: str | None = None, extra: list[str] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run recipe `name` in folder `out` (resumable: running it again continues) and return the report."""
    from lejepa_cli.config import apply_overrides, diff_keys, load_config
    from lejepa_cli.resume import resume_point
    from lejepa_cli.train import train

    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}': choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    t0 = time.perf_counter()
    if recipe.world is not None and data is None:
        from lejepa_cli.world.reproduce import simulate_data

        source = simulate_data(recipe.world, out, progress)
    else:
        source = resolve_data(recipe, out, data)
    overrides = [*corruption_overrides(recipe.corruptions_from), *recipe.overrides, f"data.source={source}", *(extra or [])]
    run_dir = out / "run"
    cfg = load_config(recipe.preset, overrides)
    settings = cfg.plan  # the recipe's planner (its preset's, --set plan.* on top), also for a run older than the section
    point = resume_point(run_dir)  # the run in `out`, if any: its newest good checkpoint and config
    trained = None if point is None else point[1]
    # Continuing a run of another config (an older recipe, other --set values) would pin this
    # recipe's verdict on different settings; keys the user sets now are theirs to change.
    own = {item.partition("=")[0].strip() for item in (extra or [])}
    changed = [] if trained is None else [k for k in diff_keys(trained.to_dict(), cfg.to_dict())
                                          if k not in own and not k.startswith("plan.")]  # planning changes no training
    if changed:
        raise UserError(f"{run_dir} holds a run with a different config than recipe '{name}' "
                        f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}); use another --out or delete it")
    if trained is not None:
        cfg = apply_overrides(trained, overrides)  # the run continues as trained, with this call's overrides
    _check_eval_split(source, cfg.data.eval_split, name)
    t_data = time.perf_counter()
    train(cfg, run_dir, resume="auto" if point is None else str(point[0]), progress=progress)  # scanned once
    if recipe.then:
        cfg, run_dir = _train_then(recipe, overrides, run_dir, out, progress)
    t_train = time.perf_counter()
    if recipe.world is not None:
        from lejepa_cli.world.reproduce import measure

        measured, report = measure(run_dir, recipe.world, settings, seed=cfg.train.seed)
    else:
        measured, report = _probe_figures(run_dir, source, recipe, progress)
    result, rows = verdict(measured, recipe.expected)
    summary = {
        "recipe": recipe.name, "verdict": result, "checks": rows, "measured": measured,
        "expected_from": recipe.source_of_expected, "budget": recipe.budget,
        "minutes": {"data": (t_data - t0) / 60, "pretrain": (t_train - t_data) / 60,
                    "probe": (time.perf_counter() - t_train) / 60, "total": (time.perf_counter() - t0) / 60},
        "machine": machine(), "config": cfg.to_dict(), "probe": report,
    }
    with atomic_output(out / "reproduce.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, default=str))
    return summary
