"""Gymnasium environments as worlds (`gym:ENV_ID`): fake environments registered here, Pendulum-v1, Push-T."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
from gymnasium import spaces  # noqa: E402

from cli_run import invoke  # noqa: E402
from lejepa_cli.errors import UserError  # noqa: E402
from lejepa_cli.train import train  # noqa: E402
from lejepa_cli.world.catalog import make_world  # noqa: E402
from lejepa_cli.world.gym_env import from_env, to_env  # noqa: E402
from test_world_train import world_config  # noqa: E402


class FakeNoState(gym.Env):
    """A dot on a 24 x 32 canvas moved by 2-D velocity actions in [-2, 2]; its observation is its position."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    state_names = ["dot_x", "dot_y"]

    def __init__(self, render_mode=None, speed: float = 0.05):
        self.render_mode, self.speed = render_mode, speed
        self.action_space = spaces.Box(-2.0, 2.0, (2,), np.float32)
        self.observation_space = spaces.Box(0.0, 1.0, (2,), np.float64)
        self._pos = np.full(2, 0.5)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self._pos = self.np_random.uniform(0.1, 0.9, 2)
        return self._pos.copy(), {}

    def step(self, action):
        self._pos = np.clip(self._pos + self.speed * np.asarray(action, np.float64) / 2.0, 0.0, 1.0)
        return self._pos.copy(), 0.0, False, False, {}

    def render(self):
        frame = np.full((24, 32, 3), 240, np.uint8)
        x, y = (4 + self._pos * [23, 15]).astype(int)  # inside the centre 24 x 24 square
        frame[y : y + 6, x : x + 6] = (200, 30, 30)
        return frame


class FakeDot(FakeNoState):
    """The same dot with a documented, settable `state` attribute (as classic control has)."""

    @property
    def state(self) -> np.ndarray:
        return self._pos

    @state.setter
    def state(self, value) -> None:
        self._pos = np.asarray(value, np.float64).copy()


class FakeNoRender(FakeNoState):
    metadata = {"render_modes": [], "render_fps": 10}


class FakeDiscrete(FakeNoState):
    def __init__(self, render_mode=None):
        super().__init__(render_mode)
        self.action_space = spaces.Discrete(4)


class FakeUnbounded(FakeNoState):
    def __init__(self, render_mode=None):
        super().__init__(render_mode)
        self.action_space = spaces.Box(-np.inf, np.inf, (2,), np.float32)


FAKES = {"LejepaFakeDot-v0": FakeDot, "LejepaFakeNoState-v0": FakeNoState, "LejepaFakeNoRender-v0": FakeNoRender,
         "LejepaFakeDiscrete-v0": FakeDiscrete, "LejepaFakeUnbounded-v0": FakeUnbounded}
for _id, _cls in FAKES.items():
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_cls)

SIM = ["--episodes", "6", "--steps", "16", "--val-episodes", "2", "--size", "16", "--no-progress"]


def one_line_refusal(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_simulate_rescales_actions_stores_the_bounds_and_reads_the_state(tmp_path, capsys):
    out = tmp_path / "dot"
    code, _, err = invoke(["world", "simulate", "gym:LejepaFakeDot-v0", "--out", out, *SIM, "--env-kwargs", "speed=0.08"], capsys)
    assert code == 0, err
    index = json.loads((out / "index.json").read_text())
    meta = index["source"]["world_metadata"]
    assert meta["action_low"] == [-2.0, -2.0] and meta["action_high"] == [2.0, 2.0] and meta["settable"]
    assert index["world"] == "gym:LejepaFakeDot-v0" and index["world_options"]["env_kwargs"] == {"speed": 0.08}
    assert index["state_names"] == ["dot_x", "dot_y"] and index["resolution"] == 16
    actions, state = np.load(out / "train" / "actions.npy"), np.load(out / "train" / "state.npy")
    assert np.abs(actions).max() <= 1.0 and actions.std() > 0.05
    # The stored state follows the env's dynamics from the stored [-1, 1] actions mapped back to [-2, 2].
    step = state[1:16] - state[:15]
    expected = np.clip(state[:15] + 0.08 * to_env(actions[:15].astype(np.float64), -2.0, 2.0) / 2.0, 0, 1) - state[:15]
    np.testing.assert_allclose(step, expected, atol=1e-5)
    np.testing.assert_allclose(from_env(to_env(actions, -2.0, 2.0), -2.0, 2.0), actions, atol=1e-6)


def test_a_settable_world_steps_and_renders_from_any_state():
    world = make_world("gym:LejepaFakeDot-v0", size=16)
    rng = np.random.default_rng(0)
    start = world.reset(rng, 3)
    other = np.array([[0.2, 0.3], [0.7, 0.6], [0.5, 0.5]])
    a = np.array([[1.0, 0.0], [0.0, -1.0], [0.5, 0.5]])
    after = world.step(other, a)  # rows written into the envs first
    np.testing.assert_allclose(after, other + 0.05 * a * 2.0 / 2.0)
    np.testing.assert_array_equal(world.render(start), world.render(start.copy()))
    assert not np.array_equal(world.render(start), world.render(other))
    assert world.surprise_object == ("dot_x", "dot_y")


def test_refusals_are_one_line(tmp_path, capsys):
    cases = {
        "gym:NoSuchEnv-v9": "unknown Gymnasium environment",
        "gym:LejepaFakeNoRender-v0": "no rgb_array rendering",
        "gym:LejepaFakeDiscrete-v0": "Discrete action space",
        "gym:LejepaFakeUnbounded-v0": "unbounded Box action space",
    }
    for name, words in cases.items():
        code, _, err = invoke(["world", "simulate", name, "--out", tmp_path / "x", *SIM], capsys)
        assert words in one_line_refusal(code, err)
    code, _, err = invoke(["world", "simulate", "two-room", "--out", tmp_path / "y", *SIM, "--policy", "m:f"], capsys)
    assert "applies to gym:ENV_ID worlds" in one_line_refusal(code, err)
    code, _, err = invoke(["world", "simulate", "gym:LejepaFakeDot-v0", "--out", tmp_path / "z", *SIM, "--env-kwargs", "{bad"], capsys)
    assert "not a JSON object" in one_line_refusal(code, err)


def test_missing_gymnasium_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium", None)  # import gymnasium -> ImportError
    code, _, err = invoke(["world", "simulate", "gym:Pendulum-v1", "--out", tmp_path / "p", *SIM], capsys)
    assert "lejepa-cli[gym]" in one_line_refusal(code, err)


def test_cli_start_up_does_not_import_gymnasium():
    code = "import sys, lejepa_cli.cli, lejepa_cli.world.catalog; print('gymnasium' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_user_policy_drives_the_data(tmp_path, capsys, monkeypatch):
    (tmp_path / "my_policy.py").write_text("def right(obs, env, rng):\n    return [2.0, -1.0]\n"
                                           "def wrong(obs, env, rng):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = invoke(["world", "simulate", "gym:LejepaFakeDot-v0", "--out", tmp_path / "d", *SIM, "--policy", "my_policy:right"], capsys)
    assert code == 0, err
    actions = np.load(tmp_path / "d" / "train" / "actions.npy")
    np.testing.assert_allclose(actions, np.tile([1.0, -0.5], (len(actions), 1)))
    code, _, err = invoke(["world", "simulate", "gym:LejepaFakeDot-v0", "--out", tmp_path / "e", *SIM, "--policy", "my_policy:wrong"], capsys)
    assert "returned an action of shape (1,)" in one_line_refusal(code, err)
    code, _, err = invoke(["world", "simulate", "gym:LejepaFakeDot-v0", "--out", tmp_path / "f", *SIM, "--policy", "no_such_mod:f"], capsys)
    assert "cannot import no_such_mod" in one_line_refusal(code, err)


def test_end_to_end_on_an_environment_that_cannot_be_set(tmp_path, capsys):
    """simulate -> train a few steps -> probe and (colour) surprise give figures; plan refuses in one line."""
    data = tmp_path / "data"
    code, _, err = invoke(["world", "simulate", "gym:LejepaFakeNoState-v0", "--out", data, *SIM], capsys)
    assert code == 0, err
    train(world_config(data), tmp_path / "run", progress=False)
    report = tmp_path / "probe.json"
    code, out, err = invoke(["world", "probe", tmp_path / "run", "-n", "3", "--steps", "16", "--json", report], capsys)
    assert code == 0, err
    r2 = json.loads(report.read_text())["r2"]
    assert set(r2) == {"dot_x", "dot_y"} and all(np.isfinite(v) for v in r2.values())
    report = tmp_path / "surprise.json"
    code, out, err = invoke(["world", "surprise", tmp_path / "run", "-n", "3", "--steps", "16", "--json", report], capsys)
    assert code == 0, err
    assert set(json.loads(report.read_text())["auroc"]) == {"colour"}  # no teleports without setting states
    code, _, err = invoke(["world", "plan", tmp_path / "run", "-n", "2"], capsys)
    assert "cannot" in one_line_refusal(code, err) and "state" in err


def test_pendulum_end_to_end_at_toy_size(tmp_path, capsys):
    pytest.importorskip("pygame")
    data = tmp_path / "pendulum"
    code, _, err = invoke(["world", "simulate", "gym:Pendulum-v1", "--out", data, *SIM], capsys)
    assert code == 0, err
    index = json.loads((data / "index.json").read_text())
    assert index["state_names"] == ["theta", "theta_dot"] and index["source"]["world_metadata"]["action_high"] == [2.0]
    train(world_config(data), tmp_path / "run", progress=False)
    for cmd in ("probe", "surprise"):
        report = tmp_path / f"{cmd}.json"
        code, out, err = invoke(["world", cmd, tmp_path / "run", "-n", "3", "--steps", "16", "--json", report], capsys)
        assert code == 0, err
        figures = json.loads(report.read_text())
        values = figures["r2"].values() if cmd == "probe" else figures["auroc"].values()
        assert all(np.isfinite(v) for v in values)
    assert set(figures["auroc"]) == {"teleport", "colour"}
    report = tmp_path / "stress.json"
    code, out, err = invoke(["world", "stress", tmp_path / "run", "-n", "2", "--steps", "16", "--plan-episodes", "0",
                             "--condition", "pixel noise", "--json", report], capsys)
    assert code == 0, err
    rows = json.loads(report.read_text())["conditions"]
    assert [r["condition"] for r in rows] == ["clean"] + ["pixel noise"] * 3
    assert all(np.isfinite(r["probe_r2"]) and np.isfinite(r["surprise_auroc"]) for r in rows)


# ---- Push-T ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pusht():
    pytest.importorskip("gym_pusht")
    return make_world("gym:gym_pusht/PushT-v0", size=32)


def test_pusht_states_are_written_exactly_and_stepping_is_pure(pusht):
    rng = np.random.default_rng(0)
    start = pusht.reset(rng, 2)
    actions = rng.uniform(-1, 1, (5, 2, 2))
    state, path = start, []
    for a in actions:  # along the environments' own trajectory
        state = pusht.step(state, a)
        path.append(state)
    pusht.reset(rng, 2)  # the environments are elsewhere now
    state = start.copy()
    for a, expected in zip(actions, path):  # the same steps from written states
        state = pusht.step(state, a)
        np.testing.assert_allclose(state[:, :5], expected[:, :5], atol=1e-6)
    goal = start.copy()
    near, far = start.copy(), start.copy()
    near[:, 2] += 19.0
    far[:, 2] += 21.0
    assert pusht.success(near, goal).all() and not pusht.success(far, goal).any()
    turned = start.copy()
    turned[:, 4] += np.pi / 9 + 0.01
    assert not pusht.success(turned, goal).any()
    np.testing.assert_allclose(pusht.scores(start, goal)["coverage"], 1.0)
    assert (pusht.scores(far, goal)["coverage"] < 1.0).all()
    # which part of the goal a planner misses: the block's position and angle, and the agent, apart
    far[:, 0] += 30.0
    scores = pusht.scores(far, goal)
    np.testing.assert_allclose(scores["block_error_px"], 21.0, atol=1e-9)
    np.testing.assert_allclose(scores["agent_error_px"], 30.0, atol=1e-9)
    np.testing.assert_allclose(scores["angle_error_deg"], 0.0, atol=1e-9)
    np.testing.assert_allclose(pusht.scores(turned, goal)["angle_error_deg"], 20.0 + np.degrees(0.01), atol=1e-6)


def test_pusht_exploration_pushes_the_block_far_more_than_random_actions(pusht):
    from lejepa_cli.world.pusht import contact_stats
    from lejepa_cli.world.sim import World, simulate

    pushed = np.concatenate([c.state.reshape(c.episodes, 40, -1) for c in simulate(pusht, 6, 40, 0)])
    random_world = pusht.with_options()
    random_world.explore_init = lambda rng, s: World.explore_init(random_world, rng, s)
    random_world.explore = lambda s, m, rng: World.explore(random_world, s, m, rng)
    rand = np.concatenate([c.state.reshape(c.episodes, 40, -1) for c in simulate(random_world, 6, 40, 0)])
    ours, theirs = contact_stats(pushed), contact_stats(rand)
    assert ours["contact_share"] > 2 * theirs["contact_share"] and ours["moved_share"] > 0.15


def test_the_pusht_recipe_runs_end_to_end_at_toy_size(tmp_path, monkeypatch):
    """`lejepa reproduce world-pusht` shrunk: data, training, probe, surprise, the three planners and coverage."""
    pytest.importorskip("gym_pusht")
    import dataclasses

    from typer.testing import CliRunner

    from lejepa_cli.cli import app
    from lejepa_cli.reproduce import RECIPES
    from test_world_train import TINY_WORLD

    recipe = RECIPES["world-pusht"]
    tiny_search = (("candidates", 8), ("iterations", 2), ("elites", 2), ("horizon", 10))  # the planner: --set plan.*
    small = dataclasses.replace(recipe.world, episodes=4, val_episodes=2, steps=30, size=16, probe_episodes=2,
                                probe_steps=25, surprise_episodes=2, plan_episodes=1, oracle_episodes=1,
                                oracle_search=tiny_search)
    monkeypatch.setitem(RECIPES, "world-pusht", dataclasses.replace(recipe, world=small))
    result = CliRunner().invoke(app, ["reproduce", "world-pusht", "--out", str(tmp_path), "--no-progress",
                                      *[a for o in TINY_WORLD for a in ("--set", o)], "--set", "world.frameskip=5",
                                      *[a for k, v in tiny_search for a in ("--set", f"plan.{k}={v}")]])
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert result.exit_code == (1 if report["verdict"] == "FAIL" else 0), result.output
    measured = report["measured"]
    assert set(recipe.expected) <= set(measured)
    for key in ("success_rate", "random_success_rate", "oracle_success_rate", "coverage", "random_coverage",
                "oracle_coverage", "block_error_px", "random_angle_error_deg", "oracle_agent_error_px", "position_r2",
                "teleport_auroc"):
        assert np.isfinite(measured[key]), key
    assert report["probe"]["plan"]["oracle_episodes"] == 1 and report["probe"]["plan"]["episodes"] == 1
    # `world plan` shows the world's own scores of the final states beside success
    result = CliRunner().invoke(app, ["world", "plan", str(tmp_path / "run"), "-n", "1", "--budget", "5",
                                      "--no-baselines", *[a for k, v in tiny_search for a in (f"--{k}", str(v))]])
    assert result.exit_code == 0, result.output
    assert "final state, mean" in result.output and "block_error_px" in result.output, result.output
