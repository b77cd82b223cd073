"""What checking shards against their checksums costs: seconds per GB of sha256 over shard files.

    python -m benchmarks.bench_verify            # 1 GiB of shards, each hashed cold and warm
    python -m benchmarks.bench_verify --quick    # 128 MiB

Training hashes every shard of the data it reads once per process, when it first opens the shard
(`ShardedImages(checksums=...)`, lejepa_cli/data/shards.py); this is that cost. Prints one JSON
object: seconds per GB (1e9 bytes) and GB/s, "warm" with the files in the page cache (the usual
case right after `data prepare` or on a second run) and "cold" after asking the kernel to drop
them (posix_fadvise DONTNEED; the disk's read speed then counts too), plus the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import describe
from lejepa_cli.data.shards import sha256_file, write_array

SHARD = 256 << 20  # the size `data prepare` and `world simulate` aim for


def _drop_cache(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def run(quick: bool = False, threads: int | None = None, total: int | None = None) -> dict:
    """Hash `total` bytes (default 1 GiB, quick 128 MiB) of uint8 shards, cold, then warm."""
    total = total or ((128 << 20) if quick else (1 << 30))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k in range(max(1, total // SHARD)):
            size = min(SHARD, total)
            paths.append(Path(tmp) / f"shard-{k:05d}.npy")
            write_array(paths[-1], rng.integers(0, 256, size, dtype=np.uint8).reshape(-1, 64, 64, 4))
        nbytes = sum(p.stat().st_size for p in paths)
        dropped = all(_drop_cache(p) for p in paths)
        start = time.perf_counter()
        for p in paths:
            sha256_file(p)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        for p in paths:
            sha256_file(p)
        warm = time.perf_counter() - start
    gb = nbytes / 1e9
    return {"bytes": nbytes, "shards": len(paths),
            "warm": {"s_per_gb": round(warm / gb, 3), "gb_per_s": round(gb / warm, 3)},
            "cold": {"s_per_gb": round(cold / gb, 3), "gb_per_s": round(gb / cold, 3), "cache_dropped": dropped},
            "machine": describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
