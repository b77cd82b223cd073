"""How many CPU threads torch uses when the user has not said: one on a busy machine.

A multi-threaded CPU kernel waits at its end for every thread; on a machine whose runnable jobs
outnumber its cores the scheduler parks some of them, and each small kernel then waits for a
parked thread. Measured on a busy 2-core machine: training ran 4-5x slower with torch's default
threads than with one thread per run. So, unless the user pinned a count (OMP_NUM_THREADS, or
LEJEPA_THREADS), a machine whose 1-minute load average is at or above its usable cores gets one
thread. The choice is made before torch is imported (OMP_NUM_THREADS is read at import), and
it is recorded so runs can say what they used.

    OMP_NUM_THREADS=2 lejepa train ...     # pin the count (also LEJEPA_THREADS=2)
"""

from __future__ import annotations

import os

_PINNING_VARS = ("LEJEPA_THREADS", "OMP_NUM_THREADS")
_choice = "torch's default (not chosen by lejepa)"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose(environ: dict[str, str] | None = None, load: float | None = None, cores: int | None = None) -> tuple[int | None, str]:
    """(threads, why): the user's pinned count, 1 on a busy machine, or None (torch's default)."""
    env = os.environ if environ is None else environ
    for var in _PINNING_VARS:
        raw = env.get(var, "").strip()
        if raw:
            if raw.isdigit() and int(raw) >= 1:
                return int(raw), f"pinned by {var}={raw}"
            return None, f"{var}={raw!r} is not a positive integer: torch's default"
    cores = usable_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # not available on this platform
            return None, "torch's default (load average unavailable)"
    if cores > 1 and load >= cores:
        return 1, f"1 thread: 1-minute load {load:.1f} on {cores} cores (pin with OMP_NUM_THREADS=N)"
    return None, f"torch's default: load {load:.1f} on {cores} cores (pin with OMP_NUM_THREADS=N)"


def apply_default() -> str:
    """Set OMP_NUM_THREADS (and torch's count, if torch is already imported) per `choose`; returns why."""
    global _choice
    threads, why = choose()
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import sys

        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(threads)
    _choice = why
    return why


def choice() -> str:
    """Why this process runs the thread count it does (see `apply_default`)."""
    return _choice
