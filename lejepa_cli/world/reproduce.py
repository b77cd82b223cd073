"""World recipes of `lejepa reproduce`: simulate a built-in world, train, then probe, detect and plan.

`lejepa_cli.reproduce` runs every recipe (resume, verdict, report); for a world recipe it calls
`simulate_data` instead of fetching images and `measure` instead of the image probe. The
figures `measure` returns are the ones a world recipe can pin:

    position_r2            the lowest held-out linear R^2 of the position variables, one frame's latent
    <param>_r2_frame       a hidden parameter's best R^2 (linear or MLP) from one frame's latent
    <param>_r2_history     ... and from the predictor's history window (`probe_history` frames)
    teleport_auroc         surprise detection of teleports
    success_rate, random_success_rate, oracle_success_rate, seconds_per_decision   planning
    coverage, block_error_px, angle_error_deg, agent_error_px (each also random_ / oracle_)
                           a world's own scores of the final states (Push-T's: its coverage, and how far
                           block, angle and agent end from the goal's; means)
    <condition>_<level>_position_r2 | _teleport_auroc | _plan_success    a `world stress` row (world/stress.py)
    clean_position_r2 | clean_teleport_auroc | clean_plan_success     its clean row, the rows' reference
    <condition>_<level>_adapted_position_r2 | ... | _adapt_seconds      the same after label-free adaptation

Condition names are stress's with '_' for spaces: pixel_noise_0.1_position_r2, colour_shift_90_adapted_teleport_auroc.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lejepa_cli.config import PlanConfig


@dataclass(frozen=True)
class WorldRecipe:
    world: str  # a built-in world (two-room, push, balls) or gym:ENV_ID
    sets: tuple[str, ...] = ()  # world options of the simulated data (`lejepa world simulate --set`)
    episodes: int = 400  # training episodes simulated
    val_episodes: int = 40  # held-out episodes (the training loop's rollout evaluation)
    steps: int = 100  # steps per episode
    size: int = 64  # rendered frame side in pixels
    position: tuple[str, ...] = ()  # state variables pinned together as position_r2 (their minimum)
    hidden: tuple[str, ...] = ()  # hidden parameters pinned from one frame and from a history
    probe_episodes: int = 20  # held-out probe episodes (twice as many fit the probes)
    probe_history: int | None = None  # window frames of the history features (None: the predictor's H)
    probe_steps: int = 60  # steps per probe episode
    surprise_episodes: int = 30
    plan_episodes: int = 20  # 0: no planning (a world without actions); the planner: the preset's `plan:` section
    # The true-dynamics ceiling on its own problems and a smaller search (None: on the plan problems with the same
    # settings); a simulator stepped per candidate (Push-T's pymunk) cannot afford LeWM's CEM on every problem.
    oracle_episodes: int | None = None
    oracle_search: tuple[tuple[str, Any], ...] = ()  # plan-section keys the ceiling overrides, e.g. (("candidates", 64),)
    # `world stress` rows pinned beside the clean figures: conditions measured as deployed, with planning on
    # `stress_plan_episodes` problems per row, and conditions measured again after `adapt_steps` of label-free
    # adaptation to each (world/adapt.py; the read-out stays the one fitted on the clean world).
    stress: tuple[str, ...] = ()
    stress_plan_episodes: int = 0
    stress_adapt: tuple[str, ...] = ()
    adapt_steps: int = 200
    adapt_episodes: int | None = None  # unlabelled target episodes per adaptation (None: world/adapt.py's ADAPT_EPISODES)


def simulate_data(recipe: WorldRecipe, work: Path, progress: bool) -> str:
    """The recipe's trajectory folder in `work`/data (simulated once; a finished folder is reused)."""
    from lejepa_cli.world.prepare import simulate_dataset

    out = work / "data"
    simulate_dataset(recipe.world, out, episodes=recipe.episodes, val_episodes=recipe.val_episodes,
                     steps=recipe.steps, size=recipe.size, sets=list(recipe.sets), progress=progress)
    return str(out)


def measure(run_dir: Path, recipe: WorldRecipe, settings: PlanConfig, seed: int = 0) -> tuple[dict[str, float], dict[str, Any]]:
    """The recipe's figures for the newest checkpoint in `run_dir`, and the full reports they come from;
    `settings`: the planner's (the recipe's config's `plan:` section, its preset's)."""
    from lejepa_cli.world.probe import probe_world
    from lejepa_cli.world.surprise import surprise
    from lejepa_cli.world.runs import open_world_run

    used = open_world_run(run_dir)
    world = used.require_world("reproduce")
    model = used.model
    probe = probe_world(model, world, episodes=recipe.probe_episodes, steps=recipe.probe_steps, seed=seed,
                        history=recipe.probe_history)
    measured: dict[str, float] = {}
    if recipe.position:
        measured["position_r2"] = min(probe["r2"][name] for name in recipe.position)
    for name in recipe.hidden:
        measured[f"{name}_r2_frame"] = probe["hidden"][name]["frame"]
        measured[f"{name}_r2_history"] = probe["hidden"][name]["history"]
    events = surprise(model, world, episodes=recipe.surprise_episodes, seed=seed, kinds=("teleport",))
    measured["teleport_auroc"] = events["auroc"]["teleport"]
    reports: dict[str, Any] = {"probe": probe, "surprise": events, "world_note": used.note}
    if recipe.plan_episodes:
        reports["plan"] = planned = _plan_figures(model, world, recipe, settings, seed)
        scores = [f"{who}{name}" for name in planned.get("world_scores", []) for who in ("", "random_", "oracle_")]
        for key in ("success_rate", "random_success_rate", "oracle_success_rate", "seconds_per_decision", *scores):
            if key in planned:
                measured[key] = planned[key]
    if recipe.stress or recipe.stress_adapt:
        reports["stress"] = _stress_figures(used.source, model, world, recipe, settings, seed, measured)
    return measured, reports


def _stress_figures(source: Path, model, world, recipe: WorldRecipe, settings: PlanConfig, seed: int,
                    measured: dict[str, float]) -> list[dict[str, Any]]:
    """The recipe's stress rows (and adapted rows) as figures in `measured`; returns the stress reports."""
    from lejepa_cli.world.adapt import adapted_in_world
    from lejepa_cli.world.stress import stress

    def adapt(changed):
        episodes = {} if recipe.adapt_episodes is None else {"episodes": recipe.adapt_episodes}
        return adapted_in_world(source, changed, steps=recipe.adapt_steps, seed=seed, **episodes)

    reports = []
    for conditions, plan_episodes, adapter in ((recipe.stress, recipe.stress_plan_episodes, None),
                                               (recipe.stress_adapt, 0, adapt)):
        if not conditions:
            continue
        report = stress(model, world, episodes=recipe.probe_episodes, plan_episodes=plan_episodes, steps=recipe.probe_steps,
                        seed=seed, settings=settings, conditions=list(conditions), adapt=adapter)
        for row in report["conditions"][bool(adapter):]:  # an adapted report's clean row repeats the first's
            # the clean row as 'clean_*': stress's figures (mean R^2 over the positions), which the rows compare with
            name = "clean" if row["condition"] == "clean" else f"{row['condition'].replace(' ', '_')}_{row['level']:g}"
            for tag, figures in (("", row), ("_adapted", row.get("adapted"))):
                for key, figure in (figures or {}).items():
                    label = {"probe_r2": "position_r2", "surprise_auroc": "teleport_auroc"}.get(key, key)
                    if label in ("position_r2", "teleport_auroc", "plan_success", "adapt_seconds") and figure is not None:
                        measured[f"{name}{tag}_{label}"] = figure
        reports.append(report)
    return reports


def _plan_figures(model, world, recipe: WorldRecipe, settings: PlanConfig, seed: int) -> dict[str, Any]:
    """The world-model and random planners on `plan_episodes` problems; the true-dynamics ceiling beside them."""
    from dataclasses import replace

    from lejepa_cli.world.plan import PLANNERS, plan

    if recipe.oracle_episodes is None:
        return plan(model, world, episodes=recipe.plan_episodes, seed=seed, settings=settings)
    planned = plan(model, world, episodes=recipe.plan_episodes, seed=seed, settings=settings,
                   planners=tuple(p for p in PLANNERS if p != "oracle"))
    if recipe.oracle_episodes > 0:
        ceiling = plan(model, world, episodes=recipe.oracle_episodes, seed=seed,
                       settings=replace(settings, **dict(recipe.oracle_search)), planners=("oracle",))
        planned.update({k: v for k, v in ceiling.items() if k.startswith("oracle_")})
        planned["oracle_episodes"] = recipe.oracle_episodes
    return planned
