"""What a raw trajectory file holds, for `lejepa data info FILE.h5|.npz|.lance`: episodes, steps,
frame size and storage, action and state widths, whether the reset frame is stored, and the
action rows a read will set to 0, all without preparing it.

    for key, value in describe_trajectory_file(Path("tworoom.h5")): print(key, value)
    problems = verify_trajectory_file(Path("tworoom.h5"))   # decodes every frame; [] when all do
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lejepa_cli.errors import UserError

KINDS = {"npz": ".npz arrays", "hdf5": "HDF5, stable-worldmodel's layout", "lance": "Lance, stable-worldmodel's layout"}
VERIFY_ROWS = 256  # frames decoded at a time by verify_trajectory_file


def _reset_frame(first_step_idx: int | None, kind: str) -> str:
    if kind == "lance":
        return "unknown (Lance's step_idx is the writer's own count from 0)"
    if first_step_idx == 0:
        return "stored (step_idx starts at 0 in every episode)"
    if first_step_idx == 1:
        return ("not stored (step_idx starts at 1: stable-worldmodel 0.1.1); an episode's last action row holds its "
                "first action, which no window uses")
    return "-" if first_step_idx is None else f"step_idx starts at {first_step_idx}"


def describe_trajectory_file(path: Path) -> list[tuple[str, str]]:
    """(label, value) rows describing a raw trajectory file; frames are not decoded, so a file whose
    frames need a missing plugin is still described (and says so)."""
    from lejepa_cli.world.readers import read_trajectory_file

    raw = read_trajectory_file(path, check_frames=False)
    T, H, W, C = raw.frames.shape
    lengths = np.diff(raw.episode_starts)
    A = raw.actions.shape[1]
    names = raw.state_names or []
    state = f"{len(names)} ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else "none"
    return [
        ("kind", f"trajectory file for world models ({KINDS[raw.kind]})"),
        ("episodes", f"{len(lengths)} (boundaries from {raw.episodes_from})"),
        ("steps", f"{T}; per episode {int(lengths.min())} to {int(lengths.max())} (median {float(np.median(lengths)):g})"),
        ("frames", f"{H} x {W} x {C} uint8, stored {raw.frame_storage}"),
        ("action width", f"{A} (row t acts between frame t and t + 1)" if A else "0 (a passive video)"),
        ("state width", state),
        ("reset frame", _reset_frame(raw.first_step_idx, raw.kind)),
        ("NaN action rows", f"{raw.zeroed_rows}, each episode's last: read as 0, as LeWM's train.py does (stable-worldmodel's "
                            f"placeholder after an episode's last frame)" if raw.zeroed_rows else "none"),
        ("not read", ", ".join(raw.other_columns) or "-"),
    ]


def verify_trajectory_file(path: Path) -> list[str]:
    """Decode every frame of a raw trajectory file; the problems found (empty when every frame reads)."""
    from lejepa_cli.world.readers import read_trajectory_file

    try:
        raw = read_trajectory_file(path)
        for start in range(0, len(raw.frames), VERIFY_ROWS):
            raw.frames[start : start + VERIFY_ROWS]
    except (UserError, OSError) as e:
        return [str(e).splitlines()[0]]
    return []
