"""`lejepa world list | simulate | plan | probe | surprise | stress`: thin commands over lejepa_cli.world."""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lejepa_cli.outputs import PLOT_SUFFIXES, STRIP_SUFFIXES
from lejepa_cli.terminal import make_console
from lejepa_cli.config import PlanConfig
from lejepa_cli.world.plan_settings import PROFILES, choose, horizon_blocks, search

app = typer.Typer(help="Built-in simulated worlds and trained world models: list and simulate worlds; plan, probe, surprise and stress with a world run.", no_args_is_help=True)
console = make_console()
err_console = make_console(stderr=True)


Run = Annotated[Path, typer.Argument(help="A world run folder, one of its checkpoints, or its export folder.")]
Episodes = Annotated[int, typer.Option("--episodes", "-n", min=1, max=500, help="Evaluation episodes.")]
JsonFile = Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")]
Seed = Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the evaluation episodes, goals and planner.")]
ProbeSeed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the simulated episodes, the random-init baseline encoder and the MLP probes.")]
SurpriseSeed = Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1, help="Seed of the simulated episodes and of where and when the events are injected.")]
# The planner's options default to the run's `plan:` section (its preset's; PlanConfig's defaults for a
# run without one): None here means "not given", and the help says what the library default is.
_DEFAULTS = PlanConfig()
Profile = Enum("Profile", {name: name for name in PROFILES}, type=str)


def _profile(name: str) -> str:
    p = PROFILES[name]
    return f"CEM {p.candidates} x {p.iterations}, top {p.elites}, horizon {p.horizon} steps, cost {p.cost}, noise beta {p.noise_beta:g}"


Planner = Annotated[Optional[Profile], typer.Option("--planner", help=f"Planner settings profile: 'default' (the best measured: {_profile('default')}) or 'lewm' (LeWM's: {_profile('lewm')}). Without it: the run's plan section (its preset's; 'default' for a run without one). The options below override either.")]
Candidates = Annotated[Optional[int], typer.Option(min=1, max=20000, show_default=False, help=f"CEM candidate sequences per iteration (default: the run's plan.candidates, else {_DEFAULTS.candidates}).")]
Iterations = Annotated[Optional[int], typer.Option(min=1, max=1000, show_default=False, help=f"CEM iterations per decision (default: the run's plan.iterations, else {_DEFAULTS.iterations}).")]
Elites = Annotated[Optional[int], typer.Option(min=1, max=20000, show_default=False, help=f"CEM elites kept per iteration, at most --candidates (default: the run's plan.elites, else {_DEFAULTS.elites}).")]
Horizon = Annotated[Optional[int], typer.Option(min=1, max=1000, show_default=False, help=f"Planning horizon in ENVIRONMENT steps, planned as ceil(horizon / frameskip) blocks (default: the run's plan.horizon, else {_DEFAULTS.horizon}).")]
Cost = Annotated[Optional[str], typer.Option("--cost", show_default=False, help=f"Planning cost: 'final' (latent distance to the goal after the last block, LeWM's) or 'min' (the nearest any block of the sequence gets) (default: the run's plan.cost, else {_DEFAULTS.cost}).")]
NoiseBeta = Annotated[Optional[float], typer.Option("--noise-beta", min=0.0, max=4.0, show_default=False, help=f"Temporal colour of CEM's sampling noise: 0 white (LeWM's), 2 about a random walk (iCEM): samples that keep a direction reach further (default: the run's plan.noise_beta, else {_DEFAULTS.noise_beta:g}).")]
Device = Annotated[str, typer.Option("--device", help="Where the model runs and plans: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps.")]
Steps = Annotated[Optional[int], typer.Option(min=2, max=2000, help="Steps per evaluation episode (default: 60 simulated; stored episodes: the shortest one's length, longer ones cut to it).")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a world option at evaluation, key=value (repeatable).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files (--json, --plot, --save-video) that are not this command's own earlier output.")]
WorldName = Annotated[Optional[str], typer.Option("--world", help="Evaluate in this built-in world (two-room, push, balls): for a run trained on a file recorded in it.")]
Data = Annotated[Optional[Path], typer.Option("--data", help="Evaluate on the episodes of this trajectory file or folder instead of a simulator (default for a run trained on a file: that file, its held-out episodes to test on).")]


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
    action_noise: Annotated[float, typer.Option("--action-noise", help="White noise on the exploration's actions, its std drawn per episode in [0, this], at most 4 (0: off). Shows the model the jittery actions a planner tries; the world the run is evaluated in stays smooth.")] = 0.0,
    wander: Annotated[float, typer.Option("--wander", help="Share of episodes driven by a smooth random walk instead of the exploration policy (0: off). Push's policy keeps the agent at the block; wandering episodes show the agent apart from it, which planning needs.")] = 0.0,
    overwrite: Annotated[bool, typer.Option(help="Replace a different dataset already in --out.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
) -> None:
    """Simulate a world with a smooth random exploration policy into a trajectory dataset."""
    from lejepa_cli.world.prepare import simulate_dataset

    s = simulate_dataset(name, out, episodes=episodes, steps=steps, val_episodes=val_episodes, size=size, seed=seed,
                         sets=sets, overwrite=overwrite, progress=not no_progress, env_kwargs=env_kwargs, policy=policy,
                         action_noise=action_noise, wander=wander)
    counts = ", ".join(f"{split} {e['episodes']} episodes x {e['steps'] // max(e['episodes'], 1)} steps" for split, e in s["splits"].items())
    state = "already up to date" if s["up_to_date"] else f"done in {s['seconds']:.1f} s"
    err_console.print(f"[green]{state}:[/] {counts} at {s['resolution']}px -> {s['out']}", highlight=False)


def _open(run: Path, json_file: Path | None, sets: list[str] | None, what: str, overwrite: bool, world: str | None = None,
          device: str = "cpu"):
    from lejepa_cli.world.runs import open_world_run

    _check_report(json_file, what, overwrite)
    used = open_world_run(run, world_sets=sets, world=world, device=device)
    return used, used.require_world(what)


def _episodes(run: Path, json_file: Path | None, sets: list[str] | None, world: str | None, data: Path | None, seed: int,
              what: str, overwrite: bool, device: str = "cpu"):
    """The run and where its evaluation episodes come from: its simulator, or stored trajectories."""
    from lejepa_cli.world.runs import open_world_run

    _check_report(json_file, what, overwrite)
    used = open_world_run(run, world_sets=sets, world=world, device=device)
    return used, used.episode_source(data, seed=seed)


def _settings(used, planner: Profile | None, **flags) -> PlanConfig:
    """The planner's settings: the run's plan section <- --planner's profile <- the options given, checked."""
    settings = choose(used.plan, planner.value if planner else None, **flags)
    search(settings, used.model.frameskip)  # a bad combination is one line now, not after minutes of work
    return settings


def _check_output(path: Path | None, option: str, overwrite: bool, suffixes, report: str | None = None) -> None:
    """An output file the command will write, checked before the work, not after it (see outputs.py)."""
    if path is not None:
        from lejepa_cli.outputs import check_output_file

        check_output_file(path, option, overwrite=overwrite, suffixes=suffixes, report=report)


def _check_report(json_file: Path | None, what: str, overwrite: bool) -> None:
    from lejepa_cli.outputs import REPORT_SUFFIXES

    _check_output(json_file, "--json", overwrite, REPORT_SUFFIXES, report=f"world {what}")


def _describe(used, source=None) -> None:
    """After the input checks (so a bad input stays one line): which world or data the figures come from."""
    where = f"world: {used.note}; frames {used.world.size}px" if source is None or source.kind == "simulator" else \
        f"data: {source.describe()}"
    err_console.print(f"{where}, frameskip {used.model.frameskip}, history {used.model.history}", highlight=False,
                      soft_wrap=True)


def _finish(report: dict, json_file: Path | None, started: float, used, what: str, source=None) -> None:
    from lejepa_cli.outputs import write_report

    # which simulator (or stored trajectories) the figures come from
    report["world_source"] = used.note if source is None or source.kind == "simulator" else source.describe()

    report["seconds"] = round(time.perf_counter() - started, 2)
    if json_file is not None:
        write_report({k: v for k, v in report.items() if k != "video"}, json_file, f"world {what}")
        err_console.print(f"report written to {json_file}", highlight=False, soft_wrap=True)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f} %" if pct else f"{x:.3f}"


def plan_cmd(
    run: Run,
    episodes: Episodes = 20,
    planner: Planner = None,
    budget: Annotated[Optional[int], typer.Option(min=1, max=1000, show_default=False, help=f"Environment steps per episode (default: the run's plan.budget, else {_DEFAULTS.budget}).")] = None,
    candidates: Candidates = None,
    iterations: Iterations = None,
    elites: Elites = None,
    horizon: Horizon = None,
    cost: Cost = None,
    noise_beta: NoiseBeta = None,
    goal_offset: Annotated[Optional[int], typer.Option("--goal-offset", min=0, max=1000, show_default=False, help=f"Goals: where the exploration policy is this many steps after the start (LeWM's protocol); 0: goals anywhere in the world (default: the run's plan.goal_offset, else {_DEFAULTS.goal_offset}).")] = None,
    goal: Annotated[Optional[Path], typer.Option("--goal", help="A goal image (PNG/JPEG at the world's frame size) instead of held-out goal states; success is then unknown, the final latent distance is reported.")] = None,
    save_video: Annotated[Optional[Path], typer.Option("--save-video", help="Write episode 0 of the world-model planner with its goal beside it: a PNG strip, or a GIF when the name ends in .gif.")] = None,
    no_baselines: Annotated[bool, typer.Option("--no-baselines", help="Skip the random policy and the true-dynamics planner.")] = False,
    device: Device = "auto",
    seed: Seed = 0,
    sets: Sets = None,
    world_name: WorldName = None,
    json_file: JsonFile = None,
    overwrite: Overwrite = False,
) -> None:
    """Plan towards goal images with CEM in the model's latent space; random policy and true dynamics beside it.

    Settings: the run's plan section (its preset's), or the --planner profile; each option given overrides them."""
    from lejepa_cli.world import plan as planning

    started = time.perf_counter()
    _check_output(save_video, "--save-video", overwrite, STRIP_SUFFIXES)
    used, world = _open(run, json_file, sets, "plan", overwrite, world_name, device)
    world.require_state_setting("world plan")
    settings = _settings(used, planner, candidates=candidates, iterations=iterations, elites=elites, horizon=horizon,
                         cost=cost, noise_beta=noise_beta, budget=budget, goal_offset=goal_offset)
    if goal is not None:
        report = _plan_to_image(used, goal, episodes, settings, seed, save_video)
        _finish(report, json_file, started, used, "plan")
        return
    _describe(used)
    planners = ("model",) if no_baselines else planning.PLANNERS
    report = planning.plan(used.model, world, episodes=episodes, seed=seed, settings=settings, planners=planners,
                           record=save_video is not None)
    s, fs = settings, used.model.frameskip
    goals = f"goals {s.goal_offset} exploration steps ahead" if s.goal_offset else "goals anywhere"
    extra = report.get("world_scores", [])  # the world's own scores of the final states (Push-T: coverage, errors)
    table = Table("planner", "success", "mean steps to success", "s / decision", *(["final state, mean"] if extra else []),
                  title=f"{world.name}: {episodes} episodes, {goals}, budget {s.budget} steps, CEM {s.candidates}x{s.iterations} "
                        f"(top {s.elites}), horizon {s.horizon} steps = {horizon_blocks(s.horizon, fs)} blocks of {fs}, "
                        f"cost {s.cost}, noise beta {s.noise_beta:g}")
    for kind, label in (("", "world model (CEM)"), ("random_", "random policy"), ("oracle_", "true dynamics (CEM)")):
        if f"{kind}success_rate" in report:
            final = [", ".join(f"{name} {report[kind + name]:.3g}" for name in extra)] if extra else []
            table.add_row(label, _fmt(report[f"{kind}success_rate"], pct=True), _fmt(report[f"{kind}mean_steps"]),
                          _fmt(report[f"{kind}seconds_per_decision"]), *final)
    console.print(table)
    if save_video is not None:
        video = report["video"]
        planning.save_strip(video["frames"], video["goal"], save_video, every=used.model.frameskip)
        err_console.print(f"episode 0 ({'reached' if video['success'] else 'not reached'}) written to {save_video}", highlight=False)
    _finish(report, json_file, started, used, "plan")


def _plan_to_image(used, goal: Path, episodes: int, settings: PlanConfig, seed: int, save_video: Path | None) -> dict:
    from lejepa_cli.data.inputs import load_image
    from lejepa_cli.world import plan as planning

    image = load_image(goal, "--goal image")
    model, world = used.model, used.world
    images = planning.check_goal_images(world, image, episodes)
    _describe(used)
    starts, _ = planning.draw_problems(world, episodes, seed)
    result = planning.run_episodes("model", world, starts, None, model=model, frameskip=model.frameskip,
                                   budget=settings.budget, cfg=search(settings, model.frameskip), seed=seed,
                                   goal_images=images, record=save_video is not None)
    report = {"episodes": episodes, "budget": settings.budget, "goal": str(goal), "success_rate": None,
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
    steps: Steps = None,
    history: Annotated[Optional[int], typer.Option(min=1, max=1000, help="Window frames in the history features (default: the predictor's history H).")] = None,
    seed: ProbeSeed = 0,
    sets: Sets = None,
    world_name: WorldName = None,
    data: Data = None,
    json_file: JsonFile = None,
    overwrite: Overwrite = False,
) -> None:
    """Linear and MLP probes from latents to every true state variable (held-out R^2), beside a random-init encoder; on stored trajectories, their stored state columns."""
    from lejepa_cli.world.probe import probe_world, require_full_history, require_state

    started = time.perf_counter()
    used, source = _episodes(run, json_file, sets, world_name, data, seed, "probe", overwrite)
    steps = source.resolve_steps(steps)
    require_full_history(used.model, steps, history)
    require_state(source)
    _describe(used, source)
    report = probe_world(used.model, source, episodes=episodes, steps=steps, seed=seed, history=history)
    hist = f"history of {report['history']}"
    table = Table("state variable", "linear", "MLP", f"linear ({hist})", f"MLP ({hist})", "linear, random init",
                  "MLP (history), random init",
                  title=f"{source.name}: held-out R^2 ({report['episodes']} episodes of {steps} steps; probes fitted on "
                        f"{report['train_episodes']})")
    for name in report["state_names"]:
        table.add_row(name, *(_fmt(report[k][name]) for k in ("r2", "r2_mlp", "r2_history", "r2_history_mlp",
                                                              "r2_random_init", "r2_history_mlp_random_init")))
    console.print(table)
    for name, h in report["hidden"].items():
        console.print(f"hidden {name}: R^2 {h['frame']:.2f} from one frame, {h['history']:.2f} from the history "
                      f"-> recoverable from: {h['recoverable_from']}", highlight=False)
    _finish(report, json_file, started, used, "probe", source)


def surprise_cmd(
    run: Run,
    episodes: Episodes = 20,
    steps: Steps = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of surprise along one episode, the event marked.")] = None,
    seed: SurpriseSeed = 0,
    sets: Sets = None,
    world_name: WorldName = None,
    data: Data = None,
    json_file: JsonFile = None,
    overwrite: Overwrite = False,
) -> None:
    """Inject impossible events (teleport, colour change, pass through a wall; on stored trajectories: another episode spliced in, a hue-rotated frame, a frozen frame) and report surprise AUROC per kind."""
    from lejepa_cli.world.surprise import require_event_frames, surprise

    started = time.perf_counter()
    _check_output(plot, "--plot", overwrite, PLOT_SUFFIXES)
    used, source = _episodes(run, json_file, sets, world_name, data, seed, "surprise", overwrite)
    steps = source.resolve_steps(steps)
    require_event_frames(used.model, steps)
    _describe(used, source)
    report = surprise(used.model, source, episodes=episodes, steps=steps, seed=seed, plot=str(plot) if plot else None)
    table = Table("event", "AUROC", "mean surprise at the event", "mean surprise, normal frames",
                  title=f"{source.name}: {report['episodes']} held-out episodes of {steps} steps")
    for kind, value in report["auroc"].items():
        table.add_row(kind, f"{value:.3f}", _fmt(report["mean_event_surprise"][kind]), _fmt(report["mean_normal_surprise"]))
    console.print(table)
    if plot is not None:
        err_console.print(f"plot written to {plot}", highlight=False)
    _finish(report, json_file, started, used, "surprise", source)


def stress_cmd(
    run: Run,
    episodes: Episodes = 20,
    plan_episodes: Annotated[int, typer.Option(min=0, max=500, help="Planning episodes per row (0: no planning); planning is what costs.")] = 4,
    planner: Planner = None,
    candidates: Candidates = None,
    iterations: Iterations = None,
    elites: Elites = None,
    horizon: Horizon = None,
    cost: Cost = None,
    noise_beta: NoiseBeta = None,
    condition: Annotated[Optional[list[str]], typer.Option("--condition", "-c", help="Only this condition (repeatable), e.g. 'pixel noise'.")] = None,
    steps: Steps = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG: the three figures against each condition's level.")] = None,
    device: Device = "auto",
    seed: Seed = 0,
    sets: Sets = None,
    world_name: WorldName = None,
    data: Data = None,
    json_file: JsonFile = None,
    overwrite: Overwrite = False,
    adapt: Annotated[int, typer.Option("--adapt", min=0, max=100_000, help="Also adapt the run to each changed world without labels, this many training steps on simulated target trajectories (0: off); needs a run folder or checkpoint.")] = 0,
    adapt_episodes: Annotated[int, typer.Option("--adapt-episodes", min=1, max=100_000, help="Unlabelled target episodes (60 steps each) simulated for each --adapt.")] = 160,
) -> None:
    """Each deployment condition (noise, dropped frames, colour/background shift, disturbances, stochastic dynamics, out-of-range hidden parameters) at graded levels: probe R^2, surprise AUROC, planning success beside the clean world (--adapt N: and after label-free adaptation)."""
    from lejepa_cli.world import probe, surprise
    from lejepa_cli.world.stress import check_conditions, plot_stress, stress

    started = time.perf_counter()
    _check_output(plot, "--plot", overwrite, PLOT_SUFFIXES)
    used, source = _episodes(run, json_file, sets, world_name, data, seed, "stress", overwrite, device)
    settings = _settings(used, planner, candidates=candidates, iterations=iterations, elites=elites, horizon=horizon,
                         cost=cost, noise_beta=noise_beta)
    check_conditions(condition)
    steps = source.resolve_steps(steps)
    probe.require_full_history(used.model, steps)
    surprise.require_event_frames(used.model, steps)
    adapter = _adapter(used.source, adapt, seed, adapt_episodes) if adapt else None
    _describe(used, source)
    report = stress(used.model, source, episodes=episodes, plan_episodes=plan_episodes, steps=steps, seed=seed, settings=settings,
                    conditions=condition, progress=lambda text: err_console.print(f"  {text} ...", highlight=False),
                    adapt=adapter)
    if report.get("needs_simulator"):
        err_console.print(f"not run on stored trajectories: {', '.join(report['needs_simulator'])}; these need a simulator: "
                          f"add --world NAME (two-room, push, balls) when the data was recorded in a built-in world",
                          highlight=False, soft_wrap=True)
    read = f"probe R^2 of {', '.join(report['probe_columns'])}" if report.get("probe_columns") else "position probe R^2"
    adapted = ("adapted R^2", "adapted AUROC", "adapted planning", "adapt s") if adapt else ()
    table = Table("condition", "level", read, "teleport AUROC", "planning success", *adapted,
                  title=f"{source.name}: conditions at evaluation ({report['episodes']} episodes, {report['plan_episodes']} planned)")
    for row in report["conditions"]:
        after = row.get("adapted")
        extra = [_fmt(after["probe_r2"]), _fmt(after["surprise_auroc"]), _fmt(after["plan_success"], pct=True),
                 f"{after['adapt_seconds']:.0f}"] if after else ["", "", "", ""]
        table.add_row(row["condition"], f"{row['level']:g}", _fmt(row["probe_r2"]), _fmt(row["surprise_auroc"]),
                      _fmt(row["plan_success"], pct=True), *(extra if adapt else []))
    console.print(table)
    if plot is not None:
        plot_stress(report, str(plot))
        err_console.print(f"plot written to {plot}", highlight=False)
    _finish(report, json_file, started, used, "stress", source)

def _adapter(source: Path, steps: int, seed: int, episodes: int):
    """stress()'s adapt hook: the run at `source` adapted to a changed world in `steps` steps on `episodes` episodes."""
    from lejepa_cli.world.adapt import adapted_in_world, check_adaptable

    check_adaptable(source)  # before the clean row's minutes, not after

    def adapt(world):
        return adapted_in_world(source, world, steps=steps, episodes=episodes, seed=seed)

    return adapt


app.command("plan")(plan_cmd)
app.command("probe")(probe_cmd)
app.command("surprise")(surprise_cmd)
app.command("stress")(stress_cmd)
