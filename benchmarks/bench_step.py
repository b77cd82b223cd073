"""Where one LeJEPA training step spends its time, and how close the encoder runs to the machine's matmul speed.

    python -m benchmarks.bench_step                    # demo (batch 32), vit-t-32 (8), vit-s (4) on a CPU
    python -m benchmarks.bench_step --quick            # smaller batches, fewer steps
    python -m benchmarks.bench_step --case vit-s --batch 8 --steps 4 --threads 2

Each case builds the run exactly as training does (`train.build_run` on `config.load_config(preset,
overrides)`, with the built-in dataset at the preset's image size held in memory, fed through
`BatchLoader`) and times, per step: data wait (blocked on the loader), views (`make_views`),
encoder forward and backward (`ViewEncoder`), projector + loss forward and backward
(`ViewProjector` + `lejepa_loss`; the backward is split off at the embedding h), the online probe
and the optimizer step. Steps alternate with whole `image_objective.lejepa_step` calls, so the split can be
checked against the real step measured side by side (`split_over_lejepa_step` near 1).

Utilisation: the encoder's FLOPs for one forward + backward are counted with FlopCounterMode;
divided by the encoder's measured time they give its achieved FLOP/s, reported against a square
matmul in the same dtype (bf16 under CUDA autocast, fp32 on the CPU) timed in the same rounds. What
limits it comes from a profile of one encoder forward + backward (share of time in matmul-like
kernels, top other kernels) and from a matmul of the encoder's own widest shape.

Also: one AdamW step over the run's parameters with the foreach and the fused kernel, alternating.
Prints one JSON object; also lists where the accelerator paths sit in the code (grep-level facts).
Runs on CUDA when available (bf16 autocast and fused AdamW then come from `build_run`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.machine import default_device, describe, sync
from lejepa_cli.image import objective as image_objective
from lejepa_cli import train as train_mod
from lejepa_cli.config import load_config
from lejepa_cli.data.loader import BatchLoader, StepSampler
from lejepa_cli.image.objective import lejepa_loss
from lejepa_cli.image.views import make_views

# name: (preset, image side of the built-in data, CPU batch, quick batch, CUDA batch, timed steps).
# CPU batches fit a 2-core machine shared with other jobs; CUDA ones are closer to the presets'.
CASES: dict[str, tuple[str, int, int, int, int, int]] = {
    "demo": ("demo", 32, 32, 8, 256, 3),
    "vit-t-32": ("vit-t-32", 32, 8, 4, 256, 3),
    "vit-s": ("vit-s", 224, 4, 2, 64, 2),
}
PHASES = ("data_wait", "views", "encoder_forward", "projector_loss", "encoder_backward", "online_probe", "optimizer")
_MATMUL_OPS = re.compile(r"mm|conv|scaled_dot_product|linear|matmul|baddbmm")

# FlopCounterMode knows the CUDA attention kernels; the CPU's flash attention needs the same formulas.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
    ),
}


class _Clock:
    """Marks named intervals, wall and process CPU; syncs the device first so each holds its own work.

    Process CPU time is what a machine busy with other jobs does not inflate by descheduling us
    (it sums all threads, the loader's prefetch thread included).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        sync(device)
        self._last, self._last_cpu = time.perf_counter(), time.process_time()

    def mark(self, name: str) -> None:
        sync(self.device)
        now, cpu = time.perf_counter(), time.process_time()
        self.times[name] = self.times.get(name, 0.0) + now - self._last
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu - self._last_cpu
        self._last, self._last_cpu = now, cpu


def build_case(preset: str, side: int, batch: int, device: torch.device,
               overrides: tuple[str, ...] = ()) -> image_objective.ImageRun:
    """`build_run` for `preset` on built-in data of `side` px, `batch` images per step, on one process."""
    cfg = load_config(preset, [
        f"train.batch_size={batch}", f"data.builtin_train={4 * batch}", "data.builtin_val=10",
        f"data.builtin_size={side}", f"train.device={device}", "data.source=builtin", *overrides,
    ])
    return train_mod.build_run(cfg, device)


def _autocast(run):
    return torch.autocast(run.device.type, dtype=run.amp) if run.amp else nullcontext()


def _split_step(run, batch, step: int, clock: _Clock) -> None:
    """One training step, in `lejepa_step`'s order, with the backward split at the embedding h."""
    cfg = run.cfg
    seed = train_mod.step_seed(cfg.train.seed, step, 0, 0)
    gen = torch.Generator(run.device).manual_seed(seed)
    torch.manual_seed(seed)
    g, loc = make_views(batch.inputs, cfg.views, mean=run.train_data.mean, std=run.train_data.std, generator=gen)
    clock.mark("views")
    with _autocast(run):
        h = run.encoder(g, loc)  # (V, N, D)
    clock.mark("encoder_forward")
    h_in = h.detach().requires_grad_(True)
    with _autocast(run):
        z = run.projector(h_in)  # (V, N, K)
    parts = lejepa_loss(z, num_global=cfg.views.global_views, lamb=cfg.loss.lamb, step=step,
                        num_slices=cfg.loss.num_slices, t_max=cfg.loss.t_max, num_knots=cfg.loss.num_knots)
    parts["loss"].backward()
    clock.mark("projector_loss")
    h.backward(h_in.grad)
    clock.mark("encoder_backward")
    if run.probe is not None and batch.targets is not None:
        vg = cfg.views.global_views
        logits = run.probe(h[:vg].detach().float().flatten(0, 1))
        F.cross_entropy(logits, batch.targets.repeat(vg)).backward()
        run.probe_optimizer.step()
        run.probe_optimizer.zero_grad(set_to_none=True)
    clock.mark("online_probe")
    _optimizer_step(run, step)
    clock.mark("optimizer")


def _optimizer_step(run, step: int) -> None:
    for group in run.optimizer.param_groups:
        group["lr"] = train_mod.lr_at(step, run.cfg)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def _whole_step(run, batch, step: int) -> None:
    """The trainer's own `lejepa_step` plus the optimizer steps, as the loop runs them."""
    seed = train_mod.step_seed(run.cfg.train.seed, step, 0, 0)
    image_objective.lejepa_step(run, [batch.inputs], [batch.targets], step, [seed])
    _optimizer_step(run, step)
    if run.probe_optimizer is not None:
        run.probe_optimizer.step()
        run.probe_optimizer.zero_grad(set_to_none=True)


def host_syncs(run, batch, step: int) -> int | None:
    """Host-device synchronisations CUDA reports during one whole step (None off CUDA)."""
    if run.device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            _whole_step(run, batch, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _matmul_s(a: torch.Tensor, b: torch.Tensor, reps: int = 3) -> list[float]:
    """Seconds of each of `reps` calls of a @ b."""
    out = []
    for _ in range(reps):
        sync(a.device)
        t0 = time.perf_counter()
        a @ b
        sync(a.device)
        out.append(time.perf_counter() - t0)
    return out


def optimizer_variants(run, rounds: int = 3) -> dict:
    """Milliseconds of one AdamW step over the run's parameters: foreach vs fused, alternating.

    The trainer asks for fused only on CUDA; this says what fused would give on this device.
    """
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    grads = [torch.randn_like(p) for p in params]
    variants = {"foreach": {"foreach": True}, "fused": {"fused": True}}
    opts, times = {}, {}
    for name, kw in variants.items():
        try:
            opts[name] = torch.optim.AdamW(params, lr=1e-4, **kw)
        except (RuntimeError, ValueError) as e:  # fused not built for this device
            times[name] = f"unavailable: {e}"
    for p, g in zip(params, grads):
        p.grad = g
    samples: dict[str, list[float]] = defaultdict(list)
    for rnd in range(rounds + 1):
        for name, opt in opts.items():
            sync(run.device)
            t0 = time.perf_counter()
            opt.step()
            sync(run.device)
            if rnd:  # round 0 allocates the moments
                samples[name].append(time.perf_counter() - t0)
    for p in params:
        p.grad = None
    times.update({name: round(1e3 * statistics.median(v), 2) for name, v in samples.items()})
    if all(isinstance(times.get(k), float) for k in variants):
        times["fused_over_foreach"] = round(times["fused"] / times["foreach"], 2)
    times["trainer_uses"] = "fused" if run.optimizer.defaults.get("fused") else "foreach (torch default)"
    return times


def _views(run, batch):
    gen = torch.Generator(run.device).manual_seed(0)
    return make_views(batch.inputs, run.cfg.views, mean=run.train_data.mean, std=run.train_data.std, generator=gen)


def encoder_flops(run, batch) -> tuple[int, dict[str, int]]:
    """FLOPs of one encoder forward + backward on this batch's views: total, and per aten op."""
    g, loc = _views(run, batch)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)
    with counter:
        with _autocast(run):
            h = run.encoder(g, loc)
        h.float().sum().backward()
    run.optimizer.zero_grad(set_to_none=True)
    per_op = {str(op).replace("aten.", "aten::"): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), per_op


def head_flops(run, batch) -> int:
    """FLOPs of one projector + loss forward + backward on this batch's embeddings."""
    cfg = run.cfg
    with torch.no_grad(), _autocast(run):
        h = run.encoder(*_views(run, batch))
    h = h.detach().requires_grad_(True)
    counter = FlopCounterMode(display=False)
    with counter:
        with _autocast(run):
            z = run.projector(h)
        lejepa_loss(z, num_global=cfg.views.global_views, lamb=cfg.loss.lamb, step=0, num_slices=cfg.loss.num_slices,
                    t_max=cfg.loss.t_max, num_knots=cfg.loss.num_knots)["loss"].backward()
    run.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _kernels_of(op: str, kernel: str) -> bool:
    """Whether profiled `kernel` does the work FlopCounterMode counts under `op` (convolution
    dispatches to a backend kernel, e.g. aten::mkldnn_convolution, that holds the time)."""
    if op == "aten::convolution":
        return "conv" in kernel and "backward" not in kernel
    return kernel == op


def encoder_profile(run, batch, flops_per_op: dict[str, int], top: int = 5) -> dict:
    """Where one encoder forward + backward spends its kernel time: the matmul-like share, the
    top other kernels, and each FLOP-counted kernel's share and achieved GFLOP/s (its counted
    FLOPs over its profiled self time; the profiler adds a little overhead of its own)."""
    from torch.profiler import ProfilerActivity, profile

    g, loc = _views(run, batch)
    cuda = run.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with _autocast(run):
            h = run.encoder(g, loc)
        h.float().sum().backward()
        sync(run.device)
    run.optimizer.zero_grad(set_to_none=True)
    self_us = defaultdict(float)
    for e in prof.key_averages():
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t > 0 and e.key.startswith("aten::"):  # kernels; autograd/profiler wrappers are overhead
            self_us[e.key] += t
    total = sum(self_us.values()) or 1.0
    matmul = sum(t for k, t in self_us.items() if _MATMUL_OPS.search(k))
    others = sorted(((k, t) for k, t in self_us.items() if not _MATMUL_OPS.search(k)), key=lambda kv: -kv[1])
    counted = {}
    for op, n in flops_per_op.items():
        t = sum(us for k, us in self_us.items() if _kernels_of(op, k))
        if t > 0:
            counted[op] = {"time_share": round(t / total, 3), "gflop_per_s": round(n / (t * 1e3), 1)}
    counted = dict(sorted(counted.items(), key=lambda kv: -kv[1]["time_share"]))
    return {
        "matmul_like_share": round(matmul / total, 3),
        "top_other_kernels": {k: round(t / total, 3) for k, t in others[:top]},
        "flop_counted_kernels": counted,
    }


def measure_case(preset: str, side: int, batch: int, *, steps: int, warmup: int = 1,
                 overrides: tuple[str, ...] = (), profile_encoder: bool = True) -> dict:
    """Step breakdown, encoder FLOP/s and utilisation for one preset; JSON-able."""
    device = default_device()
    run = build_case(preset, side, batch, device, overrides)
    cfg = run.cfg
    sampler = StepSampler(len(run.train_data), cfg.train.batch_size, cfg.train.seed)
    loader = BatchLoader(run.train_data, sampler, device)
    # The peak: a square matmul in the encoder's dtype, big enough to saturate the device.
    dtype = run.amp or torch.float32
    n = 8192 if device.type == "cuda" else 1024
    sq = [torch.randn(n, n, device=device, dtype=dtype) for _ in range(2)]
    # The encoder's own widest matmul (ViT MLP fc1 over the global views' tokens), same dtype.
    vit = getattr(run.backbone, "patch_size", None)
    shape = None
    if vit:
        tokens = cfg.views.global_views * batch * ((cfg.views.global_size // vit) ** 2 + 1)
        d = run.backbone.embed_dim
        shape = (tokens, d, 4 * d)
        mm = [torch.randn(tokens, d, device=device, dtype=dtype), torch.randn(d, 4 * d, device=device, dtype=dtype)]

    split: dict[str, list[float]] = defaultdict(list)
    split_cpu: dict[str, list[float]] = defaultdict(list)
    whole, square_s, shape_s = [], [], []
    it = loader.iterate(0, 2 * (warmup + steps))
    try:
        for rnd in range(warmup + steps):
            # Round: one split step, one whole lejepa_step, one square matmul, one model-shape matmul.
            clock = _Clock(device)
            step, _, b = next(it)
            clock.mark("data_wait")
            _split_step(run, b, step, clock)
            t0 = time.perf_counter()
            step, _, b = next(it)
            wait = time.perf_counter() - t0
            sync(device)
            t0 = time.perf_counter()
            _whole_step(run, b, step)
            sync(device)
            whole_s = time.perf_counter() - t0
            sq_s = _matmul_s(*sq, reps=5)
            sh_s = _matmul_s(*mm, reps=5) if shape else []
            if rnd >= warmup:
                for k, v in clock.times.items():
                    split[k].append(v)
                    split_cpu[k].append(clock.cpu[k])
                split["data_wait"][-1] = 0.5 * (split["data_wait"][-1] + wait)  # both steps' waits
                whole.append(whole_s)
                square_s += sq_s
                shape_s += sh_s
        flops, flops_per_op = encoder_flops(run, b)
        head = head_flops(run, b)
        prof = encoder_profile(run, b, flops_per_op) if profile_encoder else None
        syncs = host_syncs(run, b, step + 1)
        adamw = optimizer_variants(run)
    finally:
        loader.close()

    ms = {k: 1e3 * statistics.median(split[k]) if split.get(k) else 0.0 for k in PHASES}
    cpu_ms = {k: 1e3 * statistics.median(split_cpu[k]) if split_cpu.get(k) else 0.0 for k in PHASES}
    step_ms = sum(ms.values())
    enc_ms = ms["encoder_forward"] + ms["encoder_backward"]
    enc_cpu_share = (cpu_ms["encoder_forward"] + cpu_ms["encoder_backward"]) / max(sum(cpu_ms.values()), 1e-9)
    # Median: the rate under the same sharing of the machine as the encoder's steps (side by side).
    # Best: what the device does when the job has it; on a busy machine the two differ.
    peak, best = 2 * n**3 / statistics.median(square_s), 2 * n**3 / min(square_s)
    achieved = flops / (enc_ms / 1e3)
    out = {
        "preset": preset,
        "arch": cfg.model.arch,
        "batch": batch,
        "views": f"{cfg.views.global_views} x {cfg.views.global_size}px + {cfg.views.local_views} x {cfg.views.local_size}px",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "steps_timed": steps,
        "phase_ms": {k: round(v, 2) for k, v in ms.items()},
        "phase_fraction": {k: round(v / step_ms, 3) for k, v in ms.items()},
        "phase_process_cpu_ms": {k: round(v, 2) for k, v in cpu_ms.items()},
        "step_ms": round(step_ms, 1),
        "lejepa_step_ms": round(1e3 * statistics.median(whole), 1),  # views .. optimizer, no data wait
        "split_over_lejepa_step": round((step_ms - ms["data_wait"]) / (1e3 * statistics.median(whole)), 2),
        "images_per_s": round(batch / (step_ms / 1e3), 1),
        "non_encoder_fraction": round(1 - enc_ms / step_ms, 3),
        "target_non_encoder_under_10pct": (1 - enc_ms / step_ms) < 0.10,
        "non_encoder_fraction_process_cpu": round(1 - enc_cpu_share, 3),
        "encoder_gflop_fwd_bwd": round(flops / 1e9, 2),
        "projector_loss_gflop_fwd_bwd": round(head / 1e9, 2),
        "encoder_gflop_per_s": round(achieved / 1e9, 1),
        "square_matmul": {"n": n, "gflop_per_s": round(peak / 1e9, 1), "best_gflop_per_s": round(best / 1e9, 1)},
        "mfu_vs_square_matmul": round(achieved / peak, 3),
        "mfu_vs_best_square_matmul": round(achieved / best, 3),
    }
    if shape:
        shape_best = 2 * shape[0] * shape[1] * shape[2] / min(shape_s)
        out["encoder_shape_matmul"] = {"m_k_n": list(shape), "best_gflop_per_s": round(shape_best / 1e9, 1),
                                       "best_over_best_square": round(shape_best / best, 3)}
        # On a busy machine the square matmul's bigger working set can suffer more than the
        # encoder's own shape; against the best rate seen, the utilisation is not flattered.
        out["mfu_vs_best_matmul_seen"] = round(achieved / max(best, shape_best), 3)
    if prof is not None:
        out["encoder_profile"] = prof
    out["adamw_step_ms"] = adamw
    out["host_syncs_in_step_cuda"] = syncs  # torch.cuda.set_sync_debug_mode; None off CUDA
    out["limits"] = _limits(out)
    return out


def _limits(r: dict) -> list[str]:
    """What holds the encoder below the square-matmul rate and the step above the encoder, from the figures."""
    notes = []
    prof = r.get("encoder_profile")
    if prof:
        share = prof["matmul_like_share"]
        top = ", ".join(f"{k.removeprefix('aten::')} {100 * v:.0f}%" for k, v in list(prof["top_other_kernels"].items())[:3])
        notes.append(f"{100 * (1 - share):.0f}% of the encoder's kernel time is outside matmuls/convs/attention "
                     f"(memory-bound element-wise work; top: {top}), per the profiler")
    shape = r.get("encoder_shape_matmul")
    if shape:
        m, k, n = shape["m_k_n"]
        ratio = shape["best_over_best_square"]
        verdict = ("too small for this device's kernels" if ratio < 0.7 else
                   "enough (faster than the square matmul here, whose larger working set suffers more from "
                   "other jobs sharing the cache: see mfu_vs_best_matmul_seen)" if ratio > 1.2 else "enough")
        notes.append(f"the encoder's widest matmul ({m}x{k} @ {k}x{n}) runs at {100 * ratio:.0f}% of the square "
                     f"matmul's best rate: width {k} is {verdict}")
    if prof and prof.get("flop_counted_kernels"):
        big = {k: v for k, v in prof["flop_counted_kernels"].items() if v["time_share"] >= 0.02} or prof["flop_counted_kernels"]
        slowest = min(big.items(), key=lambda kv: kv[1]["gflop_per_s"])
        busiest = max(prof["flop_counted_kernels"].items(), key=lambda kv: kv[1]["time_share"])
        notes.append(f"per kernel: {busiest[0].removeprefix('aten::')} takes the most time "
                     f"({100 * busiest[1]['time_share']:.0f}%, {busiest[1]['gflop_per_s']} GFLOP/s); the slowest is "
                     f"{slowest[0].removeprefix('aten::')} ({slowest[1]['gflop_per_s']} GFLOP/s, "
                     f"{100 * slowest[1]['time_share']:.0f}% of the time)")
    if r["device"] == "cpu":
        notes.append("CPU: fp32 (bf16 autocast is on for CUDA only unless train.precision=bf16); the matmul rate "
                     "is that of the usable cores, shared with other jobs (see machine.load_average_1_5_15min)")
    if not r["target_non_encoder_under_10pct"]:
        biggest = max((k for k in r["phase_fraction"] if not k.startswith("encoder")), key=r["phase_fraction"].get)
        notes.append(f"non-encoder work is {100 * r['non_encoder_fraction']:.0f}% of the step, most of it {biggest} "
                     f"({100 * r['phase_fraction'][biggest]:.0f}%)")
        if biggest == "projector_loss":
            notes.append(f"the projector + loss do {r['projector_loss_gflop_fwd_bwd']} GFLOP per step against the "
                         f"encoder's {r['encoder_gflop_fwd_bwd']}: the recipe's 2048-wide projector is large beside "
                         f"a small encoder, so this share is the method's, not overhead")
    adamw = r.get("adamw_step_ms", {})
    ratio = adamw.get("fused_over_foreach")
    if isinstance(ratio, float) and ratio < 0.8 and not adamw["trainer_uses"].startswith("fused"):
        notes.append(f"AdamW: the fused kernel takes {100 * ratio:.0f}% of the foreach step's time on this device, "
                     f"but the trainer asks for fused on CUDA only")
    return notes


# ---- accelerator paths: where they are in the code ----------------------------------------------

_PATHS = {  # name: (file under lejepa_cli/, regex that marks it)
    "bf16_autocast_on_cuda": ("optim.py", r'precision == "auto" and device.type == "cuda"'),
    "fused_adamw_on_cuda": ("optim.py", r"fused=device.type == \"cuda\""),
    "scaled_dot_product_attention": ("models/vit.py", r"F\.scaled_dot_product_attention\("),
    "channels_last_cnn": ("image/objective.py", r'channels_last = cfg.model.arch.startswith\("resnet"\)$'),
    "channels_last_input": ("image/model.py", r"memory_format=torch.channels_last"),
    "torch_compile_option": ("image/objective.py", r"torch\.compile\(encoder\)"),
    "values_read_every_log_every": ("train.py", r"done % cfg.log.every == 0"),
    "non_finite_check_without_sync": ("train.py", r"first_bad = torch.where\("),
    "views_gate_without_sync_on_accelerators": ("image/views.py", r"avoids the host-device sync"),
    "constants_copied_once": ("image/views.py", r"lru_cache"),
    "grad_checkpointing_option": ("models/vit.py", r"checkpoint\(blk, x, use_reentrant=False\)"),
    "pinned_non_blocking_h2d": ("data/loader.py", r"x.to\(self.device, non_blocking=True\)"),
    "stop_signal_vote_on_host_gloo": ("dist.py", r"Goes through gloo on host memory"),
}
_SYNC_CALLS = re.compile(r"\.item\(\)|\.cpu\(\)|\.tolist\(\)|\.numpy\(\)|(?<![.\w])(float|int|bool)\((?!cfg|len)|print\(")


def accelerator_paths() -> dict:
    """file:line of each accelerator path (None when missing), and host-sync calls inside lejepa_step."""
    root = Path(train_mod.__file__).parent
    out: dict = {}
    for name, (rel, pattern) in _PATHS.items():
        hit = None
        for i, line in enumerate((root / rel).read_text().splitlines(), 1):
            if re.search(pattern, line):
                hit = {"where": f"lejepa_cli/{rel}:{i}", "line": line.strip()}
                break
        out[name] = hit
    src, first = inspect.getsourcelines(image_objective.lejepa_step)
    body = [(first + i, s.strip()) for i, s in enumerate(src) if not s.strip().startswith(("#", '"""'))]
    out["host_sync_calls_in_lejepa_step"] = [f"lejepa_cli/image/objective.py:{i}: {s}" for i, s in body if _SYNC_CALLS.search(s)]
    out["note"] = ("grep-level facts; the loop's only per-step host read is `not bool(finite)` under "
                   "train.on_nonfinite=skip (default stop reads values every log.every steps)")
    return out


def run(quick: bool, threads: int | None = None, cases: list[str] | None = None,
        batch: int | None = None, steps: int | None = None) -> dict:
    """Every case (default all of CASES) on the GPU when there is one, else the CPU; JSON-able."""
    if threads:
        torch.set_num_threads(threads)
    results = {}
    for name in cases or list(CASES):
        preset, side, cpu_batch, quick_batch, cuda_batch, full_steps = CASES[name]
        default = quick_batch if quick else (cuda_batch if default_device().type == "cuda" else cpu_batch)
        results[name] = measure_case(preset, side, batch or default, steps=steps or (1 if quick else full_steps),
                                     profile_encoder=not quick or name == "demo")
    return {"machine": describe(default_device()), "quick": quick, "cases": results,
            "accelerator_paths": accelerator_paths()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, one timed step")
    parser.add_argument("--case", action="append", choices=list(CASES), help="case to run (repeatable; default all)")
    parser.add_argument("--batch", type=int, default=None, help="images per step for every case")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.threads, args.case, args.batch, args.steps), indent=2))


if __name__ == "__main__":
    main()
