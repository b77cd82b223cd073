"""The check before the first step: the memory estimate against measured peaks, refusals, warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_memory import _reset_peak
from lejepa_cli import preflight as pf
from lejepa_cli.config import load_config
from lejepa_cli.data.sources import load_dataset
from lejepa_cli.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SMALL_DATA = ["data.builtin_train=256", "data.builtin_val=32"]

# Two real training steps in a fresh process: the peak resident set above the state after the data
# is loaded (VmHWM reset through clear_refs, as benchmarks/bench_memory.py does), beside the estimate.
_CHILD = """
import gc, json, sys
import torch
from benchmarks.bench_memory import _peak_rss_mib, _reset_peak, _rss_mib
from lejepa_cli.image import objective as image_objective
from lejepa_cli import train as T
from lejepa_cli.config import load_config
from lejepa_cli.data.loader import BatchLoader, StepSampler
from lejepa_cli.data.sources import load_dataset
from lejepa_cli.preflight import estimate_step
torch.set_num_threads(1)
cfg = load_config(sys.argv[1], sys.argv[2:])
data = load_dataset(cfg.data, cfg.data.train_split)
est = estimate_step(cfg, data.channels, image_side=data.resolution, num_classes=data.num_classes)
gc.collect()
assert _reset_peak()
base = _rss_mib()
run = T.build_run(cfg, torch.device("cpu"), data)
loader = BatchLoader(data, StepSampler(len(data), cfg.train.batch_size, 0), torch.device("cpu"),
                     num_micro=cfg.train.grad_accum)
xs, ys = [], []
for step, micro, batch in loader.iterate(0, 2):
    xs.append(batch.inputs)
    ys.append(batch.targets)
    if micro == cfg.train.grad_accum - 1:
        image_objective.lejepa_step(run, xs, ys, step, [T.step_seed(0, step, 0, m) for m in range(cfg.train.grad_accum)])
        xs, ys = [], []
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.probe_optimizer.step()
        run.probe_optimizer.zero_grad(set_to_none=True)
loader.close()
print(json.dumps({"measured": (_peak_rss_mib()[0] - base) * 2**20, "estimate": est.total,
                  "activations": est.activations}))
"""


@pytest.mark.skipif(not _reset_peak(), reason="needs Linux's /proc/self/clear_refs to reset the peak")
@pytest.mark.parametrize("preset, sets", [
    ("demo", ["train.batch_size=16", "data.builtin_size=64", "views.global_size=64", "views.local_size=32"]),
    ("resnet18-32", ["train.batch_size=8"]),
    ("demo", ["train.batch_size=32", "train.grad_accum=2", "model.grad_checkpointing=true", "data.builtin_size=64",
              "views.global_size=64", "views.local_size=32"]),
], ids=["vit", "resnet", "vit-checkpointed-accum"])
def test_estimate_is_within_a_factor_1_5_of_the_measured_peak(preset, sets):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _CHILD, preset, *sets, *SMALL_DATA], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["activations"] > 0.25 * got["estimate"]  # the activation model is what is being tested
    assert 1 / 1.5 <= got["measured"] / got["estimate"] <= 1.5, got


def test_vit_formula_counts_what_autograd_saves():
    """The per-image ViT count against the storages autograd really saves on the CPU (exact but for small tensors)."""
    from benchmarks.bench_memory import _SavedTensors
    from lejepa_cli.models import build_backbone

    vit = build_backbone("vit_micro", img_size=32, patch_size=8)
    with _SavedTensors([vit]) as saved:
        vit(torch.randn(4, 3, 32, 32))
    kept, _, _ = pf.vit_profile(vit, 32, 4)
    assert abs(4 * kept - saved.nbytes) < 0.05 * saved.nbytes


def test_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from lejepa_cli.models import build_backbone

    for arch, side, kwargs in (("vit_tiny", 64, {"patch_size": 8}), ("resnet18", 64, {})):
        with torch.device("meta"):
            net = build_backbone(arch, img_size=side, **kwargs)
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(2, 3, side, side, device="meta")).sum().backward()
        assert pf.backbone_profile(net, side, 4, False)[2] == pytest.approx(counter.get_total_flops() / 2, rel=0.03)


def _builtin(cfg):
    return load_dataset(cfg.data, cfg.data.train_split)


def test_refuses_a_step_that_cannot_fit_in_one_line_naming_what_to_change():
    cfg = load_config("vit-s", SMALL_DATA)
    with pytest.raises(UserError) as info:
        pf.preflight(cfg, torch.device("cpu"), _builtin(cfg), available=(8 << 30, "MemAvailable"), say=print)
    msg = str(info.value)
    assert "\n" not in msg
    assert "one training step needs about" in msg and "8.0 GiB is available (MemAvailable)" in msg
    for key in ("train.batch_size", "train.grad_accum", "model.grad_checkpointing", "model.arch", "views.global_size"):
        assert key in msg
    assert "train.grad_accum=8 would fit" in msg  # 32 images per micro-batch: ~5.5 GiB of activations


def test_processes_sharing_the_host_share_its_memory(monkeypatch):
    cfg = load_config("demo", SMALL_DATA)
    data = _builtin(cfg)
    need = pf.preflight(cfg, torch.device("cpu"), data, available=(1 << 40, "test"), say=print).total
    pf.preflight(cfg, torch.device("cpu"), data, available=(int(need * 1.5), "test"), say=print)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes on this host
    with pytest.raises(UserError, match="per process x 2"):
        pf.preflight(cfg, torch.device("cpu"), data, available=(int(need * 1.5), "test"), say=print)


def test_warns_about_a_gpu_sized_preset_on_the_cpu_and_on_toy_data():
    cfg = load_config("vit-s", SMALL_DATA)
    said: list[str] = []
    pf.preflight(cfg, torch.device("cpu"), _builtin(cfg), available=(1 << 40, "test"), cpu_flops=50e9, say=said.append)
    assert len(said) == 2
    assert "vit-s is sized for a GPU" in said[0] and "100000 steps take at least" in said[0] and "days" in said[0]
    assert "built-in toy shapes (256 images of 32 px, upscaled to 224 px)" in said[1] and "--data" in said[1]
    assert "lejepa data fetch" in said[1]


def test_demo_gets_no_warning_and_preflight_false_skips_everything():
    cfg = load_config("demo")  # its own 4096 built-in images: 8 passes, no warning
    said: list[str] = []
    assert pf.preflight(cfg, torch.device("cpu"), _builtin(cfg), available=(1 << 40, "t"), cpu_flops=50e9,
                        say=said.append) is not None
    assert said == []
    long = load_config("demo", SMALL_DATA)  # 500 steps x 64 images over 256 images: 125 passes over toy data
    pf.preflight(long, torch.device("cpu"), _builtin(long), available=(1 << 40, "t"), cpu_flops=50e9, say=said.append)
    assert len(said) == 1 and "toy shapes (256 images of 32 px)" in said[0] and "upscaled" not in said[0]
    off = load_config("vit-s", [*SMALL_DATA, "train.preflight=false"])
    assert pf.preflight(off, torch.device("cpu"), _builtin(off), available=(1, "t"), say=said.append) is None
    assert len(said) == 1


def test_available_memory_reads_meminfo_and_a_cgroup_limit(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683664 kB\nMemFree:  1 kB\nMemAvailable:   22720940 kB\n")
    assert pf._meminfo_available(meminfo) == 22720940 * 1024
    assert pf._meminfo_available(tmp_path / "missing") is None
    (tmp_path / "memory.max").write_text("max\n")
    assert pf._cgroup_room(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{4 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{1 << 30}\n")
    assert pf._cgroup_room(tmp_path) == 3 << 30
    got = pf.available_memory(torch.device("cpu"))
    assert got is None or got[0] > 0


def test_cli_refuses_vit_s_before_writing_anything(tmp_path, monkeypatch, capsys):
    """The headline command on a machine without the memory: one line, exit 2, no run folder."""
    from lejepa_cli.cli import main

    monkeypatch.setattr(pf, "available_memory", lambda device: (16 << 30, "MemAvailable"))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "vit-s", "--out", str(out), "--no-progress", "--set", "data.builtin_train=64",
              "--set", "data.builtin_val=16", "--set", "train.device=cpu"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines[-1].startswith("error: one training step needs about") and "16.0 GiB is available" in lines[-1]
    assert not out.exists()


def test_cgroup_room_follows_the_process_cgroup_in_v2_and_v1(tmp_path):
    """The tightest limit over the process's own cgroup and its parents, in either cgroup version."""
    (tmp_path / "memory.max").write_text("max\n")  # v2 root: no limit
    box = tmp_path / "jobs" / "one"
    box.mkdir(parents=True)
    (box / "memory.max").write_text(f"{6 << 30}\n")
    (box / "memory.current").write_text(f"{1 << 30}\n")
    assert pf._cgroup_room(tmp_path, ("/jobs/one", "/")) == 5 << 30
    (tmp_path / "jobs" / "memory.max").write_text(f"{4 << 30}\n")  # the parent binds tighter
    (tmp_path / "jobs" / "memory.current").write_text(f"{2 << 30}\n")
    assert pf._cgroup_room(tmp_path, ("/jobs/one", "/")) == 2 << 30
    v1 = tmp_path / "memory" / "api" / "p1"
    v1.mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text("5\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{3 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2 << 30}\n")
    assert pf._cgroup_room(tmp_path, ("/", "/api/p1")) == 1 << 30
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/api/p1\n3:cpu,cpuacct:/\n0::/jobs/one\n")
    assert pf._own_cgroups(proc) == ("/jobs/one", "/api/p1")


def test_address_space_limit_caps_the_memory_available(monkeypatch):
    """Under `ulimit -v` the room is the limit less what is mapped and each thread's stack and arena."""
    import resource

    assert pf._address_space_room(2, limit=12 << 30, mapped=1 << 30) == (11 << 30) - 2 * pf.THREAD_ADDRESS_SPACE
    assert pf._address_space_room(1, limit=1 << 30, mapped=2 << 30) == 0
    limit = 12000000 * 1024  # ulimit -v 12000000 (KiB)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, limit) if which == resource.RLIMIT_AS
                        else (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    monkeypatch.setattr(pf, "_meminfo_available", lambda: 64 << 30)
    monkeypatch.setattr(pf, "_cgroup_room", lambda: None)
    monkeypatch.setattr(pf, "_vm_size", lambda: 1 << 30)
    room, source = pf.available_memory(torch.device("cpu"))
    assert room == limit - (1 << 30) - (torch.get_num_threads() + 1) * pf.THREAD_ADDRESS_SPACE
    assert "RLIMIT_AS" in source
    cfg = load_config("vit-s", [*SMALL_DATA, "train.grad_accum=4"])  # the pre-flight's own advice on 16 GiB
    with pytest.raises(UserError, match=r"but 10\.\d GiB is available \(address space left under ulimit -v"):
        pf.preflight(cfg, torch.device("cpu"), _builtin(cfg), say=print)


def _under_ulimit(kib: int, *args: str) -> subprocess.CompletedProcess:
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (kib * 1024, kib * 1024))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lejepa_cli", "train", "--no-progress", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300, preexec_fn=limit)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS as Linux enforces it")
def test_vit_s_under_ulimit_v_stops_in_the_preflight_and_the_demo_still_runs(tmp_path):
    """The issue's case for real: `ulimit -v 12000000`, with and without the advised grad_accum=4."""
    small = ["--set", "data.builtin_train=64", "--set", "data.builtin_val=16", "--set", "train.steps=2",
             "--set", "train.device=cpu"]
    for extra in ([], ["--set", "train.grad_accum=4"]):
        res = _under_ulimit(12000000, "--preset", "vit-s", "--out", str(tmp_path / "vit"), *small, *extra)
        lines = [x for x in res.stderr.splitlines() if x.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
        assert lines[0].startswith("error: one training step needs about") and "ulimit -v" in lines[0]
        assert not (tmp_path / "vit").exists()
    res = _under_ulimit(12000000, "--preset", "demo", "--out", str(tmp_path / "demo"), *small)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "demo" / "summary.json").exists()


def test_out_of_memory_during_training_is_one_line_with_the_advice(tmp_path, monkeypatch, capsys):
    """A real allocation failure inside a step (past a pre-flight that let it through): exit 1, one line."""
    from lejepa_cli.cli import main
    from lejepa_cli.image import objective

    def step_too_big(*args, **kwargs):
        return torch.empty(1 << 50, dtype=torch.uint8)  # the CPU allocator refuses 1 PiB

    monkeypatch.setattr(objective, "lejepa_step", step_too_big)
    with pytest.raises(SystemExit) as info:
        main(["train", "--preset", "demo", "--out", str(tmp_path / "run"), "--no-progress", *(
            x for s in (*SMALL_DATA, "train.steps=2", "train.eval_every=0") for x in ("--set", s))])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert info.value.code == 1
    assert lines[-1].startswith("error: out of memory during training (could not allocate 1073741824 MiB)")
    assert "lower train.batch_size (now 64) or raise train.grad_accum (now 1)" in lines[-1]
