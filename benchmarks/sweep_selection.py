"""Does the label-free score pick the models that probe best? A lambda x lr sweep with Spearman figures.

    python -m benchmarks.sweep_selection                       # demo preset, 4 lambdas x 2 lrs, 200 steps
    python -m benchmarks.sweep_selection --steps 100 --jobs 2 --out runs/sweep
    python -m benchmarks.sweep_selection --preset fmnist --steps 300 --lrs 0.001,0.004 --out runs/sweep-fmnist

Trains one short run per (lambda, lr) pair (`--jobs` at a time, one CPU thread each; a finished
run is reused when the command is repeated), then for every run's final checkpoint:
- the label-free score of `lejepa probe --label-free` (LeJEPA loss / lambda**0.4 on a fixed
  unlabelled batch with fixed views and SIGReg directions), and the raw loss on that batch;
- the last training-loss line of metrics.jsonl (`loss` and `loss_scaled` = loss / lambda**0.4);
- linear top-1 (the quick linear probe of the label-free ranking, on cached features).
Prints one JSON document: the table (with each run's own pretraining seconds, also for runs reused
from an earlier call) and the Spearman rank correlation of each statistic
(negated: lower loss should mean higher accuracy) with linear top-1. The paper reports ~0.85 for
the raw training loss and up to ~0.99 for loss / lambda**0.4 (docs/method.md section 6.3).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.machine import describe
from lejepa_cli.checkpoint import list_checkpoints
from lejepa_cli.image.selection import rank_checkpoints, spearman


def run_name(lamb: float, lr: float) -> str:
    return f"lamb{lamb:g}-lr{lr:g}"


def train_all(out: Path, preset: str, steps: int, pairs: list[tuple[float, float]], extra: list[str],
              jobs: int) -> tuple[float, int]:
    """Train every (lambda, lr) run not finished yet, `jobs` processes at a time; (wall seconds, runs trained)."""
    t0 = time.perf_counter()
    todo = [(lamb, lr) for lamb, lr in pairs if not _finished(out / run_name(lamb, lr), steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running: list[subprocess.Popen] = []
    for lamb, lr in todo:
        while len(running) >= jobs:
            running = [p for p in running if p.poll() is None]
            time.sleep(1)
        args = [sys.executable, "-m", "lejepa_cli", "train", "--preset", preset, "--out", str(out / run_name(lamb, lr)),
                "--resume", "auto", "--set", f"train.steps={steps}", "--set", f"train.save_every={steps}",
                "--set", f"loss.lamb={lamb}", "--set", f"optim.lr={lr}", "--set", "train.eval_every=0"]
        for item in extra:
            args += ["--set", item]
        print(f"[sweep] train {run_name(lamb, lr)}", file=sys.stderr, flush=True)
        running.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL))
    for p in running:
        p.wait()
    failed = [run_name(*pair) for pair in pairs if not _finished(out / run_name(*pair), steps)]
    if failed:
        raise SystemExit(f"runs did not finish: {', '.join(failed)}")
    return time.perf_counter() - t0, len(todo)


def _finished(run_dir: Path, steps: int) -> bool:
    ckpts = list_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
    return bool(ckpts) and ckpts[-1].name.endswith(f"{steps:09d}.safetensors")


def last_training_line(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lambdas", default="0.01,0.05,0.2,0.5")
    parser.add_argument("--lrs", default="0.0005,0.002")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep-selection"))
    parser.add_argument("--set", dest="extra", action="append", default=[], help="extra config override for every run")
    args = parser.parse_args()
    pairs = list(itertools.product([float(x) for x in args.lambdas.split(",")], [float(x) for x in args.lrs.split(",")]))
    train_s, trained = train_all(args.out, args.preset, args.steps, pairs, args.extra, args.jobs)
    rows = []
    for lamb, lr in pairs:
        run_dir = args.out / run_name(lamb, lr)
        ranked = rank_checkpoints(run_dir, with_labels=True)
        ckpt = max(ranked["checkpoints"], key=lambda r: r["step"])  # the final checkpoint
        last = last_training_line(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"run": run_name(lamb, lr), "lambda": lamb, "lr": lr, "train_s": summary.get("train_s"),
                     "linear_top1": ckpt["linear_top1"],
                     "label_free_score": ckpt["score"], "fixed_batch_loss": ckpt["loss"],
                     "train_loss": last["loss"], "train_loss_scaled": last["loss_scaled"]})
        print(f"[sweep] {rows[-1]}", file=sys.stderr, flush=True)
    acc = [r["linear_top1"] for r in rows]
    result = {
        "machine": describe(), "preset": args.preset, "steps": args.steps, "overrides": args.extra,
        "train_wall_s": round(train_s, 1), "runs_trained_now": trained, "runs_reused": len(pairs) - trained, "runs": rows,
        "spearman_with_linear_top1": {
            key: None if (rho := spearman([-r[key] for r in rows], acc)) is None else round(rho, 3)
            for key in ("label_free_score", "fixed_batch_loss", "train_loss_scaled", "train_loss")
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
