"""`lejepa world list | simulate | plan | probe | surprise | stress`: thin commands over lejepa_cli.world."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from lejepa_cli.errors import UserError
from lejepa_cli.terminal import make_console
from lejepa_cli.world.plan_settings import GOAL_OFFSET, CEMConfig

app = typer.Typer(help="Built-in simulated worlds and trained world models: list and simulate worlds; plan, probe and surprise with a world run.", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)


Run = Annotated[Path, typer.Argument(help="A world run folder, one of its checkpoints, or its export folder.")]
Episodes = Annotated[int, typer.Option("--episodes", "-n", min=1, max=500, help="Evaluation episodes.")]
JsonFile = Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")]
Seed = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the evaluation episodes, goals and planner.")]
Candidates = Annotated[int, typer.Option(min=1, max=20000, help="CEM candidate sequences per iteration.")]
Iterations = Annotated[int, typer.Option(min=1, max=1000, help="CEM iterations per decision.")]
Elites = Annotated[int, typer.Option(min=1, max=20000, help="CEM elites kept per iteration (at most --candidates).")]
Horizon = Annotated[int, typer.Option(min=1, max=100, help="Planning horizon in frameskip blocks.")]
Cost = Annotated[str, typer.Option("--cost", help="Planning cost: 'final' (latent distance to the goal after the last block, LeWM's) or 'min' (the nearest any block of the sequence gets).")]
NoiseBeta = Annotated[float, typer.Option("--noise-beta", min=0.0, max=4.0, help="Temporal colour of CEM's sampling noise: 0 white (LeWM's), 2 about a random walk (iCEM): samples that keep a direction reach further.")]
Steps = Annotated[int, typer.Option(min=2, max=2000, help="Steps per simulated episode.")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a world option at evaluation, key=value (repeatable).")]


@app.command("list")
def list_worlds() -> None:
    """Show the built-in worlds, their state variables and their options (set with --set key=value)."""
    from lejepa_cli.world.catalog import world_class, world_names
    from lejepa_cli.world.sim import COMMON_OPTIONS

    for name in world_names():
        cls = world_class(name)
        world = cls(size=16)
        table = Table("option", "default", "range", "meaning", title=f"{name}: {cls.description}", title_justify="left")
        for o in (*cls.options_spec, *COMMON_OPTIONS):
            table.add_row(o.name, str(o.default), f"{o.low} .. {o.high}", o.help)
        console.print(table)
        console.print(f"  actions: {cls.action_dim}-D in [-1, 1]; state: {', '.join(world.state_names)}; "
                      f"goal reached within {cls.success_radius}", highlight=False)
    console.print("gym:ENV_ID: any Gymnasium environment with rgb_array frames and Box actions, e.g. gym:Pendulum-v1, "
                  "gym:gym_pusht/PushT-v0 (extra [gym]; docs/world-use.md)", highlight=False)


@app.command()
def simulate(
    name: Annotated[str, typer.Argument(help="World name: two-room, push or balls (see `lejepa world list`), or gym:ENV_ID for a Gymnasium environment (extra [gym]).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the trajectory dataset to.")],
    episodes: Annotated[int, typer.Option(help="Training episodes.")] = 400,
    steps: Annotated[int, typer.Option(help="Frames (and actions) per episode.")] = 100,
    val_episodes: Annotated[int, typer.Option(help="Held-out episodes (split 'val'), simulated from their own seeds.")] = 40,
    size: Annotated[int, typer.Option(help="Frame side in pixels (RGB).")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed, options and counts give the same data.")] = 0,
    sets: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="World option key=value (repeatable), e.g. noise=0.05.")] = None,
    env_kwargs: Annotated[Optional[list[str]], typer.Option("--env-kwargs", help="gym: worlds: keyword arguments of gymnasium.make, one JSON object or key=value (repeatable; values read as JSON).")] = None,
    policy: Annotated[Optional[str], typer.Option("--policy", help="gym: worlds: the data-collection policy, module:function called as function(observation, env, rng) -> action in the env's units (default: smooth random exploration; Push-T: a pushing policy).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a different dataset already in --out.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Simulate a world with a smooth random exploration policy into a trajectory dataset."""
    from lejepa_cli.world.prepare import simulate_dataset

    s = simulate_dataset(name, out, episodes=episodes, steps=steps, val_episodes=val_episodes, size=size, seed=seed,
                         sets=sets, overwrite=overwrite, progress=not no_progress, env_kwargs=env_kwargs, policy=policy)
    counts = ", ".join(f"{split} {e['episodes']} episodes x {e['steps'] // max(e['episodes'], 1)} steps" for split, e in s["splits"].items())
    state = "already up to date" if s["up_to_date"] else f"done in {s['seconds']:.1f} s"
    err_console.print(f"[green]{state}:[/] {counts} at {s['resolution']}px -> {s['out']}", highlight=False)


def _open(run: Path, json_file: Path | None, sets: list[str] | None, what: str):
    from lejepa_cli.world.runs import open_world_run

    _check_output(json_file, "--json")
    used = open_world_run(run, world_sets=sets)
    return used, used.require_world(what)


def _cem_config(candidates: int, iterations: int, elites: int, horizon: int, cost: str, noise_beta: float) -> CEMConfig:
    """The planner's settings from the command's CEM options, checked."""
    cfg = CEMConfig(candidates=candidates, iterations=iterations, elites=elites, horizon=horizon, cost=cost,
                    noise_beta=noise_beta)
    cfg.check()
    return cfg


def _check_output(path: Path | None, option: str) -> None:
    """An output file the command will write, checked before the work, not after it."""
    if path is not None:
        from lejepa_cli.outputs import check_output_file

        check_output_file(path, option)


def _describe(used) -> None:
    """After the input checks (so a bad input stays one line): which world the figures come from."""
    err_console.print(f"world: {used.note}; frames {used.world.size}px, frameskip {used.model.frameskip}, "
                      f"history {used.model.history}", highlight=False, soft_wrap=True)


def _finish(report: dict, json_file: Path | None, started: float, used) -> None:
    from lejepa_cli.image.report import write_json

    report["world_source"] = used.note  # which simulator the figures come from

    report["seconds"] = round(time.perf_counter() - started, 2)
    if json_file is not None:
        write_json({k: v for k, v in report.items() if k != "video"}, json_file)
        err_console.print(f"report written to {json_file}", highlight=False, soft_wrap=True)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f} %" if pct else f"{x:.3f}"


def plan_cmd(
    run: Run,
    episodes: Episodes = 20,
    budget: Annotated[int, typer.Option(min=1, max=1000, help="Environment steps per episode.")] = 50,
    candidates: Candidates = CEMConfig.candidates,
    iterations: Iterations = CEMConfig.iterations,
    elites: Elites = CEMConfig.elites,
    horizon: Horizon = CEMConfig.horizon,
    cost: Cost = CEMConfig.cost,
    noise_beta: NoiseBeta = CEMConfig.noise_beta,
    goal_offset: Annotated[int, typer.Option("--goal-offset", min=0, max=1000, help="Goals: where the exploration policy is this many steps after the start (LeWM's protocol); 0: goals anywhere in the world.")] = GOAL_OFFSET,
    goal: Annotated[Optional[Path], typer.Option("--goal", help="A goal image (PNG/JPEG at the world's frame size) instead of held-out goal states; success is then unknown, the final latent distance is reported.")] = None,
    save_video: Annotated[Optional[Path], typer.Option("--save-video", help="Write episode 0 of the world-model planner with its goal beside it: a PNG strip, or a GIF when the name ends in .gif.")] = None,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the random policy and the true-dynamics planner.")] = False,
    seed: Seed = 0,
    sets: Sets = None,
    json_file: JsonFile = None,
) -> None:
    """Plan towards goal images with CEM in the model's latent space; random policy and true dynamics beside it."""
    from lejepa_cli.world import plan as planning

    started = time.perf_counter()
    used, world = _open(run, json_file, sets, "plan")
    world.require_state_setting("world plan")
    cfg = _cem_config(candidates, iterations, elites, horizon, cost, noise_beta)
    _check_output(save_video, "--save-video")
    if goal is not None:
        report = _plan_to_image(used, goal, episodes, budget, cfg, seed, save_video)
        _finish(report, json_file, started, used)
        return
    _describe(used)
    planners = ("model",) if no_baselines else planning.PLANNERS
    report = planning.plan(used.model, world, episodes=episodes, budget=budget, seed=seed, cfg=cfg,
                           planners=planners, record=save_video is not None, goal_offset=goal_offset)
    goals = f"goals {goal_offset} exploration steps ahead" if goal_offset else "goals anywhere"
    table = Table("planner", "success", "mean steps to success", "s / decision",
                  title=f"{world.name}: {episodes} episodes, {goals}, budget {budget} steps, CEM {candidates}x{iterations}, horizon {horizon}, cost {cost}")
    for kind, label in (("", "world model (CEM)"), ("random_", "random policy"), ("oracle_", "true dynamics (CEM)")):
        if f"{kind}success_rate" in report:
            table.add_row(label, _fmt(report[f"{kind}success_rate"], pct=True), _fmt(report[f"{kind}mean_steps"]),
                          _fmt(report[f"{kind}seconds_per_decision"]))
    console.print(table)
    if save_video is not None:
        video = report["video"]
        planning.save_strip(video["frames"], video["goal"], save_video, every=used.model.frameskip)
        err_console.print(f"episode 0 ({'reached' if video['success'] else 'not reached'}) written to {save_video}", highlight=False)
    _finish(report, json_file, started, used)


def _plan_to_image(used, goal: Path, episodes: int, budget: int, cfg: CEMConfig, seed: int, save_video: Path | None) -> dict:
    from PIL import Image, UnidentifiedImageError

    from lejepa_cli.world import plan as planning

    try:
        with Image.open(goal, formats=("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")) as im:  # never EPS (Ghostscript)
            image = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise UserError(f"--goal {goal} is not a readable image ({e.__class__.__name__})") from None
    model, world = used.model, used.world
    images = planning.check_goal_images(world, image, episodes)
    _describe(used)
    starts, _ = planning.draw_problems(world, episodes, seed)
    result = planning.run_episodes("model", world, starts, None, model=model, frameskip=model.frameskip, budget=budget,
                                   cfg=cfg, seed=seed, goal_images=images, record=save_video is not None)
    report = {"episodes": episodes, "budget": budget, "goal": str(goal), "success_rate": None,
              "seconds_per_decision": result["seconds_per_decision"],
              "final_latent_distance": float(result["final_cost"].mean())}
    console.print(f"{episodes} episodes towards {goal}: mean final squared latent distance "
                  f"{report['final_latent_distance']:.3f}, {report['seconds_per_decision']:.3f} s per decision", highlight=False)
    if save_video is not None:
        planning.save_strip(result["frames"], result["goal_image"], save_video, every=model.frameskip)
    return report


def probe_cmd(
    run: Run,
    episodes: Episodes = 20,
    steps: Steps = 60,
    history: Annotated[Optional[int], typer.Option(min=1, max=1000, help="Window frames in the history features (default: the predictor's history H).")] = None,
    seed: Seed = 0,
    sets: Sets = None,
    json_file: JsonFile = None,
) -> None:
    """Linear and MLP probes from latents to every true state variable (held-out R^2), beside a random-init encoder."""
    from lejepa_cli.world.probe import probe_world, require_full_history

    started = time.perf_counter()
    used, world = _open(run, json_file, sets, "probe")
    require_full_history(used.model, steps, history)
    _describe(used)
    report = probe_world(used.model, world, episodes=episodes, steps=steps, seed=seed, history=history)
    hist = f"history of {report['history']}"
    table = Table("state variable", "linear", "MLP", f"linear ({hist})", f"MLP ({hist})", "linear, random init",
                  "MLP (history), random init",
                  title=f"{world.name}: held-out R^2 ({episodes} episodes; probes fitted on {report['train_episodes']})")
    for name in world.state_names:
        table.add_row(name, *(_fmt(report[k][name]) for k in ("r2", "r2_mlp", "r2_history", "r2_history_mlp",
                                                              "r2_random_init", "r2_history_mlp_random_init")))
    console.print(table)
    for name, h in report["hidden"].items():
        console.print(f"hidden {name}: R^2 {h['frame']:.2f} from one frame, {h['history']:.2f} from the history "
                      f"-> recoverable from: {h['recoverable_from']}", highlight=False)
    _finish(report, json_file, started, used)


def surprise_cmd(
    run: Run,
    episodes: Episodes = 20,
    steps: Steps = 60,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of surprise along one episode, the event marked.")] = None,
    seed: Seed = 0,
    sets: Sets = None,
    json_file: JsonFile = None,
) -> None:
    """Inject impossible events (teleport, colour change, pass through a wall) and report surprise AUROC per kind."""
    from lejepa_cli.world.surprise import require_event_frames, surprise

    started = time.perf_counter()
    used, world = _open(run, json_file, sets, "surprise")
    _check_output(plot, "--plot")
    require_event_frames(used.model, steps)
    _describe(used)
    report = surprise(used.model, world, episodes=episodes, steps=steps, seed=seed, plot=str(plot) if plot else None)
    table = Table("event", "AUROC", "mean surprise at the event", "mean surprise, normal frames",
                  title=f"{world.name}: {episodes} held-out episodes of {steps} steps")
    for kind, value in report["auroc"].items():
        table.add_row(kind, f"{value:.3f}", _fmt(report["mean_event_surprise"][kind]), _fmt(report["mean_normal_surprise"]))
    console.print(table)
    if plot is not None:
        err_console.print(f"plot written to {plot}", highlight=False)
    _finish(report, json_file, started, used)


def stress_cmd(
    run: Run,
    episodes: Episodes = 20,
    plan_episodes: Annotated[int, typer.Option(min=0, max=500, help="Planning episodes per row (0: no planning); planning is what costs.")] = 4,
    candidates: Candidates = CEMConfig.candidates,
    iterations: Iterations = CEMConfig.iterations,
    elites: Elites = CEMConfig.elites,
    horizon: Horizon = CEMConfig.horizon,
    cost: Cost = CEMConfig.cost,
    noise_beta: NoiseBeta = CEMConfig.noise_beta,
    condition: Annotated[Optional[list[str]], typer.Option("--condition", "-c", help="Only this condition (repeatable), e.g. 'pixel noise'.")] = None,
    steps: Steps = 60,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: the three figures against each condition's level.")] = None,
    seed: Seed = 0,
    sets: Sets = None,
    json_file: JsonFile = None,
) -> None:
    """Each deployment condition (noise, dropped frames, colour/background shift, disturbances, stochastic dynamics, out-of-range hidden parameters) at graded levels: probe R^2, surprise AUROC, planning success beside the clean world."""
    from lejepa_cli.world import probe, surprise
    from lejepa_cli.world.stress import check_conditions, plot_stress, stress

    started = time.perf_counter()
    used, world = _open(run, json_file, sets, "stress")
    cfg = _cem_config(candidates, iterations, elites, horizon, cost, noise_beta)
    _check_output(plot, "--plot")
    check_conditions(condition)
    probe.require_full_history(used.model, steps)
    surprise.require_event_frames(used.model, steps)
    _describe(used)
    report = stress(used.model, world, episodes=episodes, plan_episodes=plan_episodes, steps=steps, seed=seed, cfg=cfg,
                    conditions=condition, progress=lambda text: err_console.print(f"  {text} ...", highlight=False))
    table = Table("condition", "level", "position probe R^2", "teleport AUROC", "planning success",
                  title=f"{world.name}: conditions at evaluation ({episodes} episodes, {report['plan_episodes']} planned)")
    for row in report["conditions"]:
        table.add_row(row["condition"], f"{row['level']:g}", _fmt(row["probe_r2"]), _fmt(row["surprise_auroc"]),
                      _fmt(row["plan_success"], pct=True))
    console.print(table)
    if plot is not None:
        plot_stress(report, str(plot))
        err_console.print(f"plot written to {plot}", highlight=False)
    _finish(report, json_file, started, used)

app.command("stress")(stress_cmd)
app.command("plan")(plan_cmd)
app.command("probe")(probe_cmd)
app.command("surprise")(surprise_cmd)
