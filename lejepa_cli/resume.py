"""Continuing a run: the run folder's path, its newest good checkpoint, and whether it already finished.

    point = resume_point(Path("runs/demo"))        # (checkpoint path, its stored config) or None
    done = finished_summary(Path("runs/demo"), cfg, "auto")   # the stored summary when nothing is left to do

The checkpoint folder is scanned once per command: `resume_point` loads candidates newest first
(skipping damaged ones with one warning each), and the CLI then hands train() the path it found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lejepa_cli import dist
from lejepa_cli.checkpoint import checkpoint_name, find_resumable, list_checkpoints, load_checkpoint
from lejepa_cli.config import Config, config_from_dict, diff_keys
from lejepa_cli.errors import UserError
from lejepa_cli.logs import console


def check_run_folder(out: Path) -> None:
    """A run folder must be a folder (or not exist yet): a file there, or above it, is a one-line error."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" (at {path})"
                raise UserError(f"--out {out} is not a folder{where}: a run folder holds checkpoints and logs; "
                                f"give a folder path (it is created if missing)")
            return


def resume_point(run_dir: Path) -> tuple[Path, Config] | None:
    """The newest checkpoint of `run_dir` that loads and the config stored in it; None when there is none."""
    check_run_folder(run_dir)
    found = find_resumable(run_dir / "checkpoints", warn=lambda m: dist.is_main() and console.print(f"[yellow]{m}"))
    return None if found is None else (found[0], config_from_dict(found[2]["config"]))


def check_preset_matches(stored: Config, asked: Config, preset: str, source: str | Path) -> None:
    """`--preset P --resume ...`: P must describe the run being resumed (stored in `source`), which keeps its own config."""
    order = ("model", "data", "views", "loss", "optim", "train", "log")  # what tells runs apart first
    differ = sorted((k for k in diff_keys(stored.to_dict(), asked.to_dict()) if k != "preset"),
                    key=lambda k: order.index(k.split(".")[0]) if k.split(".")[0] in order else len(order))
    if differ:
        shown = ", ".join(differ[:4]) + (f", ... ({len(differ)} keys)" if len(differ) > 4 else "")
        raise UserError(f"--preset {preset} differs from the config stored in {source} ({shown}); --resume "
                        f"continues a run with its own config: drop --preset (change keys with --set key=value), "
                        f"or start a new run with another --out")


def finished_summary(out: Path, cfg: Config, resume: str) -> dict[str, Any] | None:
    """The run's stored summary when resuming would do nothing: it reached cfg.train.steps, the
    checkpoint to resume from (`resume`: "auto" or a path) is its own final one, and `cfg` is the
    config stored there (train.steps aside). Says so on rank 0."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    step = summary.get("step") if isinstance(summary, dict) else None
    if not isinstance(step, int) or step < cfg.train.steps:
        return None
    ckpt_dir = out / "checkpoints"
    if resume == "auto":
        newest = list_checkpoints(ckpt_dir)[-1:]
        path = newest[0] if newest else None
    else:
        path = Path(resume)
    if path is None or path.resolve() != (ckpt_dir / checkpoint_name(step)).resolve():
        return None
    # A damaged final checkpoint, or settings other than the run's own (a --set on top): the normal
    # path reports them (and retrains from the newest good checkpoint).
    try:
        stored = load_checkpoint(path)[1]["config"]
        # read as a config, so that keys added (or renamed) since the checkpoint was written compare equal
        stored = config_from_dict(stored).to_dict() if isinstance(stored, dict) else None
    except UserError:
        return None
    if stored is None or [k for k in diff_keys(stored, cfg.to_dict()) if k != "train.steps"]:
        return None
    if dist.is_main():
        console.print(f"already finished at step {step} (summary in {out / 'summary.json'})", highlight=False)
    return summary
