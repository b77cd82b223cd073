"""Speed and memory of `loss.sigreg` (forward + backward) against the plain formula and the projection.

    python -m benchmarks.bench_sigreg              # (N, K, M, T) = (512, 512, 1024, 17), (4096, ...)
    python -m benchmarks.bench_sigreg --quick      # small sizes, few repeats
    python -m benchmarks.bench_sigreg --threads 1  # CPU threads for torch (default: torch's)

Prints one JSON object: the machine, and per size the median fwd+bwd wall milliseconds of the plain
reference (`loss.sigreg_reference`: one complex exponential per sample, direction and knot, through
autograd), of ours, and of the projection matmul alone (z @ A, fwd+bwd: the floor any SIGReg pays);
the extra memory at the peak of each (above the inputs; torch.cuda.max_memory_allocated on CUDA,
the profiler's allocation trace on the CPU); the relative error of ours against the reference
(value, and max |grad difference| / max |grad|); and the ratios. Also the process CPU
milliseconds: with --threads 1 they are what a machine busy with other jobs does not inflate.
On a CPU, "threads_side_by_side" times ours at 1 and at 2 threads in alternating rounds of one
run, with the load average: what the thread count costs on this machine as busy as it is now.
Runs on CUDA when available. A few minutes on 2 CPU cores, most of it the reference at N = 4096.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import torch

from benchmarks.machine import default_device, describe
from lejepa_cli.sigreg import random_directions, sigreg, sigreg_reference

SIZES = [(512, 512, 1024, 17), (4096, 512, 1024, 17)]  # (N, K, M, T)
QUICK_SIZES = [(256, 128, 256, 17), (1024, 128, 256, 17)]


def _median_ms(
    fns: dict[str, tuple[Callable[[], object], int]], device: torch.device
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) milliseconds per call of each fn over its repeats, after a warm-up.

    The calls go in rounds (each fn once per round while it has repeats left), so a machine
    shared with other jobs slows all of them alike. With one thread, the process CPU time is
    the cost a busy machine's waiting does not inflate.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for rnd in range(max(reps for _, reps in fns.values()) + 1):
        for name, (fn, reps) in fns.items():
            if rnd > reps:
                continue
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            if rnd:  # round 0 is the warm-up
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        name: (1e3 * statistics.median(w for w, _ in ts), 1e3 * statistics.median(c for _, c in ts))
        for name, ts in times.items()
    }


def _peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated at the peak of fn() beyond what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    # CPU: replay the profiler's allocation and free events in time order and keep the running max.
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        z.grad = None
        loss = loss_fn(z)
        loss.backward()
        return loss.detach()

    return step


def _measure(n: int, k: int, m: int, t: int, device: torch.device, quick: bool) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, k, generator=gen, device=device).requires_grad_()  # (N, K)
    a = random_directions(k, m, step=0, device=device)  # (K, M)
    ref = _fwd_bwd(lambda x: sigreg_reference(x, step=0, directions=a, num_knots=t), z)
    ours = _fwd_bwd(lambda x: sigreg(x, step=0, directions=a, num_knots=t), z)
    floor = _fwd_bwd(lambda x: (x @ a).sum(), z)

    ref_value = ref()
    ref_grad = z.grad.clone()
    value = ours()
    grad = z.grad.clone()
    # The reference is slow on a CPU (seconds at N = 4096): fewer repeats for it.
    slow_reps, fast_reps = (2, 5) if quick else ((3, 10) if device.type == "cpu" else (10, 30))
    ms = _median_ms({"ref": (ref, slow_reps), "ours": (ours, fast_reps), "floor": (floor, fast_reps)}, device)
    (ref_ms, ref_cpu), (ours_ms, ours_cpu), (floor_ms, floor_cpu) = ms["ref"], ms["ours"], ms["floor"]
    ref_peak, ours_peak, floor_peak = (_peak_bytes(fn, device) for fn in (ref, ours, floor))
    mib = 1 / 2**20
    return {
        "N": n, "K": k, "M": m, "T": t,
        "reference_ms": round(ref_ms, 2),
        "ours_ms": round(ours_ms, 2),
        "matmul_floor_ms": round(floor_ms, 2),
        "speedup_vs_reference": round(ref_ms / ours_ms, 2),
        "ours_over_floor": round(ours_ms / floor_ms, 2),
        "process_cpu_ms": {"reference": round(ref_cpu, 1), "ours": round(ours_cpu, 1),
                           "matmul_floor": round(floor_cpu, 1)},
        "reference_peak_mib": round(ref_peak * mib, 1),
        "ours_peak_mib": round(ours_peak * mib, 1),
        "matmul_floor_peak_mib": round(floor_peak * mib, 1),
        "memory_ratio_reference_over_ours": round(ref_peak / max(ours_peak, 1), 2),
        "value_rel_err": float((value - ref_value).abs() / ref_value.abs()),
        "grad_max_rel_err": float((grad - ref_grad).abs().max() / ref_grad.abs().max()),
    }


THREAD_CASES = (1, 2)  # CPU thread counts timed side by side: what a busy machine costs each


def _threads_side_by_side(n: int, k: int, m: int, t: int, reps: int) -> dict:
    """Median wall and process-CPU ms of ours (fwd+bwd) at each of THREAD_CASES, in alternating rounds.

    Alternating rounds share the machine's load alike; on an idle machine 2 threads win, on one
    whose runnable jobs outnumber its cores each kernel's end waits for a parked thread.
    """
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, k, generator=gen).requires_grad_()  # (N, K)
    a = random_directions(k, m, step=0)  # (K, M)
    ours = _fwd_bwd(lambda x: sigreg(x, step=0, directions=a, num_knots=t), z)
    before = torch.get_num_threads()
    times: dict[int, list[tuple[float, float]]] = {th: [] for th in THREAD_CASES}
    try:
        for rnd in range(reps + 1):
            for th in THREAD_CASES:
                torch.set_num_threads(th)
                wall, cpu = time.perf_counter(), time.process_time()
                ours()
                if rnd:  # round 0 is the warm-up
                    times[th].append((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        torch.set_num_threads(before)
    return {
        f"{th}_thread{'s' if th > 1 else ''}": {
            "ours_ms": round(1e3 * statistics.median(w for w, _ in ts), 2),
            "process_cpu_ms": round(1e3 * statistics.median(c for _, c in ts), 1),
        }
        for th, ts in times.items()
    } | {"N": n, "K": k, "M": m, "T": t, "load_average_1min": round(os.getloadavg()[0], 2)}


def run(quick: bool, threads: int | None = None) -> dict:
    """Benchmark every size on the GPU when there is one, else the CPU; returns the JSON-able result."""
    if threads:
        torch.set_num_threads(threads)
    device = default_device()
    return {
        "machine": {
            **describe(device),
            # The peak-memory probe must read exactly 4 MiB for one fresh 4 MiB tensor.
            "memory_probe_mib": _peak_bytes(lambda: torch.ones(1 << 20, device=device), device) / 2**20,
        },
        "quick": quick,
        "sizes": [_measure(*size, device, quick) for size in (QUICK_SIZES if quick else SIZES)],
        # CPU only: the same sizes at 1 and 2 threads in one run (the thread count above is the suite's)
        "threads_side_by_side": [] if device.type != "cpu" else [
            _threads_side_by_side(*size, reps=3 if quick else 10) for size in (QUICK_SIZES if quick else SIZES)
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.threads), indent=2))


if __name__ == "__main__":
    main()
