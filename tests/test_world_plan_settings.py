"""The planner's settings (a run's `plan:` section, profiles, flags) and planning on the model's device."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from lejepa_cli.config import PlanConfig, load_config
from lejepa_cli.errors import UserError
from lejepa_cli.train import train
from lejepa_cli.world.catalog import make_world
from lejepa_cli.world.plan import draw_problems, plan, run_episodes
from lejepa_cli.world.plan_settings import PROFILES, CEMConfig, choose, describe, horizon_blocks, search
from lejepa_cli.world.runs import open_world_run
from test_world_train import simulate, world_config
from test_world_use import CentroidModel, cli

# A run whose plan section differs from every default, so a value that comes back came from the run.
RUN_PLAN = {"candidates": 12, "iterations": 2, "elites": 3, "horizon": 5, "cost": "final", "noise_beta": 1.0,
            "budget": 6, "goal_offset": 10}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny two-room run with RUN_PLAN, its export, and copies of both from before the plan section existed."""
    root = tmp_path_factory.mktemp("plan-settings")
    data = simulate(root / "two-room")
    run = root / "run"
    train(world_config(data, extra=tuple(f"plan.{k}={v}" for k, v in RUN_PLAN.items())), run, progress=False)
    with pytest.raises(SystemExit) as done:
        from lejepa_cli.cli import main

        main(["export", str(run), "--out", str(root / "export")])
    assert not done.value.code
    old_run, old_export = root / "old-run", root / "old-export"
    shutil.copytree(run, old_run)
    shutil.copytree(root / "export", old_export)
    for ckpt in list_checkpoints(old_run / "checkpoints"):  # as written before the section existed
        tensors, meta = load_checkpoint(ckpt)
        del meta["config"]["plan"]
        save_checkpoint(ckpt, tensors, {k: v for k, v in meta.items() if k != "format"})
    config = json.loads((old_export / "config.json").read_text())
    del config["lejepa"]["config"]["plan"]
    (old_export / "config.json").write_text(json.dumps(config))
    return {"run": run, "export": root / "export", "old_run": old_run, "old_export": old_export}


def _plan_json(args: list[str], tmp_path: Path, capsys) -> dict:
    out = tmp_path / "plan.json"
    code, _, err = cli(["world", "plan", *args, "-n", "1", "--no-baselines", "--json", str(out)], capsys)
    assert code == 0, err
    return json.loads(out.read_text())


# ---- where the settings come from ---------------------------------------------------------------


def test_the_plan_section_round_trips_through_the_run_its_checkpoint_and_its_export(runs):
    want = PlanConfig(**RUN_PLAN)
    assert "plan:" in (runs["run"] / "config.yaml").read_text()
    assert open_world_run(runs["run"]).plan == want
    assert open_world_run(list_checkpoints(runs["run"] / "checkpoints")[-1]).plan == want
    assert open_world_run(runs["export"]).plan == want


def test_a_run_from_before_the_plan_section_plans_with_the_library_defaults(runs, tmp_path, capsys):
    for old in (runs["old_run"], runs["old_export"]):
        assert open_world_run(old).plan == PlanConfig()
    small = ["--candidates", "4", "--iterations", "1", "--elites", "2", "--budget", "2"]
    report = _plan_json([str(runs["old_export"]), *small], tmp_path, capsys)
    assert report["cem"] == {**describe(PlanConfig(), 2), "candidates": 4, "iterations": 1, "elites": 2, "budget": 2}


def test_the_commands_defaults_are_the_librarys(runs, tmp_path, capsys):
    """No planner option given: `world plan` on a run without a plan section plans exactly as
    `plan()` does with no settings (both read PlanConfig), and the options only say "not given"."""
    from lejepa_cli.commands.world import plan_cmd, stress_cmd

    names = [f.name for f in dataclasses.fields(PlanConfig)]
    for command, given in ((plan_cmd, names), (stress_cmd, [n for n in names if n not in ("budget", "goal_offset")])):
        params = inspect.signature(command).parameters
        assert all(params[n].default is None for n in given) and params["planner"].default is None
    assert inspect.signature(plan).parameters["settings"].default is None
    cli_report = _plan_json([str(runs["old_run"])], tmp_path, capsys)  # no planner option at all
    model, world = (lambda u: (u.model, u.world))(open_world_run(runs["old_run"]))
    library = plan(model, world, episodes=1, planners=("model",))
    assert cli_report["cem"] == library["cem"] == describe(PlanConfig(), model.frameskip)
    assert library["cem"]["horizon_blocks"] == 20 and cli_report["budget"] == PlanConfig().budget
    assert cli_report["success_rate"] == library["success_rate"]


def test_options_override_the_runs_section_and_the_lewm_profile(runs, tmp_path, capsys):
    own = _plan_json([str(runs["run"])], tmp_path, capsys)["cem"]
    assert own == describe(PlanConfig(**RUN_PLAN), 2) and own["horizon_blocks"] == 3  # 5 steps, frameskip 2: rounded up
    over = _plan_json([str(runs["run"]), "--horizon", "8", "--cost", "min", "--budget", "4"], tmp_path, capsys)["cem"]
    assert over == describe(PlanConfig(**{**RUN_PLAN, "horizon": 8, "cost": "min", "budget": 4}), 2)
    lewm = _plan_json([str(runs["run"]), "--planner", "lewm", "--iterations", "1", "--candidates", "40"], tmp_path, capsys)["cem"]
    assert lewm == {"candidates": 40, "iterations": 1, "elites": 30, "horizon": 25, "cost": "final", "noise_beta": 0.0,
                    "budget": RUN_PLAN["budget"], "goal_offset": RUN_PLAN["goal_offset"], "horizon_blocks": 13}
    code, _, err = cli(["world", "plan", str(runs["run"]), "--elites", "50"], capsys)  # run's 12 candidates
    assert code == 2 and err.count("\n") == 1 and "elites (50) <= candidates (12)" in err
    code, _, err = cli(["world", "plan", str(runs["run"]), "--planner", "icem"], capsys)
    assert code == 2 and "icem" in err and "Traceback" not in err


def test_profiles_and_presets():
    # LeWM's CEM at LeWM's frameskip is the reference's search exactly; the default is the best measured.
    assert search(PROFILES["lewm"], 5) == CEMConfig() and PROFILES["default"] == PlanConfig()
    assert choose(PlanConfig(**RUN_PLAN), "lewm").budget == RUN_PLAN["budget"]  # a profile sets the search only
    with pytest.raises(UserError, match="unknown planner profile"):
        choose(PlanConfig(), "fast")
    assert [horizon_blocks(s, 5) for s in (1, 5, 6, 25)] == [1, 1, 2, 5]
    # The recipes plan with their presets' sections: world-tworoom's 40 steps are its former 20 blocks.
    tworoom, push, lewm = (load_config(p) for p in ("world-tworoom", "world-push", "lewm"))
    assert tworoom.plan == PlanConfig() and search(tworoom.plan, tworoom.world.frameskip) == CEMConfig(
        candidates=150, iterations=5, elites=15, horizon=20, cost="min", noise_beta=2.0)
    assert push.plan == PlanConfig() and search(push.plan, push.world.frameskip).horizon == 8
    assert search(lewm.plan, lewm.world.frameskip) == CEMConfig()
    with pytest.raises(UserError, match="plan.elites"):
        load_config("world-tworoom", ["plan.elites=151"])


def test_steps_and_blocks_plan_bit_for_bit_alike(runs):
    """`plan()` with horizon 40 steps at frameskip 2 searches exactly as the former horizon of 20 blocks."""
    used = open_world_run(runs["old_run"])
    settings = PlanConfig(candidates=30, iterations=3, elites=5, horizon=40, budget=8)
    starts, goals = draw_problems(used.world, 2, 0, settings.goal_offset)
    blocks = CEMConfig(candidates=30, iterations=3, elites=5, horizon=20, cost="min", noise_beta=2.0)
    old = run_episodes("model", used.world, starts, goals, model=used.model, frameskip=2, budget=8, cfg=blocks, seed=0)
    new = run_episodes("model", used.world, starts, goals, model=used.model, frameskip=2, budget=8,
                       cfg=search(settings, used.model.frameskip), seed=0)
    assert np.array_equal(old["final_cost"], new["final_cost"]) and np.array_equal(old["steps"], new["steps"])


# ---- the model's device -------------------------------------------------------------------------


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class OnOtherDevice(torch.Tensor):
    """A tensor on a pretend accelerator: it refuses what CUDA refuses (an operation that mixes it with
    a CPU tensor that has dimensions; .numpy()), and .cpu() / .to("cpu") bring it back as a CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.numpy:
            raise RuntimeError("can't convert a tensor on the other device to numpy: use .cpu() first")
        leaves_device = func is torch.Tensor.to and any(
            str(v) == "cpu" or (isinstance(v, torch.device) and v.type == "cpu") for v in (*args[1:], *kwargs.values()))
        if func is torch.Tensor.cpu or leaves_device:
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].as_subclass(torch.Tensor).clone()
        if func is not torch.Tensor.to:  # moving a CPU tensor here is how it gets here
            cpu = [t for t in _tensors((args, kwargs)) if type(t) is torch.Tensor and t.dim() > 0]
            if cpu:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: expected all tensors on the same device, "
                                   f"found a CPU tensor of shape {tuple(cpu[0].shape)}")
        return super().__torch_function__(func, types, args, kwargs)


def test_the_pretend_device_refuses_what_a_gpu_refuses():
    """The check below cannot pass silently: the mistakes the planner had fail on the pretend device."""
    there = torch.ones(2, 3).as_subclass(OnOtherDevice)
    with pytest.raises(RuntimeError, match="same device"):
        torch.zeros(2, 3) + there  # a tensor built on the CPU, used with the model's output
    with pytest.raises(RuntimeError, match="numpy"):
        there.numpy()
    assert type(there + 1) is OnOtherDevice and type(there.cpu()) is torch.Tensor
    assert type(torch.zeros(2, 3).to(there)) is OnOtherDevice and type(there.to("cpu")) is torch.Tensor


class OtherDeviceModel(CentroidModel):
    """CentroidModel's exact latents on the pretend device; its rollout refuses inputs from anywhere else."""

    def __init__(self):
        self.rollouts = 0

    def encode(self, frames):
        return super().encode(frames).as_subclass(OnOtherDevice)

    def rollout(self, latents, actions, future):
        for name, t in (("latents", latents), ("actions", actions), ("future actions", future)):
            assert isinstance(t, OnOtherDevice), f"{name} given to the model from {type(t).__name__}, not its device"
        self.rollouts += 1
        return super().rollout(latents, actions, future)

    def rollout_candidates(self, latents, past, candidates):  # what plan.py calls (world/rollout.py)
        for name, t in (("latents", latents), ("past actions", past), ("candidates", candidates)):
            assert isinstance(t, OnOtherDevice), f"{name} given to the model from {type(t).__name__}, not its device"
        self.rollouts += 1
        return super().rollout_candidates(latents, past, candidates)


def test_every_tensor_of_a_plan_follows_the_model_to_its_device():
    world = make_world("two-room", size=32)
    starts = np.array([[0.2, 0.3, 0, 0], [0.8, 0.7, 0, 0]], float)
    goals = starts + np.array([[0.2, 0.1, 0, 0], [-0.15, -0.2, 0, 0]])
    model = OtherDeviceModel()
    cfg = search(PlanConfig(candidates=60, iterations=6, elites=8, horizon=10), model.frameskip)
    result = run_episodes("model", world, starts, goals, model=model, frameskip=2, budget=40, cfg=cfg, seed=0)
    assert model.rollouts >= 6 and result["success"].all() and result["final_cost"].max() < 0.01
    # the same plan as on the CPU: the noise is drawn on the CPU, then moved
    cpu = run_episodes("model", world, starts, goals, model=CentroidModel(), frameskip=2, budget=40, cfg=cfg, seed=0)
    assert np.array_equal(cpu["steps"], result["steps"]) and np.allclose(cpu["final_cost"], result["final_cost"])


@pytest.mark.skipif(not (torch.cuda.is_available() or torch.backends.mps.is_available()), reason="no GPU here")
def test_a_model_on_a_gpu_plans(runs, tmp_path, capsys):
    used = open_world_run(runs["run"], device="auto")
    assert used.model.action_mean.device.type in ("cuda", "mps")
    report = plan(used.model, used.world, episodes=2, settings=used.plan)
    assert 0 <= report["success_rate"] <= 1 and report["seconds_per_decision"] > 0
    cli_report = _plan_json([str(runs["run"]), "--device", "auto"], tmp_path, capsys)
    assert 0 <= cli_report["success_rate"] <= 1


def test_device_option_takes_cpu_and_refuses_an_unknown_one(runs, tmp_path, capsys):
    assert 0 <= _plan_json([str(runs["run"]), "--device", "cpu"], tmp_path, capsys)["success_rate"] <= 1
    code, _, err = cli(["world", "plan", str(runs["run"]), "--device", "tpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device" in err
