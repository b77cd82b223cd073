"""Run logging: metrics.jsonl always, TensorBoard / Weights & Biases when installed and asked for,
and a rich progress line on rank 0. Every other rank logs nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lejepa_cli.config import LogConfig

console = Console(stderr=True)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (by a run that was killed after its last checkpoint)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", -1) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_name(path.name + ".tmp")  # temp + rename: a kill here must not lose the history
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLogger:
    def __init__(self, out: Path, cfg: LogConfig, *, enabled: bool, total_steps: int, start_step: int,
                 show_progress: bool = True, run_config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.backends: list[Any] = []
        self.progress: Progress | None = None
        if not enabled:
            return
        self.file = open(out / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            self._add_tensorboard(out)
        if cfg.wandb:
            self._add_wandb(out, cfg, run_config)
        if show_progress:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    def _add_tensorboard(self, out: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            console.print("[yellow]log.tensorboard is on but tensorboard is not installed (pip install tensorboard); skipping")
            return
        writer = SummaryWriter(str(out / "tensorboard"))
        self.backends.append(lambda rec: [writer.add_scalar(k, v, rec["step"]) for k, v in rec.items()
                                          if k != "step" and isinstance(v, (int, float))])

    def _add_wandb(self, out: Path, cfg: LogConfig, run_config: dict[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError:
            console.print("[yellow]log.wandb is on but wandb is not installed (pip install wandb); skipping")
            return
        run = wandb.init(project=cfg.wandb_project, dir=str(out), config=run_config, resume="allow")
        self.backends.append(lambda rec: run.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"]))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        for backend in self.backends:
            backend(record)

    def advance(self, step: int, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)

    def print(self, message: str) -> None:
        if self.enabled:
            console.print(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        self.file.close()


class Throughput:
    """Samples per second and data-wait fraction over the last logging window.

    `unit` names what is counted: "images" (image pretraining) or "frames" (a world model's
    windows, every frame encoded); it names the logged key, images_per_s or frames_per_s.
    """

    def __init__(self, unit: str = "images"):
        self.unit = unit
        self.reset()

    @property
    def key(self) -> str:
        """The metrics.jsonl key of the rate: images_per_s or frames_per_s."""
        return f"{self.unit}_per_s"

    @property
    def short(self) -> str:
        """The rate's unit on the progress line: img/s or frames/s."""
        return "img/s" if self.unit == "images" else f"{self.unit}/s"

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.samples = 0
        self.wait = 0.0

    def add(self, samples: int, wait_s: float) -> None:
        self.samples += samples
        self.wait += wait_s

    def read(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return self.samples / elapsed, self.wait / elapsed
