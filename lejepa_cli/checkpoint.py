"""Checkpoints: the whole training state in one safetensors file, written atomically.

Layout of `step-0000100.safetensors`:
  tensors   model.<name>, probe.<name>, optim.<group>.<i>.<state>, rng.<name>
  metadata  format, step, config (JSON), optim (JSON: hyper-parameters and non-tensor state),
            data position, version
Nothing is pickled: loading a checkpoint someone sent you cannot run code.

Writes go to a temporary file in the same folder, are fsynced and then renamed over the final
name, so a kill at any moment leaves either the old set of checkpoints or the new one, never a
half-written file under a final name; temporary files a killed run left behind are removed by
the next `prune`. A sha256 over every tensor and every metadata value is stored with them and
checked on load, so a flipped bit anywhere (tensor data or header) is reported, not resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lejepa_cli.errors import RunFailed, UserError

FORMAT = "lejepa-checkpoint-v1"
_NAME = re.compile(r"^step-(\d{9})\.safetensors$")
# Temporary files of a write: ours (.step-*.safetensors.tmp-PID) and the one safetensors writes first (.tmpXXXXXX).
_TEMP = re.compile(r"^\.(step-\d{9}\.safetensors\.tmp-(\d+)|tmp\w+)$")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # a real header is far smaller; refuse absurd ones before parsing


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.safetensors"  # zero-padded so names sort in step order


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


# ---- flattening state to named tensors + JSON ----------------------------------------------------


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                extra[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "extra": extra}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["extra"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- save / load -------------------------------------------------------------------------------


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Atomically write `tensors` and JSON-encodable `metadata` to `path`; RunFailed if the disk refuses."""
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {k: json.dumps(v) for k, v in {"format": FORMAT, **metadata}.items() if k != "digest"}
    meta["digest"] = json.dumps(checkpoint_digest(flat, meta))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes through a private (0600) temporary file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors (disk full, ...) as its own type
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise RunFailed(f"could not write checkpoint {path}: {reason}; the previous checkpoints are intact") from None


def current_umask() -> int:
    """The process's umask (read by setting it, so set straight back), for files made as open() would make them."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes: safetensors has no checksum, and a flipped bit must not resume silently."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def checkpoint_digest(tensors: dict[str, torch.Tensor], raw_meta: dict[str, str]) -> str:
    """sha256 over the tensors and the stored metadata strings (all but "digest" itself)."""
    h = hashlib.sha256(tensor_digest(tensors).encode())
    for key in sorted(k for k in raw_meta if k != "digest"):
        h.update(json.dumps([key, raw_meta[key]]).encode())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_header(path: Path) -> None:
    """Reject files that are not safetensors before handing them to the parser."""
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a checkpoint file: give one of its checkpoints "
                        f"(RUN/checkpoints/step-*.safetensors)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise UserError(f"{path} is not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise UserError(f"{path} is not a safetensors file or is truncated (header length {header_len}, file {size} bytes)")


def read_raw_metadata(path: Path) -> dict[str, str]:
    """The metadata strings of a safetensors file as stored, without loading tensors."""
    check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise UserError(f"{path} is damaged or not a safetensors file ({str(e).splitlines()[0]})") from None


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint or export, without loading tensors."""
    return _decode(read_raw_metadata(path))


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors and decoded metadata; a damaged file raises UserError naming it."""
    raw = read_raw_metadata(path)
    meta = _decode(raw)
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a lejepa training checkpoint (format {meta.get('format')!r})")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise UserError(f"{path} is damaged ({str(e).splitlines()[0]})") from None
    if meta.get("digest") != checkpoint_digest(tensors, raw):
        raise UserError(f"{path} is damaged: its tensors or metadata do not match the checksum written with them")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"{path} is not a complete lejepa training checkpoint (no config or step in its metadata)")
    return tensors, meta


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {name[n:]: t for name, t in tensors.items() if name.startswith(prefix + ".")}


def prune(folder: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints; remove temporary files that killed writes left."""
    for old in list_checkpoints(folder)[:-keep_last]:
        old.unlink(missing_ok=True)
    for entry in os.scandir(folder):
        match = _TEMP.match(entry.name)
        if match and match.group(2) != str(os.getpid()):  # only one process writes a run's checkpoints
            Path(entry.path).unlink(missing_ok=True)


def find_resumable(folder: Path, warn=print) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that loads; damaged newer ones are skipped with a warning.

    None when `folder` holds no checkpoint; a UserError when it holds some but none loads (a
    run restarted from scratch there would see its new checkpoints pruned as the oldest).
    """
    found = list_checkpoints(folder)
    for path in reversed(found):
        try:
            tensors, meta = load_checkpoint(path)
        except UserError as e:
            warn(f"skipping damaged checkpoint: {e}")
            continue
        return path, tensors, meta
    if found:
        raise UserError(f"none of the {len(found)} checkpoints in {folder} loads (see above); "
                        f"move them away, or start over with --overwrite instead of --resume")
    return None
