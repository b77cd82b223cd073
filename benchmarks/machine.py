"""What a benchmark ran on: one dict every benchmark puts under "machine" in its JSON.

    python -m benchmarks.machine        # prints it

Timings mean little without the hardware beside them (cifar10-airbench names its GPU next to
every figure), and on a machine shared with other jobs the load average says how much to trust
them: a 1-minute load above the core count means the timed code waited for a core.
"""

from __future__ import annotations

import json
import os
import platform

import torch

# CPU features that decide how fast matmuls run (vector width, fused multiply-add, bf16 units).
_MATMUL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def default_device() -> torch.device:
    """The device the suite runs on: the CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer read after it measures the work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = value.split()
                if model and flags:
                    break
    except OSError:  # not Linux
        pass
    return model or platform.processor() or platform.machine(), flags


def describe(device: torch.device | None = None) -> dict:
    """CPU model and matmul-relevant flags, torch build, threads, device, load average."""
    device = device or default_device()
    model, flags = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        usable = os.cpu_count() or 1
    load = os.getloadavg()
    info = {
        "cpu": model,
        "cpu_flags": [f for f in _MATMUL_FLAGS if f in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to
        "cpus_usable": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        # Other jobs on a shared machine slow everything down: read the timings against this.
        "load_average_1_5_15min": [round(x, 2) for x in load],
        "overloaded": load[0] > usable,
    }
    if device.type != "cuda":
        info["note"] = "no CUDA GPU available in this run: every figure is from the CPU"
    return info


if __name__ == "__main__":
    print(json.dumps(describe(), indent=2))
