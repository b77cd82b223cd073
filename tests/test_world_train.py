"""World-model training on the shared loop: end to end, exact resume, two ranks, export, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from safetensors.torch import load_file, save_file

import lejepa_cli
from lejepa_cli import dist
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint
from lejepa_cli.cli import main
from lejepa_cli.config import load_config
from lejepa_cli.data.loader import StepSampler
from lejepa_cli.errors import UserError
from lejepa_cli.train import build_run, train
from lejepa_cli.world.prepare import simulate_dataset

# A world model small enough that a step takes milliseconds: 16 px frames, 2 predictor blocks.
TINY_WORLD = [
    "world.frame_size=16", "model.patch_size=8", "model.proj_hidden=32", "world.latent_dim=16",
    "world.depth=1", "world.heads=2", "world.head_dim=8", "world.mlp_dim=32", "world.frameskip=2",
    "world.eval_windows=16", "world.eval_horizon=3", "loss.num_slices=32", "train.batch_size=8",
    "train.steps=6", "train.save_every=3", "train.eval_every=3", "log.every=1", "train.device=cpu",
]


def simulate(folder: Path, name: str = "two-room", episodes: int = 6, steps: int = 16) -> Path:
    simulate_dataset(name, folder, episodes=episodes, steps=steps, val_episodes=2, size=16, seed=0, progress=False)
    return folder


@pytest.fixture(scope="module")
def two_room(tmp_path_factory) -> Path:
    return simulate(tmp_path_factory.mktemp("worlds") / "two-room")


def world_config(data: Path, preset: str = "world-tworoom", extra: tuple[str, ...] = ()):
    return load_config(preset, [*TINY_WORLD, f"data.source={data}", *extra])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "optim."))}


def test_world_run_logs_loss_parts_and_rollout_errors_beside_the_copy_guess(two_room, tmp_path):
    summary = train(world_config(two_room), tmp_path / "run", progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert {"pred", "sigreg", "loss", "frames_per_s"} <= steps[-1].keys()
    assert all(np.isfinite(x["loss"]) for x in steps)
    evals = [x for x in lines if "one_step_err" in x]
    assert [x["step"] for x in evals] == [0, 3, 6]  # before training, periodic, final
    for key in ("one_step_copy_err", "one_step_ratio", "rollout3_err", "rollout3_copy_err", "rollout3_ratio", "val_sigreg"):
        assert key in summary and np.isfinite(summary[key])
    assert summary["one_step_ratio"] == pytest.approx(summary["one_step_err"] / summary["one_step_copy_err"], rel=1e-5)
    tensors, meta = load_checkpoint(Path(summary["checkpoint"]))
    assert meta["config"]["objective"] == "world" and meta["data"]["world"] == "two-room"
    assert {k.split(".")[1] for k in tensors if k.startswith("model.")} == {"backbone", "projector", "action_encoder", "predictor"}


@pytest.mark.parametrize("name,preset", [("push", "world-push"), ("balls", "world-balls")])
def test_other_worlds_train_with_their_presets(name, preset, tmp_path):
    data = simulate(tmp_path / name, name)
    summary = train(world_config(data, preset), tmp_path / "run", progress=False)
    assert np.isfinite(summary["one_step_err"]) and summary["step"] == 6


def test_sigkill_during_world_training_then_resume_is_bit_exact(two_room, tmp_path):
    sets = [a for o in TINY_WORLD if not o.startswith(("train.steps", "train.save_every")) for a in ("--set", o)]
    sets += ["--set", "train.steps=30", "--set", "train.save_every=4", "--set", "train.eval_every=0", "--no-progress"]
    cmd = [sys.executable, "-m", "lejepa_cli", "train", "--preset", "world-tworoom", "--data", str(two_room)]
    straight = subprocess.run(cmd + ["--out", str(tmp_path / "a")] + sets, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "b")] + sets, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list_checkpoints(tmp_path / "b" / "checkpoints") and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(tmp_path / "b" / "checkpoints")[-1].name != "step-000000030.safetensors"
    resumed = subprocess.run(cmd + ["--out", str(tmp_path / "b"), "--resume", "auto"] + sets, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- two gloo ranks equal one process on the same global batch ---------------------------------

STEP = 2


def _world_step(cfg) -> dict[str, torch.Tensor]:
    run = build_run(cfg, torch.device("cpu"))
    sampler = StepSampler(len(run.train_data), cfg.train.batch_size, cfg.train.seed)
    frames, actions = run.train_data.batch(sampler.local_batch(STEP, dist.rank(), dist.world_size(), 0, 1))
    x = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3)
    parts = run.step([x], [torch.from_numpy(np.ascontiguousarray(actions, np.float32))], STEP, [0])
    out = {k: dist.all_reduce_mean(v.float()) for k, v in parts.items()}
    for prefix, module in run.modules.items():
        out.update({f"grad.{prefix}.{n}": p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None})
        out.update({f"buffer.{prefix}.{n}": b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return out


def _rank_main(rank: int, world: int, port: int, data: str, out: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=120))
    result = _world_step(world_config(Path(data)))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in result.items()}, out)
    tdist.barrier()
    tdist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(two_room, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two.safetensors"
    mp.start_processes(_rank_main, args=(2, port, str(two_room), str(out)), nprocs=2, start_method="spawn")
    got, ref = load_file(str(out)), _world_step(world_config(two_room))
    assert got.keys() == ref.keys()

    def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
        return float((a.double() - b.double()).norm() / max(float(b.double().norm()), floor))

    for k in ("loss", "pred", "sigreg", *(k for k in ref if k.startswith("buffer."))):
        assert rel_err(got[k], ref[k]) < 1e-5, k
    # Gradients to 1e-4 (float32 through two BatchNorm projectors; a lost all-reduce or world-size
    # factor is off by O(1)), per module and per tensor above 1e-3 of its module's norm: the
    # backbone's final LayerNorm bias has a true gradient of 0 (the BN projector removes shifts of h).
    for module in ("backbone", "projector", "action_encoder", "predictor"):
        keys = [k for k in ref if k.startswith(f"grad.{module}.")]
        whole_got, whole_ref = (torch.cat([d[k].flatten() for k in keys]) for d in (got, ref))
        if float(whole_ref.norm()) == 0:  # the action encoder at step 0: AdaLN-zero's zero weights pass no gradient
            assert float(whole_got.norm()) == 0, module
            continue
        assert rel_err(whole_got, whole_ref) < 1e-4, module
        floor = 1e-3 * float(whole_ref.double().norm())
        assert max(rel_err(got[k], ref[k], floor) for k in keys) < 5e-3, module


# ---- export and the downstream API --------------------------------------------------------------


def test_export_of_a_world_run_loads_with_load_world_model(two_room, tmp_path):
    summary = train(world_config(two_room), tmp_path / "run", progress=False)
    with pytest.raises(SystemExit) as info:
        main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")])
    assert info.value.code in (0, None)
    assert {p.name for p in (tmp_path / "exp").iterdir()} == {"model.safetensors", "world.safetensors", "config.json"}
    wm = lejepa_cli.load_world_model(tmp_path / "exp")
    from_run = lejepa_cli.load_world_model(tmp_path / "run")
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8)
    z = wm.encode(frames)
    assert z.shape == (2, 4, 16) and torch.allclose(z, from_run.encode(frames))
    actions = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)  # frameskip 2 x 2-D actions
    future = np.random.default_rng(2).normal(size=(2, 4, 4)).astype(np.float32)
    out = wm.rollout(z[:, :3], actions, future)
    assert out.shape == (2, 5, 16) and torch.allclose(out, from_run.rollout(z[:, :3], actions, future))
    # The same numbers the training checkpoint's modules give.
    run = build_run(world_config(two_room), torch.device("cpu"))
    tensors, _ = load_checkpoint(Path(summary["checkpoint"]))
    for prefix, module in run.modules.items():
        module.load_state_dict({k[len(prefix) + 7:]: v for k, v in tensors.items() if k.startswith(f"model.{prefix}.")})
    run.model.eval()
    x = run.frames_in(torch.from_numpy(frames).movedim(-1, -3))
    assert torch.allclose(run.model.encode(x), z, atol=1e-6)
    with pytest.raises(UserError, match="action blocks need 4 numbers"):
        wm.rollout(z[:, :3], actions[..., :2], future)


# ---- bad input: one line and an exit code --------------------------------------------------------


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, capsys.readouterr().err


def test_world_preset_refuses_image_data_and_image_preset_refuses_trajectories(two_room, tmp_path, capsys):
    images = tmp_path / "images.npz"
    np.savez(images, x_train=np.zeros((8, 16, 16, 3), np.uint8), y_train=np.zeros(8, np.int64))
    for args in (["train", "--preset", "world-tworoom", "--data", str(images)],
                 ["train", "--preset", "world-tworoom"],
                 ["train", "--preset", "demo", "--data", str(two_room)]):
        code, err = run_cli([*args, "--out", str(tmp_path / "r"), "--no-progress"], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


def test_episodes_shorter_than_one_window_are_one_line(two_room, tmp_path, capsys):
    code, err = run_cli(["train", "--preset", "world-tworoom", "--data", str(two_room), "--out", str(tmp_path / "r"),
                         "--no-progress", "--set", "world.frameskip=6"], capsys)
    assert code == 2 and err.count("\n") == 1 and "window" in err, err


def test_open_loop_training_reads_longer_windows_and_refuses_num_preds_above_one(two_room, tmp_path, capsys):
    cfg = world_config(two_room, extra=("train.steps=2", "train.eval_every=0", "world.rollout_steps=3"))
    run = build_run(cfg, torch.device("cpu"))
    assert run.train_data.num_frames == 3 + 1 + 2  # history + num_preds + rollout_steps - 1
    summary = train(cfg, tmp_path / "r3", progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["one_step_err"])
    capsys.readouterr()  # the run's own header
    code, err = run_cli(["train", "--preset", "world-tworoom", "--data", str(two_room), "--out", str(tmp_path / "r"),
                         "--no-progress", "--set", "world.rollout_steps=2", "--set", "world.num_preds=2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "rollout_steps" in err, err


def test_gradient_clipping_bounds_the_update_and_is_off_by_default(two_room, tmp_path):
    runs = {}
    for name, clip in (("off", "0.0"), ("loose", "1e9"), ("tight", "1e-6")):
        cfg = world_config(two_room, extra=("train.steps=2", "train.eval_every=0", f"optim.grad_clip={clip}"))
        train(cfg, tmp_path / name, progress=False)
        runs[name] = weights(tmp_path / name)
    assert all(torch.equal(runs["off"][k], runs["loose"][k]) for k in runs["off"])  # a norm it never reaches
    assert any(not torch.equal(runs["off"][k], runs["tight"][k]) for k in runs["off"] if k.startswith("model."))


@pytest.mark.parametrize("kind", ["npz", "h5"])
def test_a_trajectory_npz_and_a_lewm_hdf5_file_prepare_and_train(kind, tmp_path, capsys):
    """Users' own trajectories: `lejepa data prepare` of an .npz or a LeWM-layout HDF5 file, then a world preset."""
    rng = np.random.default_rng(0)
    lengths = [14, 12, 16, 13, 15]
    T = sum(lengths)
    frames = rng.integers(0, 256, (T, 16, 16, 3), dtype=np.uint8)
    actions = rng.normal(size=(T, 2)).astype(np.float32)
    episode_idx = np.repeat(np.arange(len(lengths)), lengths)
    if kind == "npz":
        src = tmp_path / "mine.npz"
        np.savez(src, frames=frames, actions=actions, episode_idx=episode_idx)
    else:
        h5py = pytest.importorskip("h5py")
        src = tmp_path / "lewm.h5"
        with h5py.File(src, "w") as f:  # LeWM's layout: one row per step, channels first
            for key, value in {"pixels": frames.transpose(0, 3, 1, 2), "action": actions, "episode_idx": episode_idx,
                               "step_idx": np.concatenate([np.arange(n) for n in lengths])}.items():
                f.create_dataset(key, data=value)
    code, err = run_cli(["data", "prepare", str(src), "--out", str(tmp_path / "prep"), "--val-fraction", "0.4"], capsys)
    assert code in (0, None), err
    sets = [x for o in TINY_WORLD if not o.startswith("train.steps") for x in ("--set", o)]
    code, err = run_cli(["train", "--preset", "world-tworoom", "--data", str(tmp_path / "prep"), "--out",
                         str(tmp_path / "run"), "--no-progress", *sets, "--set", "train.steps=3"], capsys)
    assert code in (0, None), err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and np.isfinite(summary["one_step_err"])


def test_world_benchmark_reports_training_and_planning_rollout_rates():
    from benchmarks import bench_world

    case = bench_world.measure("world-tworoom", 1, torch.device("cpu"), frame_side=32)
    assert case["train_frames_per_s"] > 0 and case["rollout_frames_per_s"] > 0
    assert case["rollout_candidates"] == 300 and case["rollout_horizon"] == 5
    assert case["cem_decision_shared_s"] == pytest.approx(30 * case["rollout_shared_ms"] / 1e3, rel=0.01)
    assert case["cem_decision_plain_s"] == pytest.approx(30 * case["rollout_plain_ms"] / 1e3, rel=0.01)
    assert case["shared_speedup"] == pytest.approx(case["rollout_plain_ms"] / case["rollout_shared_ms"], rel=0.02)
