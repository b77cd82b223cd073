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

On stored trajectories (a run trained on a file, or `--data FILE`; world/episodes.py) the camera
conditions are applied to the held-out episodes' frames (frame_edits.camera); the probe reads the
stored state's position columns (*_x / *_y; else the proprio_* columns; else every varying one), the teleport
splices in another episode. Planning and the conditions that change the world itself need a
simulator: the report lists them under `needs_simulator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lejepa_cli.errors import UserError
from lejepa_cli.world.export import WorldModelExport
from lejepa_cli.config import PlanConfig
from lejepa_cli.world.plan import plan
from lejepa_cli.world.plan_settings import describe
from lejepa_cli.probes import r2_score, ridge_cv
from lejepa_cli.world.probe import features
from lejepa_cli.world.episodes import SimulatedEpisodes, as_source
from lejepa_cli.world.frame_edits import camera, data_events
from lejepa_cli.world.sim import World
from lejepa_cli.world.surprise import draw_event_frames, score_events, surprise


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


# The conditions a camera adds to stored frames (frame_edits.camera), and the world option each stands for;
# the others change the world itself and need a simulator.
CAMERA_OPTIONS = {"pixel noise": "noise", "dropped frames": "drop_prob", "colour shift": "hue_shift",
                  "background shift": "bg_shift"}


def condition_names() -> list[str]:
    return [c.name for c in CONDITIONS]


def check_conditions(names: list[str] | None) -> list[str]:
    """The chosen condition names (all by default); UserError for an unknown one."""
    unknown = [c for c in names or [] if c not in condition_names()]
    if unknown:
        raise UserError(f"unknown stress condition '{unknown[0]}' (choose from {', '.join(condition_names())})")
    return list(names or condition_names())


def position_columns(names: list[str]) -> list[int]:
    """The state columns the stress probe reads: positions (names ending _x / _y), else stable-worldmodel's
    `proprio` columns (its worlds' agent position), else every column that is no velocity (e.g. Pendulum's
    theta), else every column."""
    found = [i for i, n in enumerate(names) if n.endswith(("_x", "_y"))]
    return (found or [i for i, n in enumerate(names) if n.startswith("proprio_")]
            or [i for i, n in enumerate(names) if not n.endswith(("_dot", "velocity"))] or list(range(len(names))))


def probe_r2(train: dict[str, np.ndarray], test: dict[str, np.ndarray], cols: list[int]) -> float:
    """Mean held-out R^2 over `cols` of a linear probe on one frame's latent fitted on `train`."""
    pred = ridge_cv(train["frame"], train["state"][:, cols], test["frame"], train["episode"])
    return float(np.mean(r2_score(test["state"][:, cols], pred)))


def stress(model: WorldModelExport, world, *, episodes: int = 20, plan_episodes: int = 4,
           steps: int | None = None, seed: int = 0, settings: PlanConfig | None = None,
           conditions: list[str] | None = None, progress: Callable[[str], None] | None = None,
           adapt: Callable[[World], tuple[WorldModelExport, float]] | None = None) -> dict:
    """The clean row, then every applicable condition at each level; see the module docstring.

    `world`: a World (or SimulatedEpisodes), or StoredEpisodes (world/episodes.py): then the camera
    conditions edit the stored frames (frame_edits.py) and the rest is listed under needs_simulator.
    Planning is what costs (a few seconds per decision and episode on a CPU with the default CEM),
    so it runs on `plan_episodes` episodes per row (0: none), the probe and surprise on `episodes`.
    `settings` is the planner's `plan:` section (None: the library's defaults, as `plan()`).
    `adapt(changed_world) -> (adapted model, seconds)`: each changed row also gets the figures of
    the model adapted to that world without labels (world/adapt.py), under "adapted"; its probe is
    still the read-out fitted on the source model's clean latents, applied to the adapted model's.
    """
    settings = settings or PlanConfig()
    source = as_source(world)
    chosen = check_conditions(conditions)
    if episodes < 1 or plan_episodes < 0:
        raise UserError(f"--episodes must be >= 1 and --plan-episodes >= 0, got {episodes} and {plan_episodes}")
    steps = source.resolve_steps(steps)
    if source.kind == "stored":
        if adapt is not None:
            raise UserError("--adapt simulates target trajectories in each changed world: it needs a simulator "
                            "(--world NAME for a file recorded in a built-in world)")
        return _stored_stress(model, source, episodes, steps, seed, chosen, progress)
    world = source.world
    cols = position_columns(world.state_names)
    fit = source.episodes("fit", 2 * episodes, steps, seed)
    clean_fit = features(model, fit.frames, fit.states)

    def evaluate(used: WorldModelExport, w: World, train: dict[str, np.ndarray]) -> dict:
        # `train`: the read-out's fit, on the clean world's episodes, in the latent space of the model used
        test = SimulatedEpisodes(w).episodes("test", episodes, steps, seed)
        row = {"probe_r2": probe_r2(train, features(used, test.frames, test.states), cols),
               "surprise_auroc": None, "plan_success": None}
        if w.surprise_object:  # teleports need a world whose states can be set
            row["surprise_auroc"] = surprise(used, w, episodes=episodes, steps=steps, seed=seed, kinds=("teleport",))["auroc"]["teleport"]
        if w.action_dim > 0 and plan_episodes > 0 and w.settable:
            row["plan_success"] = plan(used, w, episodes=plan_episodes, seed=seed, settings=settings,
                                       planners=("model",))["success_rate"]
        return row

    rows = [{"condition": "clean", "level": 0.0, "options": {}, **evaluate(model, world, clean_fit)}]
    for cond in CONDITIONS:
        if cond.name not in chosen or not cond.applies(world):
            continue
        for level in cond.levels:
            if progress:
                progress(f"{cond.name} {level:g}")
            changes = cond.options(world, level)
            stressed = world.with_options(**changes)
            row = {"condition": cond.name, "level": float(level), "options": changes, **evaluate(model, stressed, clean_fit)}
            if adapt is not None:
                if progress:
                    progress(f"{cond.name} {level:g}: adapting")
                adapted, seconds = adapt(stressed)
                # The read-out stays the one fitted on the clean world before deployment (no labels after it):
                # adaptation succeeds when the new camera's latents land where the clean camera's did.
                row["adapted"] = {**evaluate(adapted, stressed, clean_fit), "adapt_seconds": round(seconds, 1)}
            rows.append(row)
    return {"world": world.name, "episodes": episodes, "plan_episodes": plan_episodes, "steps": steps,
            "budget": settings.budget, "cem": describe(settings, model.frameskip), "conditions": rows}


def _stored_stress(model: WorldModelExport, source, episodes: int, steps: int, seed: int, chosen: list[str],
                   progress: Callable[[str], None] | None) -> dict:
    """stress() on stored trajectories: the camera conditions applied to the held-out episodes' frames."""
    fit, test = source.episodes("fit", 2 * episodes, steps, seed), source.episodes("test", episodes, steps, seed)
    train = cols = None
    if fit.states is not None and test.states is not None:
        train = features(model, fit.frames, fit.states)
        cols = [c for c in position_columns(source.state_names or []) if train["state"][:, c].std() > 1e-9]
    fs = model.frameskip
    k = draw_event_frames(model, len(test), steps, seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 6]))
    spliced, spliced_actions = data_events(test.frames, test.actions, k * fs, ("teleport",), rng, fs)["teleport"]

    def evaluate(edit: Callable[[np.ndarray], np.ndarray]) -> dict:
        frames = edit(test.frames)  # the same draws for the clean and the spliced episodes
        event = [("teleport", edit(spliced), spliced_actions)]
        return {"probe_r2": probe_r2(train, features(model, frames, test.states), cols) if cols else None,
                "surprise_auroc": score_events(model, frames, test.actions, event, k)["auroc"]["teleport"],
                "plan_success": None}

    rows = [{"condition": "clean", "level": 0.0, "options": {}, **evaluate(lambda f: f)}]
    usable = camera_conditions(test.frames.shape[-1])
    for cond in CONDITIONS:
        if cond.name not in chosen or cond.name not in usable:
            continue
        for level in cond.levels:
            if progress:
                progress(f"{cond.name} {level:g}")
            edit = lambda f, name=cond.name, v=level: camera(f, name, v, seed)  # noqa: E731
            rows.append({"condition": cond.name, "level": float(level), "options": {usable[cond.name]: float(level)},
                         **evaluate(edit)})
    needs = ["planning success"] + [c for c in chosen if c not in CAMERA_OPTIONS]
    names = source.state_names or []
    return {"data": source.name, "split": source.split, "episodes": len(test), "plan_episodes": 0, "steps": steps,
            "probe_columns": [names[c] for c in cols or []], "conditions": rows, "needs_simulator": needs,
            "not_applicable": [c for c in chosen if c in CAMERA_OPTIONS and c not in usable]}


def camera_conditions(channels: int) -> dict[str, str]:
    """The camera conditions stored frames of `channels` channels take, and the world option each stands for."""
    return {k: v for k, v in CAMERA_OPTIONS.items() if channels == 3 or k != "colour shift"}


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
    fig.suptitle(f"{report.get('world') or report.get('data')}: conditions at evaluation")
    fig.tight_layout()
    from lejepa_cli.outputs import save_figure

    try:
        save_figure(fig, out, dpi=100)
    finally:
        plt.close(fig)
