"""Using a world model: CEM planning, physical probes, surprise at injected events, their CLI and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from lejepa_cli.cli import main
from lejepa_cli.config import load_config
from lejepa_cli.errors import UserError
from lejepa_cli.train import train
from lejepa_cli.world.plan import CEMConfig, cem, draw_problems, run_episodes, MIN_GOAL_DISTANCE
from lejepa_cli.probes import r2_score, ridge_probe
from lejepa_cli.world.catalog import make_world
from lejepa_cli.world.surprise import auroc, replay
from test_world_train import simulate, world_config

SMALL_CEM = ["--candidates", "20", "--iterations", "2", "--elites", "4"]


@pytest.fixture(scope="module")
def world_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world-use")
    data = simulate(root / "two-room")
    train(world_config(data), root / "run", progress=False)
    return root / "run"


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    out = capsys.readouterr()
    return info.value.code or 0, out.out, out.err


# ---- the planner ----------------------------------------------------------------------------------


def test_cem_finds_the_optimum_of_a_quadratic():
    target = torch.tensor(np.random.default_rng(0).uniform(-0.8, 0.8, (3, 5, 4)), dtype=torch.float32)  # (B, K, A)
    calls = []

    def cost(samples):  # (B, C, K, A) -> (B, C)
        calls.append(samples.shape)
        return ((samples - target[:, None]) ** 2).sum((2, 3))

    best = cem(cost, 3, 4, CEMConfig(candidates=200, iterations=25, elites=20), torch.Generator().manual_seed(0))
    assert best.shape == (3, 5, 4) and len(calls) == 25 and calls[0] == (3, 200, 5, 4)
    assert float((best - target).abs().max()) < 0.05


def test_true_dynamics_planner_reaches_near_goals_on_two_room_and_random_mostly_does_not():
    world = make_world("two-room", size=16)
    starts = np.array([[0.2, 0.3, 0, 0], [0.8, 0.7, 0, 0], [0.3, 0.8, 0, 0], [0.75, 0.2, 0, 0]], float)
    goals = starts + np.array([[0.2, 0.1, 0, 0], [-0.15, -0.2, 0, 0], [0.05, -0.25, 0, 0], [0.1, 0.2, 0, 0]])
    cfg = CEMConfig(candidates=100, iterations=8, elites=10)
    oracle = run_episodes("oracle", world, starts, goals, model=None, frameskip=2, budget=50, cfg=cfg, seed=0)
    assert oracle["success"].all() and (oracle["steps"] > 0).all() and (oracle["steps"] <= 50).all()
    # Straight-line reach needs >= distance / speed steps.
    assert (oracle["steps"] >= np.linalg.norm((goals - starts)[:, :2], axis=1) / 0.04 - 1e-9).all()
    rand = run_episodes("random", world, starts, goals, model=None, frameskip=2, budget=50, cfg=cfg, seed=0)
    assert rand["success"].sum() < 4


class CentroidModel:
    """A stand-in world model with exact latents: z = the agent's pixel centroid (arena units), and a
    rollout that moves it by speed x the block's actions (no walls). Checks the planner's plumbing."""

    history, frameskip, speed = 3, 2, 0.04

    def encode(self, frames):
        f = np.asarray(frames, np.float64)  # (B, R, R, 3)
        red = (f[..., 0] > 150) & (f[..., 1] < 120)  # the agent's colour
        rows, cols = np.mgrid[: f.shape[1], : f.shape[2]]
        n = red.sum((1, 2))
        z = np.stack([(red * (cols + 0.5)).sum((1, 2)) / n, (red * (rows + 0.5)).sum((1, 2)) / n], 1) / f.shape[1]
        return torch.tensor(z, dtype=torch.float32)

    def rollout(self, latents, actions, future):
        blocks = torch.cat([torch.as_tensor(actions)[:, -1:], torch.as_tensor(future)], 1)  # (B, K, fs * 2)
        moves = self.speed * blocks.view(*blocks.shape[:2], self.frameskip, 2).sum(2)  # (B, K, 2)
        return latents[:, -1:] + moves.cumsum(1)

    def rollout_candidates(self, latents, past, candidates):  # (B, H, 2), (B, H - 1, A'), (B, C, K, A')
        b, c, k, _ = candidates.shape
        moves = self.speed * candidates.view(b, c, k, self.frameskip, 2).sum(3)  # (B, C, K, 2)
        return latents[:, None, -1:] + moves.cumsum(2)


def test_latent_planner_with_exact_latents_reaches_near_goals():
    world = make_world("two-room", size=32)
    starts = np.array([[0.2, 0.3, 0, 0], [0.8, 0.7, 0, 0], [0.3, 0.8, 0, 0]], float)
    goals = starts + np.array([[0.2, 0.1, 0, 0], [-0.15, -0.2, 0, 0], [0.05, -0.25, 0, 0]])
    result = run_episodes("model", world, starts, goals, model=CentroidModel(), frameskip=2, budget=50,
                          cfg=CEMConfig(candidates=100, iterations=8, elites=10), seed=0, record=True)
    assert result["success"].all() and result["frames"].shape[1:] == (32, 32, 3)
    assert result["final_cost"].max() < 0.01


def test_problems_have_goals_away_from_the_start():
    world = make_world("two-room", size=16)
    starts, goals = draw_problems(world, 64, 0)
    assert (world.goal_distance(starts, goals) >= MIN_GOAL_DISTANCE).all()
    again = draw_problems(world, 64, 0)
    assert np.array_equal(again[0], starts) and np.array_equal(again[1], goals)


@pytest.mark.parametrize("name", ["two-room", "push"])
def test_offset_goals_are_where_exploration_leads_and_reachable_in_that_many_steps(name):
    world = make_world(name, size=16)
    starts, goals = draw_problems(world, 32, 0, goal_offset=25)
    assert (world.goal_distance(starts, goals) >= MIN_GOAL_DISTANCE).all()
    anywhere = draw_problems(world, 32, 0, goal_offset=0)[1]
    assert not np.array_equal(goals, anywhere)
    # An explorer moves at most `speed` per step (plus nothing: no kicks by default), so 25 steps bound the distance.
    assert (world.goal_distance(starts, goals) <= 25 * world.options["speed"] * np.sqrt(2) + 1e-9).all()
    again = draw_problems(world, 32, 0, goal_offset=25)
    assert np.array_equal(again[0], starts) and np.array_equal(again[1], goals)


def test_offset_goals_on_two_room_the_true_dynamics_planner_reaches_them_and_random_rarely():
    world = make_world("two-room", size=16)
    starts, goals = draw_problems(world, 12, 1, goal_offset=25)
    cfg = CEMConfig(candidates=100, iterations=10, elites=10)
    oracle = run_episodes("oracle", world, starts, goals, model=None, frameskip=2, budget=50, cfg=cfg, seed=0)
    rand = run_episodes("random", world, starts, goals, model=None, frameskip=2, budget=50, cfg=cfg, seed=0)
    assert oracle["success"].mean() >= 0.75 and rand["success"].mean() <= 0.25


def test_coloured_noise_is_white_at_beta_0_and_keeps_a_direction_at_beta_2():
    from lejepa_cli.world.plan import coloured_noise

    def lag1(x):
        return float(torch.corrcoef(torch.stack([x[:, :-1].flatten(), x[:, 1:].flatten()]))[0, 1])

    white = coloured_noise((4000, 15, 2), 0.0, torch.Generator().manual_seed(0))
    red = coloured_noise((4000, 15, 2), 2.0, torch.Generator().manual_seed(0))
    assert abs(lag1(white)) < 0.03 and lag1(red) > 0.5
    assert abs(float(white.std()) - 1) < 0.03 and torch.allclose(red.std(dim=1), torch.ones(4000, 2), atol=1e-4)
    with pytest.raises(UserError, match="noise colour"):
        CEMConfig(noise_beta=5.0).check()


def test_min_cost_scores_the_nearest_block_and_plans_as_well():
    from lejepa_cli.world.plan import reduce_cost

    d = torch.tensor([[4.0, 1.0, 3.0], [2.0, 5.0, 0.5]])
    assert reduce_cost(d, "final").tolist() == [3.0, 0.5] and reduce_cost(d, "min").tolist() == [1.0, 0.5]
    with pytest.raises(UserError, match="unknown planning cost"):
        CEMConfig(cost="max").check()
    world = make_world("two-room", size=16)
    starts, goals = draw_problems(world, 12, 1, goal_offset=25)
    cfg = CEMConfig(candidates=100, iterations=10, elites=10, horizon=10, cost="min")
    oracle = run_episodes("oracle", world, starts, goals, model=None, frameskip=2, budget=50, cfg=cfg, seed=0)
    assert oracle["success"].mean() >= 0.75


# ---- probes and AUROC -----------------------------------------------------------------------------


def test_linear_probe_on_a_linear_image_of_the_state_has_r2_one():
    rng = np.random.default_rng(0)
    state = rng.normal(size=(600, 4))
    latents = state @ rng.normal(size=(4, 16)) + 1e-4 * rng.normal(size=(600, 16))  # z = state matrix, mixed
    r2 = r2_score(state[400:], ridge_probe(latents[:400], state[:400], latents[400:], lam=1e-8))
    assert r2.min() > 0.999
    noise = rng.normal(size=(600, 16))  # latents that know nothing
    assert r2_score(state[400:], ridge_probe(noise[:400], state[:400], noise[400:])).max() < 0.1


def test_an_angle_is_also_probed_as_its_cosine_and_sine_which_a_line_reads_across_the_wrap():
    """A latent holding an orientation as a point on the circle: no line reads the wrapped angle
    (it jumps by 2 pi at +-pi), a line reads its cosine and sine exactly."""
    from lejepa_cli.world.probe import with_angle_components

    names = ["agent_x", "block_angle", "block_angular_velocity", "theta", "theta_dot"]
    rng = np.random.default_rng(0)
    states = rng.uniform(-np.pi, np.pi, (600, 5))
    extended, new_names = with_angle_components(states, names)
    assert new_names == [*names, "block_angle_cos", "theta_cos", "block_angle_sin", "theta_sin"]
    np.testing.assert_allclose(extended[:, 5:], np.concatenate([np.cos(states[:, [1, 3]]), np.sin(states[:, [1, 3]])], 1))
    latents = np.stack([np.cos(states[:, 1]), np.sin(states[:, 1])], 1) @ rng.normal(size=(2, 8))
    r2 = r2_score(extended[400:], ridge_probe(latents[:400], extended[:400], latents[400:], lam=1e-8))
    assert r2[1] < 0.8 and r2[5] > 0.999 and r2[7] > 0.999  # the angle itself vs its cosine and sine
    assert with_angle_components(states[:, :1], names[:1])[1] == names[:1]  # no angle: nothing added


def brute_force_auroc(pos, neg) -> float:
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_the_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 6, rng.integers(1, 30)).astype(float)  # small integers: many ties
    neg = rng.integers(0, 5, rng.integers(1, 30)).astype(float)
    assert auroc(pos, neg) == pytest.approx(brute_force_auroc(pos, neg), abs=1e-12)
    assert auroc([2.0], [1.0]) == 1.0 and auroc([1.0], [2.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5


# ---- surprise events ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["two-room", "push", "balls"])
def test_event_injection_changes_exactly_the_intended_frames(name):
    world = make_world(name, size=16, sets=["noise=0.02"])  # random draws must stay in step too
    rng = np.random.default_rng(0)
    n, steps = 4, 12
    starts = world.reset(rng, n)
    actions = rng.uniform(-1, 1, (n, steps, world.action_dim))
    event = np.array([3, 5, 6, 9])
    clean, clean_state = replay(world, starts, actions, seed=1)
    again, _ = replay(world, starts, actions, seed=1)
    assert np.array_equal(clean, again)
    differs = lambda frames: (frames != clean).any(axis=(2, 3, 4))  # (N, T)
    t = np.arange(steps)[None]
    colour, colour_state = replay(world, starts, actions, seed=1, kind="colour", event_step=event)
    assert np.array_equal(differs(colour), t == event[:, None]) and np.array_equal(colour_state, clean_state)
    moved, moved_state = replay(world, starts, actions, seed=1, kind="teleport", event_step=event)
    assert not differs(moved)[t < event[:, None]].any() and differs(moved)[t == event[:, None]].all()
    assert np.array_equal(moved_state[t < event[:, None]], clean_state[t < event[:, None]])
    obj = {"two-room": "agent", "push": "block", "balls": "ball0"}[name]
    cols = [world.column(f"{obj}_x"), world.column(f"{obj}_y")]
    rows = np.arange(n)
    jump = np.linalg.norm(moved_state[rows, event][:, cols] - clean_state[rows, event][:, cols], axis=1)
    assert (jump >= 0.3).all()
    if name == "two-room":
        crossed, crossed_state = replay(world, starts, actions, seed=1, kind="pass_through", event_step=event)
        before, after = clean_state[rows, event, 0], crossed_state[rows, event, 0]
        assert not differs(crossed)[t < event[:, None]].any()
        assert np.allclose(after, 1 - before) and ((before < 0.5) != (after < 0.5)).all()


# ---- the commands -----------------------------------------------------------------------------


def test_plan_probe_surprise_write_their_json_keys(world_run, tmp_path, capsys):
    code, out, err = cli(["world", "plan", str(world_run), "-n", "2", "--budget", "6", *SMALL_CEM, "--json",
                          str(tmp_path / "plan.json"), "--save-video", str(tmp_path / "ep.png")], capsys)
    assert code == 0, err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {"success_rate", "random_success_rate", "oracle_success_rate", "seconds_per_decision"} <= plan.keys()
    assert "world model (CEM)" in out and "true dynamics" in out
    strip = np.asarray(Image.open(tmp_path / "ep.png"))
    assert strip.shape[0] == 16 and strip.shape[1] > 2 * 16  # frames, a gap, the goal
    code, out, err = cli(["world", "probe", str(world_run), "-n", "2", "--steps", "16", "--history", "4", "--json",
                          str(tmp_path / "probe.json")], capsys)
    assert code == 0, err
    probe = json.loads((tmp_path / "probe.json").read_text())
    names = ["agent_x", "agent_y", "agent_vx", "agent_vy"]
    assert list(probe["r2"]) == names and list(probe["r2_random_init"]) == names
    assert all(isinstance(v, float) for v in probe["r2"].values()) and probe["history"] == 4 and "history of 4" in out
    code, out, err = cli(["world", "surprise", str(world_run), "-n", "3", "--steps", "16", "--json", str(tmp_path / "s.json"),
                          "--plot", str(tmp_path / "s.png")], capsys)
    assert code == 0, err
    surprise = json.loads((tmp_path / "s.json").read_text())
    assert set(surprise["auroc"]) == {"teleport", "colour", "pass_through"}
    assert all(0.0 <= v <= 1.0 for v in surprise["auroc"].values()) and (tmp_path / "s.png").stat().st_size > 1000


def _export(world_run: Path, out: Path, capsys) -> Path:
    code, _, err = cli(["export", str(world_run), "--out", str(out)], capsys)
    assert code == 0, err
    return out


def _edit_world(export: Path, name) -> None:
    cfg = json.loads((export / "config.json").read_text())
    cfg["lejepa"]["world"]["world"] = name
    (export / "config.json").write_text(json.dumps(cfg))


def test_bad_inputs_are_one_line_with_exit_code_2(world_run, tmp_path, tiny_overrides, capsys):
    image_run = tmp_path / "image-run"
    train(load_config("demo", tiny_overrides), image_run, progress=False)
    export = _export(world_run, tmp_path / "exp", capsys)
    unknown, no_sim = tmp_path / "unknown", tmp_path / "nosim"
    shutil.copytree(export, unknown)
    shutil.copytree(export, no_sim)
    _edit_world(unknown, "atlantis")
    _edit_world(no_sim, None)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    cases = [
        (["world", "plan", str(image_run)], "not a world model"),
        (["world", "probe", str(image_run)], "not a world model"),
        (["world", "plan", str(export), "--goal", str(tmp_path / "small.png")], "goal images must be"),
        (["world", "surprise", str(unknown)], "unknown world"),
        (["world", "plan", str(no_sim)], "without a simulator"),
        (["world", "surprise", str(no_sim), "--set", "noise=0.1"], "name the world with --world NAME"),
        (["world", "plan", str(tmp_path / "missing")], "does not exist"),
        (["world", "plan", str(export), "--set", "bogus=1"], "has no option bogus"),
        (["world", "surprise", str(export), "--steps", "3"], "surprise needs at least"),  # no "world: ..." line first
        (["world", "probe", str(export), "--steps", "8", "--history", "9"], "fewer than the history"),
        (["world", "stress", str(export), "--steps", "4"], "fewer than the history"),
    ]
    for args, message in cases:
        code, _, err = cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (args, err)


def test_plan_to_a_goal_image_reports_the_latent_distance(world_run, tmp_path, capsys):
    world = make_world("two-room", size=16)
    Image.fromarray(world.render(world.sample_goal(np.random.default_rng(0), 1))[0]).save(tmp_path / "goal.png")
    code, out, err = cli(["world", "plan", str(world_run), "-n", "2", "--budget", "4", *SMALL_CEM, "--goal",
                          str(tmp_path / "goal.png"), "--json", str(tmp_path / "g.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["success_rate"] is None and report["final_latent_distance"] >= 0


def test_stress_table_has_the_clean_row_then_every_condition_level(world_run, tmp_path, capsys):
    from lejepa_cli.world.stress import CONDITIONS

    code, out, err = cli(["world", "stress", str(world_run), "-n", "2", "--steps", "16", "--plan-episodes", "1",
                          "--candidates", "8", "--iterations", "1", "--elites", "2", "--json", str(tmp_path / "st.json"),
                          "--plot", str(tmp_path / "st.png")], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "st.json").read_text())["conditions"]
    expected = [("clean", 0.0)] + [(c.name, lv) for c in CONDITIONS if c.name != "hidden parameters out of range" for lv in c.levels]
    assert [(r["condition"], r["level"]) for r in rows] == expected  # two-room has no masses
    for r in rows:
        assert np.isfinite(r["probe_r2"]) and 0 <= r["surprise_auroc"] <= 1 and 0 <= r["plan_success"] <= 1
    assert rows[1]["options"] == {"noise": 0.05} and (tmp_path / "st.png").stat().st_size > 1000
    code, _, err = cli(["world", "stress", str(world_run), "--condition", "gravity"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown stress condition" in err


def test_out_of_range_masses_leave_the_training_range_and_background_shifts_away_from_the_clip():
    from lejepa_cli.world.stress import CONDITIONS

    cond = next(c for c in CONDITIONS if c.name == "hidden parameters out of range")
    push = make_world("push", size=16)
    assert cond.applies(push) and not cond.applies(make_world("two-room", size=16))
    for level in cond.levels:
        stressed = make_world("push", size=16, **{**push.options, **cond.options(push, level)})
        masses = stressed.reset(np.random.default_rng(0), 256)[:, stressed.column("block_mass")]
        assert masses.min() < push.options["mass_min"] and masses.max() > push.options["mass_max"]
    shift = next(c for c in CONDITIONS if c.name == "background shift")
    assert shift.options(push, 0.2) == {"bg_shift": -0.2}  # light background: darker
    assert shift.options(make_world("balls", size=16), 0.2) == {"bg_shift": 0.2}  # dark background: lighter


def use_command_lines(run: Path) -> dict[tuple[str, ...], list[str]]:
    """Base command lines that run in about a second on the tiny world run (the fuzzed option comes last and wins)."""
    cem = ["--candidates", "2", "--iterations", "1", "--elites", "1"]
    return {
        ("world", "plan"): [str(run), "-n", "1", "--budget", "2", "--horizon", "2", *cem, "--no-baselines"],
        ("world", "probe"): [str(run), "-n", "1", "--steps", "8"],
        ("world", "surprise"): [str(run), "-n", "1", "--steps", "12"],
        ("world", "stress"): [str(run), "-n", "1", "--steps", "12", "--plan-episodes", "0", "--condition", "pixel noise", *cem],
    }


def test_numeric_options_of_the_use_commands_run_or_refuse_in_one_line(world_run, tmp_path, capsys, monkeypatch):
    """Both sides of each declared bound, huge and nan: exit 0, or one line with exit 2 (never a
    traceback, never a run that would not fit in memory); each option accepts one value and refuses another."""
    from test_fuzz_cli import numeric_options

    monkeypatch.chdir(tmp_path)
    bases = use_command_lines(world_run)
    options = [o for o in numeric_options() if o[0] in bases]
    assert {p for p, _, _, _ in options} == set(bases)
    for path, option, kind, bounds in options:
        codes = set()
        values = dict.fromkeys(["16", str(10**12), "nan", *(str(b + d) for b in bounds for d in (-1, 0, 1))])
        for value in values:
            if len(bounds) == 2 and value in (str(bounds[1] - 1), str(bounds[1])) and option != "--seed":
                continue  # at the upper bound a command runs for real, for minutes: max + 1 checks the bound
            code, out, err = cli([*path, *bases[path], option, value], capsys)
            assert "Traceback" not in out + err and code in (0, 2), (path, option, value, err)
            assert code == 0 or err.strip().count("\n") == 0 or err.splitlines()[-1].startswith("error:"), err
            codes.add(code)
        assert codes == {0, 2}, (path, option)


def test_the_world_comes_from_the_training_data_and_set_overrides_it(world_run):
    from lejepa_cli.world.runs import open_world_run

    used = open_world_run(world_run)
    assert used.world.name == "two-room" and used.world.size == 16 and "training data's options" in used.note
    changed = open_world_run(world_run, world_sets=["noise=0.1", "speed=0.05"])
    assert changed.world.options["noise"] == 0.1 and changed.world.options["speed"] == 0.05
    assert changed.world.size == 16 and "noise=0.1" in changed.note
