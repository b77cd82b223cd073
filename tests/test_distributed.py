"""Multi-process training on the CPU with gloo: exactness against one process, torchrun end to end,
resume on another world size, FSDP2 whole-state checkpoints, and a failing rank ending the job.

Exactness tests feed identical views to one process and to two: `fixed_views` replaces the
random augmentation with a deterministic function of each image. Training seeds the views by
(seed, step, rank, micro-batch), so two processes draw other (equally valid) crops than one
process would; fixing them isolates what is under test, the parallel arithmetic (gradient
reduction, SIGReg over the global batch, BatchNorm statistics over the global batch).
Drop-path is 0 there for the same reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lejepa_cli.image.objective as image_mod
from lejepa_cli import dist
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint
from lejepa_cli.config import load_config
from lejepa_cli.data.loader import StepSampler
from lejepa_cli.image.objective import lejepa_step
from lejepa_cli.train import build_run, restore_state, run_state, train

from conftest import TINY

REPO = Path(__file__).resolve().parent.parent
STEP = 3  # any step: it seeds SIGReg's directions and picks the global batch
RTOL = 1e-5  # relative error allowed between one process and two (per tensor, in norm)

VIT = [*TINY, "model.drop_path=0.0"]
RESNET = [*TINY, "model.arch=resnet18", "model.small_stem=true", "views.local_views=0", "views.global_size=8",
          "train.online_probe=false"]
CASES: dict[str, list[str]] = {  # name -> overrides; each runs one step on 2 ranks
    "vit": VIT,  # DDP
    "vit_accum": [*VIT, "train.grad_accum=2"],  # DDP + 2 micro-batches per rank (no_sync)
    "fsdp": [*VIT, "train.fsdp=true", "model.grad_checkpointing=true", "train.grad_accum=2"],
    "resnet": RESNET,  # DDP + global BatchNorm2d in the backbone; float64, see DTYPE
}
# ResNet runs in float64: at initialisation many of its gradients are tiny sums of large terms
# (BatchNorm after BatchNorm makes whole directions nearly invariant), and in float32 merely
# reordering the samples of ONE process moves them by ~3%. float64 shows the arithmetic is the
# same; the ViT cases run in float32, as training does.
DTYPE = {"resnet": torch.float64}
REFERENCE = {"vit": "vit", "vit_accum": "vit", "fsdp": "vit", "resnet": "resnet"}  # one-process twin
FSDP_RUN = [*VIT, "train.fsdp=true", "train.steps=2", "train.save_every=2"]


# ---- helpers shared by the test process and the spawned ranks -----------------------------------


def fixed_views(images, cfg, *, mean, std, generator):
    """A deterministic stand-in for `make_views`: each view is a fixed function of its own image."""
    del generator
    x = images.to(torch.get_default_dtype()) / 255.0
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    g = F.interpolate(x, size=(cfg.global_size,) * 2, mode="bilinear", align_corners=False)
    globals_ = [(g.flip(-1) if v % 2 else g) * (1 + 0.1 * v) for v in range(cfg.global_views)]
    h = x.shape[-1] // 2
    locals_ = [
        F.interpolate(x[..., (v % 2) * h : (v % 2) * h + h, (v // 2 % 2) * h : (v // 2 % 2) * h + h],
                      size=(cfg.local_size,) * 2, mode="bilinear", align_corners=False)
        for v in range(cfg.local_views)
    ]
    return torch.stack(globals_), (torch.stack(locals_) if locals_ else None)


@contextmanager
def views_fixed() -> Iterator[None]:
    real = image_mod.make_views
    image_mod.make_views = fixed_views
    try:
        yield
    finally:
        image_mod.make_views = real


def one_step(case: str) -> dict[str, torch.Tensor]:
    """One optimizer step's loss parts, gradients and BatchNorm buffers on this process's shard.

    Loss parts are averaged over ranks (as the trainer logs them); `sigreg_ranks` holds each
    rank's own SIGReg value; gradients are whole tensors (gathered under FSDP).
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE.get(case, torch.float32))  # the model is built in it
    try:
        return _one_step(load_config("demo", CASES[case]))
    finally:
        torch.set_default_dtype(old)


def _one_step(cfg) -> dict[str, torch.Tensor]:
    run = build_run(cfg, torch.device("cpu"))
    sampler = StepSampler(len(run.train_data), cfg.train.batch_size, cfg.train.seed)
    micro, labels = [], []
    for m in range(cfg.train.grad_accum):
        images, y = run.train_data.batch(sampler.local_batch(STEP, dist.rank(), dist.world_size(), m, cfg.train.grad_accum))
        micro.append(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2))
        labels.append(torch.from_numpy(np.asarray(y, np.int64)))
    with views_fixed():
        parts = lejepa_step(run, micro, labels, STEP, seeds=list(range(cfg.train.grad_accum)))
    out = {k: dist.all_reduce_mean(v.float()) for k, v in parts.items()}
    sig = parts["sigreg"].float().reshape(1)
    ranks = [torch.zeros_like(sig) for _ in range(dist.world_size())]
    if dist.is_distributed():
        tdist.all_gather(ranks, sig)
    else:
        ranks = [sig]
    out["sigreg_ranks"] = torch.cat(ranks)
    for prefix, module in run.modules.items():
        for name, p in module.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[f"grad.{prefix}.{name}"] = g.detach().clone()
        for name, b in module.named_buffers():
            out[f"buffer.{prefix}.{name}"] = b.detach().clone()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(floor))


def assert_grads_match(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Each module's whole gradient to RTOL, and each tensor to RTOL of the larger of its own norm
    and 1e-3 of its module's gradient norm: the final LayerNorm's bias has a true gradient of
    exactly 0 (the projector's first BatchNorm removes any shift of h), so only rounding noise
    is left to compare there."""
    for module in ("backbone", "projector", "probe"):
        keys = [k for k in ref if k.startswith(f"grad.{module}.")]
        assert keys or module == "probe", module
        if not keys:
            continue
        whole_got, whole_ref = (torch.cat([d[k].flatten() for k in keys]) for d in (got, ref))
        assert rel_err(whole_got, whole_ref) < RTOL, (module, rel_err(whole_got, whole_ref))
        floor = 1e-3 * float(whole_ref.double().norm())
        errors = {k: rel_err(got[k], ref[k], floor) for k in keys}
        worst = max(errors, key=errors.get)
        assert errors[worst] < RTOL, (worst, errors[worst])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """Body of each spawned rank: every case's step, an FSDP run through train(), a state round trip."""
    torch.set_num_threads(1)  # two ranks on two cores
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=120))
    results: dict[str, torch.Tensor] = {}
    # A flag raised on rank 1 only (a signal it alone received) is seen by both.
    results["any_rank"] = torch.tensor([dist.any_rank(rank == 1), dist.any_rank(False)])
    for name in CASES:
        results.update({f"{name}.{k}": v for k, v in one_step(name).items()})
    # FSDP through the trainer; rank 0 writes whole-state checkpoints.
    run_dir = Path(out) / "fsdp_run"
    train(load_config("demo", FSDP_RUN), run_dir, progress=False)
    # Load that checkpoint into a fresh sharded run and gather it again: it must come back unchanged.
    tensors, meta = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    run = build_run(load_config("demo", FSDP_RUN), torch.device("cpu"))
    restore_state(run, tensors, meta)
    again, _ = run_state(run, 2, StepSampler(len(run.train_data), run.cfg.train.batch_size, 0))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, str(Path(out) / "results.safetensors"))
        save_file({k: v.contiguous() for k, v in again.items() if not k.startswith("rng.")},
                  str(Path(out) / "regathered.safetensors"))
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run `_rank_main` on 2 gloo processes once for the module; returns its output folder."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("two_ranks")
    ctx = mp.start_processes(_rank_main, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 300 s")
    return out


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, torch.Tensor]]:
    """The same steps on one process holding the whole global batch."""
    return {name: one_step(name) for name in set(REFERENCE.values())}


# ---- exactness: two processes == one process on the same global batch -----------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process(two_ranks, references, case):
    results = load_file(str(two_ranks / "results.safetensors"))
    got = {k[len(case) + 1 :]: v for k, v in results.items() if k.startswith(case + ".")}
    ref = references[REFERENCE[case]]
    assert got.keys() == ref.keys()
    for part in ("loss", "pred", "sigreg", "probe_loss"):
        if part in ref:
            assert rel_err(got[part], ref[part]) < RTOL, (part, float(got[part]), float(ref[part]))
    # SIGReg is the global-batch statistic on every rank (same directions, all-reduced ECF).
    assert got["sigreg_ranks"].shape == (2,)
    assert rel_err(got["sigreg_ranks"], ref["sigreg"].expand(2)) < RTOL
    assert_grads_match(got, ref)  # backbone, projector and online probe
    # BatchNorm running statistics saw the global batch too (projector; ResNet backbone).
    for k in (k for k in ref if k.startswith("buffer.") and ref[k].is_floating_point()):
        assert rel_err(got[k], ref[k]) < RTOL, k
    assert any("running_var" in k for k in ref)


def test_any_rank_agrees_on_a_flag_raised_by_one_rank(two_ranks):
    assert load_file(str(two_ranks / "results.safetensors"))["any_rank"].tolist() == [True, False]


def test_gradient_accumulation_equals_one_big_batch(references):
    """grad_accum = 2 x B equals one step of 2B exactly (ViT: LayerNorm, nothing couples micro-batches)."""
    ref = references["vit"]
    got = one_step("vit_accum")
    assert got.keys() == ref.keys()
    for k in ("loss", "pred", "sigreg", *(k for k in ref if k.startswith("buffer.") and ref[k].is_floating_point())):
        assert rel_err(got[k], ref[k]) < RTOL, (k, rel_err(got[k], ref[k]))
    assert_grads_match(got, ref)


def test_global_batchnorm_is_plain_batchnorm_on_one_process():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm1d(8)
    global_bn = dist.global_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(8)), torch.device("cpu"))[0]
    assert type(global_bn) is torch.nn.BatchNorm1d  # no process group: left alone
    swapped = torch.nn.BatchNorm1d(8)
    swapped.__class__ = dist.GlobalBatchNorm1d
    x = torch.randn(16, 8) * 3 + 1
    torch.testing.assert_close(swapped(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(swapped.running_var, plain.running_var, rtol=0, atol=0)
    assert set(swapped.state_dict()) == set(plain.state_dict())


# ---- FSDP: whole-state checkpoints that resume anywhere ----------------------------------------------


def test_fsdp_checkpoint_is_whole_state_and_round_trips(two_ranks):
    ckpt = list_checkpoints(two_ranks / "fsdp_run" / "checkpoints")[-1]
    tensors, meta = load_checkpoint(ckpt)
    assert meta["world_size"] == 2 and meta["config"]["train"]["fsdp"] is True
    # Names and shapes are those of the unsharded model: what one process would have written.
    run = build_run(load_config("demo", FSDP_RUN), torch.device("cpu"))
    for prefix, module in run.modules.items():
        for name, t in module.state_dict().items():
            assert tensors[f"model.{prefix}.{name}"].shape == t.shape, name
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        assert tensors[f"optim.{i}.exp_avg"].shape == p.shape
    # Loaded into a fresh sharded run on 2 ranks and gathered again: unchanged.
    again = load_file(str(two_ranks / "regathered.safetensors"))
    for k, v in again.items():
        assert torch.equal(v, tensors[k]), k


def test_fsdp_checkpoint_resumes_on_one_process(two_ranks, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_ranks / "fsdp_run", run_dir)
    summary = train(load_config("demo", [*FSDP_RUN, "train.steps=3"]), run_dir, resume="auto", progress=False)
    assert summary["step"] == 3
    _, meta = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert meta["step"] == 3 and meta["world_size"] == 1


# ---- torchrun end to end ---------------------------------------------------------------------------


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _env() -> dict[str, str]:
    # COLUMNS: rich wraps its lines at the terminal width, 80 without a terminal.
    return {**os.environ, "OMP_NUM_THREADS": "1", "LEJEPA_DIST_TIMEOUT": "60", "PYTHONPATH": str(REPO), "COLUMNS": "300"}


def test_torchrun_two_processes_then_resume_on_one(tmp_path):
    out = tmp_path / "run"
    base = [o for o in TINY if not o.startswith(("train.steps", "train.save_every"))]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, "-m", "lejepa_cli", "train", "--preset", "demo", "--out", str(out), "--no-progress",
           *_sets([*base, "train.steps=6", "train.save_every=3"])]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    # Rank 0 alone prints and writes: one header with the global batch, one result table, one metrics file.
    assert res.stderr.count("global batch 16 = 2 process(es) x 1 micro-batch(es) x 8") == 1, res.stderr
    assert res.stdout.count(f"run {out}") == 1, res.stdout
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:6] == [1, 2, 3, 4, 5, 6] and steps[6:] == [6]  # six step lines, then the final evaluation
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [
        "step-000000003.safetensors", "step-000000006.safetensors"]
    assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])[1]["world_size"] == 2

    # The same run continued by ONE process: the data position re-shards by itself.
    cmd = [sys.executable, "-m", "lejepa_cli", "train", "--out", str(out), "--resume", "auto", "--no-progress",
           "--set", "train.steps=8"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "step-000000006" in res.stderr
    assert "global batch 16 = 1 process(es) x 1 micro-batch(es) x 16" in res.stderr
    _, meta = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert meta["step"] == 8 and meta["world_size"] == 1
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert steps == list(range(1, 9))


def _worker_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` among the children of the torchrun process `agent`."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent:
                if f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    return int(proc.name)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return None


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """`kill` of rank 1 alone: both ranks finish the same step, rank 0 saves it, the job says how to resume."""
    out = tmp_path / "run"
    base = [o for o in TINY if not o.startswith(("train.steps", "train.save_every"))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lejepa_cli", "train", "--preset", "demo", "--out", str(out), "--no-progress",
           *_sets([*base, "train.steps=100000", "train.save_every=100000"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        pid = _worker_pid(proc.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.terminate()  # torchrun passes it on to its workers
            proc.wait(timeout=60)
    assert proc.returncode != 0
    assert "stopped by SIGTERM after step" in stderr and "stopped by a signal to another rank after step" in stderr
    (ckpt,) = list_checkpoints(out / "checkpoints")
    stopped_at = load_checkpoint(ckpt)[1]["step"]
    assert f"after step {stopped_at};" in stderr.split("stopped by SIGTERM")[1]
    assert f"after step {stopped_at};" in stderr.split("stopped by a signal to another rank")[1]
    assert json.loads(metrics.read_text().splitlines()[-1])["step"] == stopped_at


def test_a_failing_rank_ends_the_job(tmp_path):
    """Rank 1 raises mid-run: the job must end (non-zero, with the error), not hang on rank 0."""
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "import os, sys\n"
        "import lejepa_cli.image.objective as t\n"
        "real = t.lejepa_step\n"
        "def failing(run, micro, labels, step, seeds):\n"
        "    if step == 2 and os.environ['RANK'] == '1':\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return real(run, micro, labels, step, seeds)\n"
        "t.lejepa_step = failing\n"
        "from lejepa_cli.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    base = [o for o in TINY if not o.startswith("train.steps")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--preset", "demo", "--out", str(tmp_path / "run"), "--no-progress",
           *_sets([*base, "train.steps=1000"])]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=180)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert elapsed < 90, f"the job took {elapsed:.0f} s to end after a rank failed"
