"""The whole benchmark suite in one run: SIGReg, views, training step, ResNet stem, memory, data path, world
model, its camera-robustness step, planning, shard checksums; one JSON document.

    python -m benchmarks                          # default sizes (a few minutes on an idle 2-core CPU)
    python -m benchmarks --quick                  # small sizes, about a minute
    python -m benchmarks --out bench.json         # also write the JSON to a file
    python -m benchmarks --only step --only memory
    lejepa bench [--quick] [--out FILE]           # the same, from the CLI (source checkout)

Each module's `run(quick, threads=...)` is called in turn; a module that fails is reported under its name as
{"error": ...} and the others still run (the exit code is then 1). Every module names the
machine it ran on; the suite adds the wall and process-CPU seconds of each module and the load
average before and after, since on a shared machine waiting for a core inflates wall time.
Without --threads, an oversubscribed CPU (load average above its cores) runs at one thread, and
the JSON says so under "threads_choice".
Progress goes to stderr, the JSON to stdout. Runs on CUDA when a GPU is present.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from benchmarks.machine import default_device, describe

MODULES = ("sigreg", "views", "step", "resnet_stem", "memory", "loader", "world", "world_camera", "plan", "verify")  # benchmarks/bench_<name>.py: run(quick, threads=...) -> dict


def choose_threads(threads: int | None) -> tuple[int | None, str]:
    """`threads` if given; else torch's default, or 1 when the machine is oversubscribed.

    With more runnable jobs than cores, a multi-threaded kernel waits at every barrier for a
    thread the scheduler has parked: on a 2-core machine at load 9 a tiny training step took
    ~60x longer with 2 threads than with 1. One thread then measures the code, not the scheduler.
    """
    if threads:
        return threads, "asked for"
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not torch.cuda.is_available() and load > cores and torch.get_num_threads() > 1:
        return 1, f"1-minute load average {load:.1f} > {cores} usable cores: one thread avoids waiting on parked threads"
    return None, "torch's default"


def run_suite(quick: bool = False, only: list[str] | tuple[str, ...] | None = None, threads: int | None = None,
              progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Run the chosen modules (default all) and return one JSON-able document.

    threads: CPU threads for torch; None picks (see `choose_threads`) and records why.
    """
    threads, why = choose_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    progress(f"benchmarks: {torch.get_num_threads()} thread(s) ({why})")
    names = [n for n in MODULES if not only or n in only]
    doc: dict = {"machine": describe(default_device()), "quick": quick, "threads_choice": why,
                 "results": {}, "timing": {}}
    start = time.perf_counter()
    for name in names:
        progress(f"benchmarks: {name} ...")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            doc["results"][name] = module.run(quick, threads=threads)
        except Exception as e:  # one broken module must not cost the others' figures
            doc["results"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        wall = time.perf_counter() - t0
        doc["timing"][name] = {"wall_s": round(wall, 1), "process_cpu_s": round(time.process_time() - c0, 1)}
        progress(f"benchmarks: {name} done in {wall:.0f} s")
    doc["timing"]["total_wall_s"] = round(time.perf_counter() - start, 1)
    doc["load_average_after_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    return doc


def failed(doc: dict) -> list[str]:
    return [name for name, r in doc["results"].items() if isinstance(r, dict) and "error" in r]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON document to this file")
    ap.add_argument("--only", action="append", choices=MODULES, help="run only this module (repeatable)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's, or 1 on an oversubscribed CPU)")
    args = ap.parse_args(argv)
    doc = run_suite(args.quick, args.only, args.threads)
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 1 if failed(doc) else 0


if __name__ == "__main__":
    sys.exit(main())
