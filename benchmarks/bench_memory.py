"""Peak memory of one LeJEPA training step per preset and batch size, with and without activation checkpointing.

    python -m benchmarks.bench_memory              # demo, vit-t-32, resnet18-32, vit-s at batch 2 and 4; vit-s checkpointed too
    python -m benchmarks.bench_memory --quick      # demo and vit-s (checkpointing off / on) at batch 2
    python -m benchmarks.bench_memory --case vit-s:8:1   # preset:batch:grad_checkpointing

Each case runs in a fresh subprocess, so one case's allocator caches and high-water mark cannot
leak into the next: build the run as training does (`train.build_run`, built-in data at the
preset's image size), take the first batch from `BatchLoader`, then run one whole step
(`image_objective.lejepa_step` + AdamW step + online probe). Reported, above the state after the build
(weights and data already there) at the step's peak: on CUDA, torch.cuda.max_memory_allocated
minus memory_allocated before the step; on the CPU, the process's peak resident set (VmHWM,
reset through /proc/self/clear_refs after the build; resource.getrusage's ru_maxrss where there
is no /proc, see `_peak_rss_mib` for why not on Linux) minus the resident set after the build. The CPU figure moves with the
allocator (slack counts; memory freed during the build and reused does not), so it is a measure
of what the process costs, not of tensor bytes. The first step allocates the gradients and both
AdamW moments (`grads_adamw_mib`, 12 bytes per parameter); the allocator reuses the activations'
memory for them, so the peak is not their sum. `saved_for_backward_mib` is exact: the distinct storages autograd
keeps for backward (parameters excluded; under activation checkpointing, the block inputs the
checkpoints keep are not seen). `per_image_mib` is the slope between a preset's two batch sizes.
`first_step_s` times the measured (first) step, one-time kernel set-up included: its on/off ratio
under checkpointing is indicative only; bench_step times steady-state steps.
Also printed: an arithmetic table of fp32 weights + gradients + AdamW state per process under
FSDP for the big ViTs (not a measurement). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import default_device, describe, sync

SIDES = {"demo": 32, "vit-t-32": 32, "resnet18-32": 32, "vit-s": 224}  # image side of the built-in data
CASES = [(p, b, False) for p in SIDES for b in (2, 4)] + [("vit-s", b, True) for b in (2, 4)]
QUICK_CASES = [("demo", 2, False), ("vit-s", 2, False), ("vit-s", 2, True)]


def _rss_mib(field: str = "VmRSS") -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mib() -> tuple[float, str]:
    """The process's peak resident set: VmHWM where Linux has it, else getrusage's ru_maxrss.

    Not ru_maxrss on Linux: it is the max of this memory map's high-water mark and the one the
    process had before exec, i.e. the parent's resident set when a big benchmark process spawned
    us (a fresh demo case read 1 GiB that way), and clear_refs resets only the former.
    """
    hwm = _rss_mib("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "ru_maxrss"  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the process's resident high-water mark to the current resident set (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Counts the distinct storages autograd saves for backward (parameters excluded): the exact
    activation bytes a step holds, free of allocator effects. Inside checkpointed blocks the
    checkpoint's own hooks take over, so only what is saved outside them is counted."""

    def __init__(self, modules):
        self.params = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.storages: dict[int, int] = {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> "_SavedTensors":
        super().__enter__()
        return self

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def measure(preset: str, batch: int, grad_checkpointing: bool, threads: int | None = None,
            overrides: tuple[str, ...] = ()) -> dict:
    """One case, in this process: memory of one training step above the built run."""
    from benchmarks.bench_step import build_case
    from lejepa_cli.image import objective as image_objective
    from lejepa_cli import train as train_mod
    from lejepa_cli.config import load_config
    from lejepa_cli.data.loader import BatchLoader, StepSampler

    if threads:
        torch.set_num_threads(threads)
    device = default_device()
    ckpt = "true" if grad_checkpointing else "false"
    run = build_case(preset, SIDES.get(preset, 32), batch, device, (f"model.grad_checkpointing={ckpt}", *overrides))
    cfg = run.cfg
    loader = BatchLoader(run.train_data, StepSampler(len(run.train_data), batch, cfg.train.seed), device)
    try:
        _, _, b = next(loader.iterate(0, 1))
    finally:
        loader.close()
    params = sum(p.numel() for m in run.modules.values() for p in m.parameters())
    param_mib = sum(p.numel() * p.element_size() for m in run.modules.values() for p in m.parameters()) / 2**20

    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) / 2**20
        reset = True
    else:
        reset = _reset_peak()
        base = _rss_mib() if reset else _peak_rss_mib()[0]  # without a reset, only growth past the old peak shows
    t0 = time.perf_counter()
    seed = train_mod.step_seed(cfg.train.seed, 0, 0, 0)
    with _SavedTensors(run.modules.values()) as saved:
        image_objective.lejepa_step(run, [b.inputs], [b.targets], 0, [seed])
    run.optimizer.step()
    if run.probe_optimizer is not None:
        run.probe_optimizer.step()
    sync(device)
    step_s = time.perf_counter() - t0
    peak, source = ((torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated")
                    if device.type == "cuda" else _peak_rss_mib())
    above = peak - base
    return {
        "preset": preset, "arch": cfg.model.arch, "batch": batch, "grad_checkpointing": grad_checkpointing,
        "device": str(device), "dtype": "bfloat16 autocast" if run.amp else "float32",
        "views": f"{cfg.views.global_views} x {cfg.views.global_size}px + {cfg.views.local_views} x {cfg.views.local_size}px",
        "preset_batch": load_config(preset).train.batch_size,
        "params_M": round(params / 1e6, 2),
        "weights_mib": round(param_mib, 1),
        "after_build_mib": round(base, 1),
        "step_peak_above_build_mib": round(above, 1),
        "grads_adamw_mib": round(3 * param_mib, 1),
        "saved_for_backward_mib": round(saved.nbytes / 2**20, 1),
        "peak_reset": reset,
        "peak_source": source,
        "first_step_s": round(step_s, 2),
    }


def measure_in_subprocess(preset: str, batch: int, grad_checkpointing: bool, threads: int | None = None,
                          timeout: float = 600) -> dict:
    """`measure` in a fresh Python process (run from any folder: the repo root goes on PYTHONPATH)."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", f"{preset}:{batch}:{int(grad_checkpointing)}"]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)
    if res.returncode:
        raise RuntimeError(f"memory case {preset}:{batch}:{grad_checkpointing} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fsdp_table(archs: tuple[str, ...] = ("vit_large", "vit_huge"), worlds: tuple[int, ...] = (1, 8, 32)) -> dict:
    """GiB of fp32 weights + gradients + AdamW moments per process, by world size (arithmetic)."""
    from lejepa_cli.models import build_backbone

    out = {}
    for arch in archs:
        with torch.device("meta"):  # counts parameters without allocating them
            vit = build_backbone(arch, img_size=224, patch_size=14)
        n = sum(p.numel() for p in vit.parameters())
        block = sum(p.numel() for p in vit.blocks[0].parameters())
        out[arch] = {"params_M": round(n / 1e6, 1),
                     **{f"world_{w}_GiB": round((16 * n / w + 4 * block * (w > 1)) / 2**30, 2) for w in worlds}}
    return out


def _summary(rows: list[dict]) -> dict:
    """Per-image slopes per preset (and the saved activations that implies at the preset's own
    batch, a linear extrapolation), and what checkpointing saves / costs at each batch."""
    out: dict = {"per_image_mib": {}, "grad_checkpointing": {}}
    plain = [r for r in rows if not r["grad_checkpointing"]]
    for preset in dict.fromkeys(r["preset"] for r in plain):
        pts = sorted((r["batch"], r) for r in plain if r["preset"] == preset)
        (b0, r0), (b1, r1) = pts[0], pts[-1]
        if b1 > b0:
            saved = (r1["saved_for_backward_mib"] - r0["saved_for_backward_mib"]) / (b1 - b0)
            out["per_image_mib"][preset] = {
                "step_peak": round((r1["step_peak_above_build_mib"] - r0["step_peak_above_build_mib"]) / (b1 - b0), 1),
                "saved_for_backward": round(saved, 1),
                "saved_for_backward_at_preset_batch_gib_extrapolated": round(
                    (r0["saved_for_backward_mib"] + saved * (r1["preset_batch"] - b0)) / 1024, 2),
                "preset_batch": r1["preset_batch"],
            }
    for r in rows:
        if r["grad_checkpointing"]:
            off = next((o for o in plain if (o["preset"], o["batch"]) == (r["preset"], r["batch"])), None)
            if off:
                out["grad_checkpointing"][f"{r['preset']}@{r['batch']}"] = {
                    "step_peak_saves_mib": round(off["step_peak_above_build_mib"] - r["step_peak_above_build_mib"], 1),
                    "saved_for_backward_ratio_on_over_off": round(
                        r["saved_for_backward_mib"] / max(off["saved_for_backward_mib"], 1e-9), 3),
                    "first_step_time_ratio_on_over_off": round(r["first_step_s"] / off["first_step_s"], 2),
                }
    return out


def run(quick: bool, threads: int | None = None, cases: list[tuple[str, int, bool]] | None = None) -> dict:
    """Every case in its own subprocess; JSON-able."""
    rows = [measure_in_subprocess(p, b, c, threads) for p, b, c in (cases or (QUICK_CASES if quick else CASES))]
    return {
        "machine": describe(default_device()),
        "quick": quick,
        "method": ("CPU: peak resident set (VmHWM, else ru_maxrss) after the step minus the resident set after "
                   "build_run, high-water mark reset first, fresh process per case; CUDA: max_memory_allocated "
                   "minus memory_allocated"),
        "runs": rows,
        **_summary(rows),
        "fsdp_weights_grads_adamw_per_process": fsdp_table(),
    }


def _case(text: str) -> tuple[str, int, bool]:
    preset, batch, ckpt = text.split(":")
    return preset, int(batch), ckpt in ("1", "true")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="demo and vit-s at batch 2 only")
    ap.add_argument("--case", action="append", type=_case, help="preset:batch:grad_checkpointing (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--child", type=_case, help=argparse.SUPPRESS)  # one case, in this process
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, threads=args.threads)))
        return
    print(json.dumps(run(args.quick, args.threads, args.case), indent=2))


if __name__ == "__main__":
    main()
