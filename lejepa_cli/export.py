"""Encoder-only artefacts for downstream use, and the loaders that read encoders back.

    lejepa export runs/demo --out exports/demo              # newest checkpoint of a run
    lejepa export CKPT --out DIR --dtype bf16               # half-size weights
    lejepa export CKPT --out DIR --format onnx              # + model.onnx

    from lejepa_cli.export import load_encoder
    enc = load_encoder("exports/demo")      # nn.Module in eval mode; needs torch + safetensors only
    h = enc(x)                              # x normalised with enc.lejepa_info["mean"] / ["std"]

An export folder holds:
  model.safetensors  the backbone's state dict alone (no projector, optimizer or probe), under
                     timm's parameter names, in fp32, bf16 or fp16 (always written: lejepa's
                     loaders, `lejepa embed` / `probe` and timm read it)
  config.json        timm's hub form (architecture, num_classes=0, num_features, global_pool,
                     model_args, pretrained_cfg with input_size / mean / std / interpolation ...)
                     plus a "lejepa" section: arch_config, image size, normalisation, preset, step,
                     lambda, views, data fingerprint, probe metrics when known, package version
  model.onnx         (--format onnx|all, the two are the same) fp32 graph with dynamic batch,
                     height and width axes, checked against PyTorch at three sizes when written
                     (see lejepa_cli/models/onnx_export.py)

In timm (ViTs, and ResNet-18/50 with the standard stem and no widening head; the others are
written under a `lejepa_only_...` architecture name timm rejects, see lejepa_cli/models/timm_compat.py
and docs/export.md):

    model = timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)
    data_cfg = timm.data.resolve_data_config(model=model)   # this run's input size, mean and std

or, from the config.json's fields, with the weights loaded by hand:

    cfg = json.loads(Path("DIR/config.json").read_text())
    model = timm.create_model(cfg["architecture"], num_classes=0, pretrained_cfg=cfg["pretrained_cfg"],
                              **cfg["model_args"])
    model.load_state_dict(safetensors.torch.load_file("DIR/model.safetensors"), strict=True)

`model_args` are needed: without them timm builds its own default geometry (224 px, patch 16),
which an export of another size or patch does not fit; without `pretrained_cfg` timm reports its
defaults (224 px, mean/std 0.5), not the run's preprocessing.

The loaders accept an export folder (or its model.safetensors), a training checkpoint, or a run
folder (its newest checkpoint). Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from lejepa_cli._version import __version__
from lejepa_cli.checkpoint import FORMAT as CHECKPOINT_FORMAT
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint, read_metadata, split_prefix
from lejepa_cli.data.disk import require_space, tree_bytes
from lejepa_cli.data.inputs import load_json, load_safetensors, reading
from lejepa_cli.errors import UserError
from lejepa_cli.models.onnx_export import ONNX_TOLERANCE, export_onnx, onnx_runtime
from lejepa_cli.models.timm_compat import timm_compatible, timm_config, timm_incompatibility
from lejepa_cli.outputs import atomic_output, save_safetensors

EXPORT_FORMAT = "lejepa-export-v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("safetensors", "onnx", "all")

# ---- reading an encoder from any of its forms --------------------------------------------------


def read_encoder(path: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Backbone state dict (CPU) and its `lejepa_info` from an export, a checkpoint or a run folder.

    `verify` checks a training checkpoint's checksum, which means reading all of it (optimizer
    state included); otherwise only the backbone's tensors are read.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / CONFIG).is_file() and (path / WEIGHTS).is_file():
            return _read_export(path / WEIGHTS, path / CONFIG)
        ckpts = list_checkpoints(path / "checkpoints")
        if ckpts:
            return _read_checkpoint(ckpts[-1], verify)
        if (path / ONNX).is_file():  # an ONNX-only folder: older `export --format onnx` wrote no weights beside it
            raise UserError(f"{path} holds {ONNX} without {WEIGHTS}, and the ONNX graph is for onnxruntime only: pass the "
                            f"run folder or checkpoint it came from, or re-export it with `lejepa export RUN --out {path} "
                            f"--format all --overwrite` (writes {WEIGHTS} beside {ONNX})")
        raise UserError(f"{path} is neither an export folder ({WEIGHTS} + {CONFIG}) nor a run folder with checkpoints/")
    if not path.exists():
        raise UserError(f"{path} does not exist (expected an export folder, a checkpoint or a run folder)")
    meta = read_metadata(path)  # UserError when it is not safetensors at all
    if meta.get("format") == CHECKPOINT_FORMAT:
        return _read_checkpoint(path, verify)
    if (path.parent / CONFIG).is_file():
        return _read_export(path, path.parent / CONFIG)
    raise UserError(f"{path} is a safetensors file but neither a lejepa checkpoint nor an export (no {CONFIG} beside it)")


def _read_checkpoint(path: Path, verify: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if verify:
        tensors, meta = load_checkpoint(path)
        state = split_prefix(tensors, "model.backbone")
    else:
        meta = read_metadata(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a lejepa training checkpoint (format {meta.get('format')!r})")
        with reading(path, "checkpoint", f"{path} is damaged"), safe_open(str(path), framework="pt") as f:
            state = {k[len("model.backbone."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.backbone.")}
    if not state or not isinstance(meta.get("backbone"), dict):
        raise UserError(f"{path} holds no backbone (no model.backbone.* tensors or 'backbone' metadata)")
    arch, data, cfg = meta["backbone"], meta.get("data"), meta.get("config")
    data, cfg = (data if isinstance(data, dict) else {}), (cfg if isinstance(cfg, dict) else {})  # damaged: text
    if not data.get("mean") or not data.get("std"):
        raise UserError(f"{path} does not record its data's mean/std, which inputs must be normalised with")
    info = {
        "arch_config": arch,
        "image_size": int(arch["img_size"]),
        "patch_size": arch.get("patch_size"),
        "channels": int(arch["in_chans"]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "step": meta.get("step"),
        "preset": cfg.get("preset") or None,
        "lambda": (cfg.get("loss") or {}).get("lamb"),
        "views": cfg.get("views"),
        "data": data or None,
        "config": cfg or None,
        "probe": _probe_metrics(path, meta.get("step")),
        "version": meta.get("version"),
        "source": str(path),
    }
    return state, info


def _probe_metrics(ckpt: Path, step: int | None) -> dict[str, float] | None:
    """Evaluation scores the run logged at this checkpoint's step (metrics.jsonl beside checkpoints/)."""
    metrics = ckpt.parent.parent / "metrics.jsonl" if ckpt.parent.name == "checkpoints" else None
    if step is None or metrics is None or not metrics.is_file():
        return None
    found: dict[str, float] = {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step") == step:
            found.update({k: float(v) for k, v in record.items() if "top1" in k and isinstance(v, (int, float))})
    return found or None


def _read_export(weights: Path, config: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cfg = load_json(config, "export config (JSON)")
    info = cfg.get("lejepa") if isinstance(cfg, dict) else None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or "arch_config" not in info:
        raise UserError(f"{config} is not a lejepa export config (no 'lejepa' section of format {EXPORT_FORMAT})")
    state = load_safetensors(weights, "export weights file")  # header size-checked before parsing
    return state, {**info, "source": str(weights.parent)}


# ---- fitting a state dict to a backbone ----------------------------------------------------------


def _check_fits(module: nn.Module, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """One-line UserError naming missing, unexpected or differently shaped tensors."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            problems.append(f"{label} {keys[0]}{more}")
    if shapes:
        k = shapes[0]
        problems.append(f"{k} is {tuple(state[k].shape)} there, {tuple(own[k].shape)} here"
                        + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    if problems:
        raise UserError(f"the weights in {source} do not fit this {getattr(module, 'arch', 'model')}: {'; '.join(problems)}")


def _check_arch(backbone: nn.Module, arch: dict[str, Any], source: Path | str) -> None:
    """Same architecture family and input layout, named field by field when not."""
    fields = {"arch": "model.arch", "in_chans": "the data's channel count"}
    fields.update({"patch_size": "model.patch_size"} if str(arch.get("arch", "")).startswith("vit") else
                  {"small_stem": "model.small_stem", "stem_stride": "model.stem_stride", "head_width": "model.head_width"})
    ours = backbone.arch_config()
    stored = {"stem_stride": 1, "head_width": 0, **arch}  # files written before these keys existed had neither
    diffs = [(k, stored.get(k), ours.get(k)) for k in fields if stored.get(k) != ours.get(k)]
    if diffs:
        said = "; ".join(f"{k} {theirs} there, {mine} here" for k, theirs, mine in diffs)
        raise UserError(f"{source} does not fit this run's encoder: {said} (match {', '.join(fields[k] for k, _, _ in diffs)})")


def resample_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """(1, P + g*g, D) -> (1, P + grid*grid, D): the patch part resampled bicubically, as timm does."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise UserError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid; cannot resample it")
    d = patches.shape[-1]
    patches = patches.float().reshape(1, g, g, d).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


def _stderr_main(message: str) -> None:
    from lejepa_cli import dist

    if dist.is_main():
        print(message, file=sys.stderr)


def load_backbone_weights(backbone: nn.Module, path: str | Path, *,
                          log: Callable[[str], None] = _stderr_main) -> dict[str, Any]:
    """Load the encoder weights of an export, checkpoint or run folder into `backbone` (strict).

    For `lejepa train --init-from`. The architecture, patch size, channels and stem must match;
    a ViT whose native grid differs from the source's gets pos_embed resampled (bicubic) to the
    new grid, and `log` says so. Returns the source's `lejepa_info`.
    """
    state, info = read_encoder(path)
    _check_arch(backbone, info["arch_config"], path)
    own = getattr(backbone, "pos_embed", None)
    if isinstance(own, torch.Tensor) and "pos_embed" in state and state["pos_embed"].shape != own.shape:
        old = math.isqrt(state["pos_embed"].shape[1] - backbone.num_prefix_tokens)
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], backbone.grid_size, backbone.num_prefix_tokens)
        log(f"pos_embed resampled (bicubic) from a {old}x{old} to a {backbone.grid_size}x{backbone.grid_size} patch "
            f"grid for image size {backbone.img_size}")
    _check_fits(backbone, state, path)
    backbone.load_state_dict(state, strict=True)  # copies across dtype and device
    log(f"encoder initialised from {path} (step {info.get('step')})")
    return info


def load_encoder(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The backbone of an export folder, checkpoint or run folder, in eval mode on `device`.

    The module has `lejepa_info`: arch_config, image_size, patch_size, channels, mean, std,
    embed_dim, feature_dim, step, preset, lambda, views, data, config, probe, version, source
    (step / preset / config / data / probe are None when unknown). Inputs should be
    (N, channels, image_size, image_size) normalised with mean/std; `forward` gives the
    embedding h, `probe_features` what linear probes read.
    """
    from lejepa_cli.models import build_backbone

    state, info = read_encoder(path)
    try:
        backbone = build_backbone(**info["arch_config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} describes an encoder this version cannot build ({e})") from None
    _check_fits(backbone, state, path)
    backbone.load_state_dict(state, strict=True)
    backbone.to(device).eval()
    backbone.lejepa_info = {**info, "embed_dim": int(backbone.embed_dim), "feature_dim": int(backbone.feature_dim)}
    return backbone


# ---- writing an export -------------------------------------------------------------------------


@dataclass
class Exported:
    out: Path
    files: list[Path]
    dtype: str
    architecture: str  # timm model name, or a lejepa_only_ name timm rejects (see timm_compat)
    timm_compatible: bool
    onnx_max_abs_diff: float | None = None
    info: dict[str, Any] = field(default_factory=dict, repr=False)


def export_backbone(
    backbone: nn.Module,
    out: str | Path,
    *,
    mean: Iterable[float],
    std: Iterable[float],
    dtype: str = "fp32",
    format: str = "safetensors",
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Exported:
    """Write `backbone` as an export folder (see the module docstring); `meta` adds lejepa fields.

    The backbone is exported as it is (its mode is restored afterwards); ONNX is traced on the CPU.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not allowed: expected one of {', '.join(DTYPES)}")
    if format not in FORMATS:
        raise UserError(f"--format {format} is not allowed: expected one of {', '.join(FORMATS)}")
    if format != "safetensors" and dtype != "fp32":
        raise UserError(f"ONNX export is fp32 only; drop --dtype {dtype} or use --format safetensors")
    if format != "safetensors":
        onnx_runtime()  # fail before touching an existing export
    out = Path(out)
    names = [CONFIG, WEIGHTS] + ([ONNX] if format != "safetensors" else [])
    clash = [n for n in (CONFIG, WEIGHTS, ONNX) if (out / n).exists()]
    if clash and not overwrite:
        raise UserError(f"{out} already holds an export ({', '.join(clash)}); pass --overwrite to replace it")
    itemsize = DTYPES[dtype].itemsize
    weights = sum(v.numel() * (itemsize if v.is_floating_point() else v.element_size()) for v in backbone.state_dict().values())
    require_space(out, weights * (2 if format != "safetensors" else 1), f"the export ({names[1]}"
                  f"{' and ' + ONNX if format != 'safetensors' else ''})", replaces=sum(tree_bytes(out / n) for n in clash))
    out.mkdir(parents=True, exist_ok=True)
    for n in clash:  # a stale model.onnx beside new weights would describe a different encoder
        (out / n).unlink()

    arch = backbone.arch_config()
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    info = {
        "format": EXPORT_FORMAT, "arch_config": arch, "image_size": int(arch["img_size"]),
        "patch_size": arch.get("patch_size"), "channels": int(arch["in_chans"]), "mean": mean, "std": std,
        "embed_dim": int(backbone.embed_dim), "feature_dim": int(backbone.feature_dim),
        "step": None, "preset": None, "lambda": None, "views": None, "data": None, "config": None, "probe": None,
        **(meta or {}),
        "dtype": dtype, "timm_compatible": timm_compatible(arch), "timm_incompatibility": timm_incompatibility(arch),
        "version": __version__, "exported_by": f"lejepa-cli {__version__}",
    }
    config = timm_config(arch, num_features=backbone.embed_dim, mean=mean, std=std)
    result = Exported(out, [out / n for n in names], dtype, config["architecture"], info["timm_compatible"], info=info)

    # The weights always: lejepa's loaders, embed, probe and timm read them, not the ONNX graph.
    target = DTYPES[dtype]
    state = {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in backbone.state_dict().items()}
    save_safetensors(state, out / WEIGHTS, metadata={"format": "pt"})  # "pt": what timm / HF writers put here
    if format != "safetensors":
        result.onnx_max_abs_diff, sizes = export_onnx(backbone, out / ONNX, image_size=info["image_size"],
                                                      channels=info["channels"])
        info["onnx"] = {"file": ONNX, "input": "images", "output": "embedding", "max_abs_diff": result.onnx_max_abs_diff,
                        "dynamic_axes": ["batch", "height", "width"], "checked_sizes": sizes,
                        "size_rule": (f"height and width multiples of {arch['patch_size']}" if arch.get("patch_size")
                                      and str(arch["arch"]).startswith("vit") else "any height and width")}
    with atomic_output(out / CONFIG) as tmp:  # written last: its presence means the folder is complete
        tmp.write_text(json.dumps({**config, "lejepa": info}, indent=2) + "\n")
    return result


def export_encoder(source: str | Path, out: str | Path, *, dtype: str = "fp32", format: str = "safetensors",
                   overwrite: bool = False, extra: dict[str, Any] | None = None) -> Exported:
    """`lejepa export`: the encoder of a checkpoint, run folder or export, written to `out`.

    `extra` adds sections to config.json's "lejepa" part (a world model's "world" section)."""
    from lejepa_cli.models import build_backbone

    state, info = read_encoder(source, verify=True)  # an artefact others will use: check the checksum
    backbone = build_backbone(**info["arch_config"])
    _check_fits(backbone, state, source)
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    keep = ("step", "preset", "lambda", "views", "data", "config", "probe")
    meta = {k: info.get(k) for k in keep}
    meta["trained_with"] = info.get("trained_with") or info.get("version")  # the source may be an export
    meta.update(extra or {})
    return export_backbone(backbone, out, mean=info["mean"], std=info["std"], dtype=dtype, format=format,
                           meta=meta, overwrite=overwrite)
