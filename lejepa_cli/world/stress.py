"""Which condition breaks a world model, and by how much: each knob at graded levels, at evaluation.

    from lejepa_cli.world.stress import stress
    report = stress(model, world, episodes=20)
    report["conditions"]   # rows: condition, level, options, probe_r2, surprise_auroc, plan_success

The model is trained on the clean world; here the world it is evaluated in changes, one
condition at a time (the first row is the clean world itself):
- pixel noise (`noise`), dropped frames (`drop_prob`), colour shift (`hue_shift`), background
  shift (`bg_shift`, darker for a light background, lighter for a dark one): what the camera sees;
- random disturbances (`kick_prob`: pushes the actions did not cause, now and then) and
  stochastic dynamics (a push of growing size at every step);
- hidden parameters outside the training range (worlds with masses: masses drawn from the
  training range widened by `level` on both sides, [min / level, max x level]).
Figures per row: `probe_r2`, the mean held-out R^2 over the position variables of a linear probe
fitted on the clean world's episodes (a deployed read-out, scored where the world has drifted);
`surprise_auroc`, the teleport AUROC within the changed world; `plan_success`, the world-model
planner's success rate in the changed world (None for a world without actions, and both None for a
Gymnasium world whose states cannot be set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.world.plan import CEMConfig, plan
from lejepa_cli.probes import r2_score, ridge_cv
from lejepa_cli.world.probe import TEST_STREAM, TRAIN_STREAM, features, simulated_split
from lejepa_cli.world.sim import World
from lejepa_cli.world.surprise import surprise


@dataclass(frozen=True)
class Condition:
    name: str
    levels: tuple[float, ...]
    options: Callable[[World, float], dict]  # the world options that set this condition at a level
    applies: Callable[[World], bool] = lambda world: True


def _mass_out_of_range(world: World, factor: float) -> dict:
    # Widen the range on both sides: scaling every mass by one factor would change nothing where
    # only mass ratios matter (balls' elastic collisions).
    return {"mass_min": max(0.05, world.options["mass_min"] / factor), "mass_max": min(100.0, world.options["mass_max"] * factor)}


def _background_shift(world: World, amount: float) -> dict:
    # Away from the clip: darker for a light background, lighter for a dark one.
    frame = world.render(world.reset(np.random.default_rng(0), 1))
    return {"bg_shift": -amount if np.median(frame) > 127 else amount}


CONDITIONS = (
    Condition("pixel noise", (0.05, 0.1, 0.2), lambda w, v: {"noise": v}),
    Condition("dropped frames", (0.2, 0.5), lambda w, v: {"drop_prob": v}),
    Condition("colour shift", (30.0, 90.0), lambda w, v: {"hue_shift": v}),
    Condition("background shift", (0.2, 0.4), _background_shift),
    Condition("random disturbances", (0.05, 0.2), lambda w, v: {"kick_prob": v, "kick_strength": 1.0}),
    Condition("stochastic dynamics", (0.25, 0.5), lambda w, v: {"kick_prob": 1.0, "kick_strength": v}),
    Condition("hidden parameters out of range", (2.0, 4.0), _mass_out_of_range, lambda w: "mass_max" in w.options),
)


def condition_names() -> list[str]:
    return [c.name for c in CONDITIONS]


def check_conditions(names: list[str] | None) -> list[str]:
    """The chosen condition names (all by default); UserError for an unknown one."""
    unknown = [c for c in names or [] if c not in condition_names()]
    if unknown:
        raise UserError(f"unknown stress condition '{unknown[0]}' (choose from {', '.join(condition_names())})")
    return list(names or condition_names())


def position_columns(world: World) -> list[int]:
    """The x / y columns, or (a world without them, e.g. Pendulum's theta) every column that is no velocity."""
    xy = [i for i, n in enumerate(world.state_names) if n.endswith(("_x", "_y"))]
    return xy or [i for i, n in enumerate(world.state_names) if not n.endswith(("_dot", "velocity"))] or list(range(world.state_dim))


def stress(model: WorldModelExport, world: World, *, episodes: int = 20, plan_episodes: int = 4,
           steps: int = 60, seed: int = 0, cfg: CEMConfig = CEMConfig(), budget: int = 50,
           conditions: list[str] | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """The clean row, then every applicable condition at each level; see the module docstring.

    Planning is what costs (a few seconds per decision and episode on a CPU with the default CEM),
    so it runs on `plan_episodes` episodes per row (0: none), the probe and surprise on `episodes`.
    """
    chosen = check_conditions(conditions)
    if episodes < 1 or plan_episodes < 0:
        raise UserError(f"--episodes must be >= 1 and --plan-episodes >= 0, got {episodes} and {plan_episodes}")
    cols = position_columns(world)
    train = features(model, *simulated_split(world, 2 * episodes, steps, seed, TRAIN_STREAM))

    def evaluate(w: World) -> dict:
        test = features(model, *simulated_split(w, episodes, steps, seed, TEST_STREAM))
        r2 = r2_score(test["state"][:, cols], ridge_cv(train["frame"], train["state"][:, cols], test["frame"], train["episode"]))
        row = {"probe_r2": float(np.mean(r2)), "surprise_auroc": None, "plan_success": None}
        if w.surprise_object:  # teleports need a world whose states can be set
            row["surprise_auroc"] = surprise(model, w, episodes=episodes, steps=steps, seed=seed, kinds=("teleport",))["auroc"]["teleport"]
        if w.action_dim > 0 and plan_episodes > 0 and w.settable:
            row["plan_success"] = plan(model, w, episodes=plan_episodes, budget=budget, seed=seed, cfg=cfg,
                                       planners=("model",))["success_rate"]
        return row

    rows = [{"condition": "clean", "level": 0.0, "options": {}, **evaluate(world)}]
    for cond in CONDITIONS:
        if cond.name not in chosen or not cond.applies(world):
            continue
        for level in cond.levels:
            if progress:
                progress(f"{cond.name} {level:g}")
            changes = cond.options(world, level)
            stressed = world.with_options(**changes)
            rows.append({"condition": cond.name, "level": float(level), "options": changes, **evaluate(stressed)})
    return {"world": world.name, "episodes": episodes, "plan_episodes": plan_episodes, "steps": steps, "budget": budget,
            "cem": {"candidates": cfg.candidates, "iterations": cfg.iterations, "elites": cfg.elites, "horizon": cfg.horizon},
            "conditions": rows}


def plot_stress(report: dict, out: str) -> None:
    """Three panels (probe R^2, surprise AUROC, planning success) against each condition's level; clean dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["conditions"]
    clean = rows[0]
    keys = [("probe_r2", "position probe R^2"), ("surprise_auroc", "teleport AUROC"), ("plan_success", "planning success")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = list(dict.fromkeys(r["condition"] for r in rows[1:]))
    for ax, (key, label) in zip(axes, keys):
        if clean[key] is not None:
            ax.axhline(clean[key], color="black", ls="--", lw=1, label="clean")
        for name in names:
            pts = [(i, r[key]) for i, r in enumerate(r for r in rows if r["condition"] == name) if r[key] is not None]
            if pts:
                ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("level (1 = mildest)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if key == "probe_r2":  # a broken read-out goes far below 0; the range that tells apart is [-1, 1]
            ax.set_ylim(max(ax.get_ylim()[0], -1.05), 1.05)
            label += " (axis cut at -1)"
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{report['world']}: conditions at evaluation")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
