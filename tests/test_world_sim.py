"""The built-in worlds: determinism, shapes, hidden parameters, physics invariants, knobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lejepa_cli.errors import UserError
from lejepa_cli.world.catalog import make_world, world_names
from lejepa_cli.world.sim import simulate

SMALL = 16


def collect(world, episodes: int, steps: int, seed: int = 0, stream: int = 0, **collection):
    chunks = list(simulate(world, episodes, steps, seed, stream, **collection))
    return (np.concatenate([c.frames for c in chunks]), np.concatenate([c.actions for c in chunks]),
            np.concatenate([c.state for c in chunks]))


@pytest.mark.parametrize("name", ["two-room", "push", "balls"])
def test_shapes_and_determinism(name):
    world = make_world(name, size=SMALL)
    frames, actions, state = collect(world, 3, 10, seed=7)
    assert frames.shape == (30, SMALL, SMALL, 3) and frames.dtype == np.uint8
    assert actions.shape == (30, world.action_dim) and actions.dtype == np.float32
    assert state.shape == (30, len(world.state_names)) and np.isfinite(state).all()
    assert np.all(np.abs(actions) <= 1.0)
    again = collect(make_world(name, size=SMALL), 3, 10, seed=7)
    for a, b in zip((frames, actions, state), again):
        np.testing.assert_array_equal(a, b)
    other = collect(make_world(name, size=SMALL), 3, 10, seed=8)
    assert not np.array_equal(state, other[2])
    val = collect(make_world(name, size=SMALL), 3, 10, seed=7, stream=1)  # the val stream: other episodes
    assert not np.array_equal(state, val[2])
    assert frames.std() > 0  # something is drawn


def test_frames_show_the_state():
    """Moving the agent moves its pixels: the frame is a function of the state."""
    world = make_world("two-room", size=32)
    state = world.set_state(np.array([[0.2, 0.3, 0, 0], [0.8, 0.7, 0, 0]]))
    a, b = world.render(state)
    diff = np.abs(a.astype(int) - b.astype(int)).sum(-1)
    ys, xs = np.nonzero(diff)
    assert {int(x) * 3 // 32 for x in xs} == {0, 2}  # changes near x = 0.2 and x = 0.8 only
    np.testing.assert_array_equal(world.render(state), world.render(state.copy()))


@pytest.mark.parametrize("name,hidden", [("push", ["block_mass", "block_friction"]), ("balls", ["ball0_mass", "ball1_mass"])])
def test_hidden_parameters_vary_per_episode_and_stay_constant(name, hidden):
    world = make_world(name, size=SMALL)
    _, _, state = collect(world, 6, 15)
    per_episode = state.reshape(6, 15, -1)
    for key in hidden:
        col = per_episode[:, :, world.column(key)]
        assert np.all(col == col[:, :1])  # constant within an episode
        assert len(np.unique(col[:, 0])) == 6  # differs between episodes
    lo, hi = world.options["mass_min"], world.options["mass_max"]
    masses = per_episode[:, 0, world.column(hidden[0])]
    assert np.all((masses >= lo) & (masses <= hi))


def test_hidden_parameters_do_not_show_in_a_frame():
    world = make_world("push", size=SMALL)
    state = world.reset(np.random.default_rng(0), 2)
    state[1] = state[0]
    state[1, world.column("block_mass")] = 50.0
    state[1, world.column("block_friction")] = 0.0
    a, b = world.render(state)
    np.testing.assert_array_equal(a, b)


def test_push_heavier_block_moves_less():
    world = make_world("push", size=SMALL)
    state = world.set_state(np.array([[0.3, 0.5, 0, 0, 0.5, 0.5, 0, 0, m, 1.0] for m in (0.5, 5.0)]))
    for _ in range(20):
        state = world.step(state, np.array([[1.0, 0.0], [1.0, 0.0]]))
    moved = state[:, 4] - 0.5
    assert moved[0] > moved[1] > 0


def test_a_pushed_block_moves_at_the_drive_shared_by_its_mass_and_a_free_one_slows_by_its_friction():
    world = make_world("push", size=SMALL)
    speed, masses = world.options["speed"], (0.5, 1.0, 3.0)
    # The agent touches the block's left face: pushing right moves both at speed / (1 + mass).
    touching = 0.4 - world.options["block"] / 2 - world.options["radius"]
    state = world.set_state(np.array([[touching, 0.5, 0, 0, 0.4, 0.5, 0, 0, m, 2.0] for m in masses]))
    for _ in range(5):
        before = state
        state = world.step(state, np.ones((3, 2)) * [1.0, 0.3])
        np.testing.assert_allclose(state[:, 4:6] - before[:, 4:6], speed * np.array([[1.0, 0.3]]) / (1 + np.array(masses))[:, None], atol=1e-12)
        np.testing.assert_allclose(state[:, 0:2] - before[:, 0:2], state[:, 4:6] - before[:, 4:6], atol=1e-12)  # together
    # Left free, the block slides on and loses friction * FRICTION_SCALE of speed per step.
    from lejepa_cli.world.push import FRICTION_SCALE

    v0 = np.linalg.norm(state[:, 6:8], axis=1)
    state = world.step(state, np.zeros((3, 2)))
    np.testing.assert_allclose(np.linalg.norm(state[:, 6:8], axis=1), np.maximum(v0 - 2.0 * FRICTION_SCALE, 0), atol=1e-12)


def test_push_exploration_keeps_the_block_pushed_most_of_the_time():
    """A hidden mass shows only while the block is pushed: the exploration policy pushes on most steps."""
    world = make_world("push", size=SMALL)
    chunk = next(simulate(world, 32, 60, seed=0))
    s = chunk.state.reshape(32, 60, -1).astype(np.float64)
    moved = np.linalg.norm(np.diff(s[:, :, 4:6], axis=1), axis=2)
    push_speed = world.options["speed"] / (1 + s[:, 1:, world.column("block_mass")])
    pushed = np.abs(moved / push_speed - 1) < 0.2  # moving at the push speed (the policy's action noise is small)
    assert pushed.mean() > 0.7  # 0.74 here, 0.81 on another seed stream


def test_balls_conserve_kinetic_energy():
    world = make_world("balls", size=SMALL, balls=4, speed=0.05)
    state = world.reset(np.random.default_rng(3), 16)

    def energy(s):
        n = world.options["balls"]
        per = s[:, : 4 * n].reshape(len(s), n, 4)
        return 0.5 * (s[:, 4 * n :] * (per[..., 2:4] ** 2).sum(-1)).sum(1)

    def speeds(s):
        n = world.options["balls"]
        return np.linalg.norm(s[:, : 4 * n].reshape(len(s), n, 4)[..., 2:4], axis=-1)

    e0 = energy(state)
    collisions = 0
    for _ in range(300):
        before = state
        state = world.step(state, np.zeros((16, 0)))
        collisions += int((np.abs(speeds(state) - speeds(before)) > 1e-9).sum())  # walls keep speeds
    assert collisions > 10  # the test exercised ball-ball collisions, not only walls
    np.testing.assert_allclose(energy(state), e0, rtol=1e-9)
    n = world.options["balls"]
    pos = state[:, : 4 * n].reshape(16, n, 4)[..., 0:2]
    assert np.all((pos >= world.options["radius"] - 1e-9) & (pos <= 1 - world.options["radius"] + 1e-9))


def test_balls_collide():
    """Two balls on a head-on course exchange momentum (equal masses swap velocities)."""
    world = make_world("balls", size=SMALL, balls=2, mass_min=1.0, mass_max=1.0)
    state = world.set_state(np.array([[0.3, 0.5, 0.02, 0, 0.7, 0.5, -0.02, 0, 1.0, 1.0]]))
    for _ in range(10):
        state = world.step(state)
    assert state[0, 2] < 0 < state[0, 6]
    np.testing.assert_allclose(state[0, [2, 6]], [-0.02, 0.02], atol=1e-12)


def test_two_room_wall_blocks_except_at_the_door():
    world = make_world("two-room", size=SMALL, kick_prob=0.3, kick_strength=3.0)
    rng = np.random.default_rng(0)
    lo, hi = world._slab
    dlo, dhi = world._door
    state = world.reset(rng, 64)
    crossings = 0
    for _ in range(400):
        action = rng.uniform(-1, 1, (64, 2))
        action[:, 1] *= 0.3  # mostly sideways, so the agents hit the wall often
        new = world.step(state, action, rng)
        x, y = new[:, 0], new[:, 1]
        assert not np.any((x > lo) & (x < hi) & ((y < dlo - 1e-12) | (y > dhi + 1e-12)))  # never inside the wall
        crossed = (state[:, 0] < 0.5) != (x < 0.5)
        # a side change happens only through the opening: the step's vertical travel cannot
        # take an end point further from the opening than that travel
        travel = np.abs(y - state[:, 1])[crossed] + 1e-12
        assert np.all((y[crossed] >= dlo - travel) & (y[crossed] <= dhi + travel))
        crossings += int(crossed.sum())
        state = new
    assert crossings > 0  # the door is passable


def test_two_room_exploration_visits_both_rooms():
    world = make_world("two-room", size=SMALL)
    _, _, state = collect(world, 32, 100, seed=1)
    x = state[:, 0].reshape(32, 100)
    both = ((x < 0.5).any(1) & (x > 0.5).any(1)).mean()
    assert both >= 0.75
    a = collect(world, 4, 100)[1].reshape(4, 100, 2)
    assert np.abs(np.diff(a, axis=1)).mean() < np.abs(a).mean()  # smooth: steps change less than they are


def test_goals_and_success():
    for name in world_names():
        world = make_world(name, size=SMALL)
        rng = np.random.default_rng(0)
        goal = world.sample_goal(rng, 5)
        assert goal.shape == (5, world.state_dim)
        assert world.success(goal, goal).all()
        far = world.reset(rng, 5)
        assert world.goal_distance(far, goal).shape == (5,)
    world = make_world("two-room", size=SMALL)
    goal = world.set_state(np.array([[0.2, 0.2, 0, 0]]))
    near = world.set_state(np.array([[0.2 + 0.9 * world.success_radius, 0.2, 0, 0]]))
    far = world.set_state(np.array([[0.2 + 1.1 * world.success_radius, 0.2, 0, 0]]))
    assert world.success(near, goal)[0] and not world.success(far, goal)[0]


@pytest.mark.parametrize("knob", ["noise=0.1", "drop_prob=0.5", "hue_shift=120", "bg_shift=-0.4", "kick_prob=0.5"])
def test_knobs_change_frames(knob):
    clean = collect(make_world("push", size=SMALL), 2, 12)[0]
    shifted = collect(make_world("push", size=SMALL, sets=[knob]), 2, 12)[0]
    assert not np.array_equal(clean, shifted)


def test_dropped_frames_repeat_the_previous_one():
    frames, _, state = collect(make_world("two-room", size=SMALL, sets=["drop_prob=0.5"]), 1, 60)
    same = np.all(frames[1:] == frames[:-1], axis=(1, 2, 3))
    moved = np.abs(np.diff(state[:, :2], axis=0)).sum(1) > 0.02
    assert np.any(same & moved)  # the agent moved but the camera showed the old frame


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="unknown world 'nope'"):
        make_world("nope")
    with pytest.raises(UserError, match="has no option mas"):
        make_world("push", sets=["mas=3"])
    with pytest.raises(UserError, match=r"noise must be in \[0.0, 1.0\]"):
        make_world("balls", sets=["noise=2"])
    with pytest.raises(UserError, match="must be a number"):
        make_world("balls", sets=["noise=lots"])
    with pytest.raises(UserError, match="key=value"):
        make_world("balls", sets=["noise"])
    with pytest.raises(UserError, match="mass_min .* above mass_max"):
        make_world("push", sets=["mass_min=5", "mass_max=1"])
    with pytest.raises(UserError, match="balls must be an integer"):
        make_world("balls", sets=["balls=2.5"])


def collect_push(action_noise: float, wander: float = 0.0, episodes: int = 4, steps: int = 30):
    return collect(make_world("push", size=SMALL), episodes, steps, seed=3, action_noise=action_noise, wander=wander)


def test_action_noise_jitters_actions_per_episode_and_is_off_by_default():
    """simulate(action_noise=S): white noise on the exploration's actions, std drawn per episode; 0 = data bit for bit."""
    default = collect(make_world("push", size=SMALL), 4, 30, seed=3)
    off = collect_push(0.0, 0.0)
    for a, b in zip(default, off):
        np.testing.assert_array_equal(a, b)
    jittered = collect_push(1.0)[1]
    assert np.all(np.abs(jittered) <= 1.0)
    rough = lambda a: np.abs(np.diff(a.reshape(4, 30, 2), axis=1)).mean(axis=(1, 2))  # per episode
    assert rough(jittered).mean() > 1.5 * rough(default[1]).mean()  # steps no longer smooth
    assert rough(jittered).std() > 0.05  # each episode draws its own std
    np.testing.assert_array_equal(jittered, collect_push(1.0)[1])  # seeded
    with pytest.raises(UserError, match="action-noise"):
        collect_push(-0.5)


def test_wander_takes_the_agent_away_from_the_block():
    """simulate(wander=p): a share p of the episodes follow a smooth random walk, so the data show the
    agent apart from the block, which push's pushing exploration never does; seeded, in [-1, 1]."""
    gap = lambda state: np.linalg.norm(state[:, 0:2] - state[:, 4:6], axis=1)
    pushing = collect_push(0.0, 0.0, episodes=8, steps=60)
    wandering = collect_push(0.0, 1.0, episodes=8, steps=60)
    assert np.all(np.abs(wandering[1]) <= 1.0)
    assert (gap(pushing[2]) > 0.2).mean() < 0.02 < 0.2 < (gap(wandering[2]) > 0.2).mean()
    smooth = lambda a: np.abs(np.diff(a.reshape(8, 60, 2), axis=1)).mean()
    assert smooth(wandering[1]) < 0.5  # a walk, not white noise (uniform white noise: about 0.67)
    half = collect_push(0.0, 0.5, episodes=8, steps=60)[2].reshape(8, 60, -1)
    away = (gap(half.reshape(480, -1)) > 0.2).reshape(8, 60).mean(1)
    assert 0 < (away > 0.1).sum() < 8  # some episodes wander, some push
    np.testing.assert_array_equal(half.reshape(480, -1), collect_push(0.0, 0.5, episodes=8, steps=60)[2])
    with pytest.raises(UserError, match="wander"):
        collect_push(0.0, 1.5)


def test_collection_settings_are_recorded_with_the_data_not_in_the_world_a_run_rebuilds(tmp_path):
    """action_noise and wander belong to the data collection: index.json records it in the source's plan, while
    world_options (what probe / plan / stress rebuild the world from) do not carry it."""
    from lejepa_cli.world.prepare import simulate_dataset

    simulate_dataset("push", tmp_path / "w", episodes=2, steps=8, size=SMALL, action_noise=0.5, wander=0.25, progress=False)
    index = json.loads((tmp_path / "w" / "index.json").read_text())
    assert index["source"]["plan"]["action_noise"] == 0.5 and index["source"]["plan"]["wander"] == 0.25
    assert "action_noise" not in index["world_options"] and "wander" not in index["world_options"]
    simulate_dataset("push", tmp_path / "plain", episodes=2, steps=8, size=SMALL, progress=False)
    plain = json.loads((tmp_path / "plain" / "index.json").read_text())["source"]["plan"]
    assert "action_noise" not in plain and "wander" not in plain  # folders from before these settings stay up to date
    with pytest.raises(UserError, match="action_noise"):
        make_world("push", sets=["action_noise=1"])
