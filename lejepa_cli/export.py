"""Encoder-only artefacts for downstream use, and the loaders that read encoders back.

    lejepa export runs/demo --out exports/demo              # newest checkpoint of a run
    lejepa export CKPT --out DIR --dtype bf16 --format all  # + model.onnx

    from lejepa_cli.export import load_encoder
    enc = load_encoder("exports/demo")      # nn.Module in eval mode; needs torch + safetensors only
    h = enc(x)                              # x normalised with enc.lejepa_info["mean"] / ["std"]

An export folder holds:
  model.safetensors  the backbone's state dict alone (no projector, optimizer or probe), under
                     timm's parameter names, in fp32, bf16 or fp16
  config.json        timm's hub form (architecture, num_classes=0, num_features, global_pool,
                     model_args, pretrained_cfg with input_size / mean / std / interpolation ...)
                     plus a "lejepa" section: arch_config, image size, normalisation, preset, step,
                     lambda, views, data fingerprint, probe metrics when known, package version
  model.onnx         (--format onnx|all) fp32 graph with a dynamic batch axis, checked against
                     PyTorch when written

For the ViT and ResNet presets (not the small-stem ResNets) the weights load strictly into
`timm.create_model(config["architecture"], num_classes=0, **config["model_args"])`, e.g.
`timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))`.

The loaders accept an export folder (or its model.safetensors), a training checkpoint, or a run
folder (its newest checkpoint). Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lejepa_cli import __version__
from lejepa_cli.checkpoint import FORMAT as CHECKPOINT_FORMAT
from lejepa_cli.checkpoint import check_header, list_checkpoints, load_checkpoint, read_metadata, split_prefix
from lejepa_cli.errors import RunFailed, UserError

EXPORT_FORMAT = "lejepa-export-v1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("safetensors", "onnx", "all")
ONNX_TOLERANCE = 1e-3  # max abs difference accepted at export; fp32 kernels typically differ by ~1e-6

# Our ViT sizes -> the timm model with the same widths; patch / image size go in model_args.
_TIMM_VIT = {
    "vit_nano": "vit_tiny_patch16_224",  # narrower, shallower tinies: model_args carry their sizes
    "vit_micro": "vit_tiny_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}


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
        try:
            with safe_open(str(path), framework="pt") as f:
                state = {k[len("model.backbone."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.backbone.")}
        except Exception as e:  # safetensors raises its own types for damaged data
            raise UserError(f"{path} is damaged ({str(e).splitlines()[0]})") from None
    if not state or not isinstance(meta.get("backbone"), dict):
        raise UserError(f"{path} holds no backbone (no model.backbone.* tensors or 'backbone' metadata)")
    arch, data, cfg = meta["backbone"], meta.get("data") or {}, meta.get("config") or {}
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
    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config} is not readable JSON ({e})") from None
    info = cfg.get("lejepa") if isinstance(cfg, dict) else None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or "arch_config" not in info:
        raise UserError(f"{config} is not a lejepa export config (no 'lejepa' section of format {EXPORT_FORMAT})")
    check_header(weights)
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise UserError(f"{weights} is damaged ({str(e).splitlines()[0]})") from None
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


def timm_config(arch: dict[str, Any], *, num_features: int, mean: Iterable[float], std: Iterable[float]) -> dict[str, Any]:
    """config.json fields in timm's hub form (architecture, model_args, pretrained_cfg, ...).

    The pretrained_cfg keys follow timm 1.0's `PretrainedCfg`; the preprocessing it describes is
    lejepa's eval transform (resize the whole image, bilinear, no crop).
    """
    size, chans = int(arch["img_size"]), int(arch.get("in_chans", 3))
    if arch["arch"] in _TIMM_VIT:
        name = _TIMM_VIT[arch["arch"]]
        # dynamic_img_size: timm then resamples pos_embed per input as our ViT does.
        model_args = {"img_size": size, "patch_size": int(arch["patch_size"]), "in_chans": chans, "dynamic_img_size": True}
        if arch["arch"] in ("vit_nano", "vit_micro"):
            from lejepa_cli.models.vit import VIT_SIZES

            dim, depth, heads = VIT_SIZES[arch["arch"]]
            model_args.update(embed_dim=dim, depth=depth, num_heads=heads)
        pool, first_conv, classifier, pool_size = "token", "patch_embed.proj", "head", None
    else:
        name, model_args = arch["arch"], {"in_chans": chans}
        pool, first_conv, classifier = "avg", "conv1", "fc"
        pool_size = [max(1, size // (8 * arch.get("stem_stride", 1) if arch.get("small_stem") else 32))] * 2
    pretrained_cfg = {
        "tag": "lejepa",
        "custom_load": False,
        "input_size": [chans, size, size],
        "fixed_input_size": False,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "num_classes": 0,
        "pool_size": pool_size,
        "first_conv": first_conv,
        "classifier": classifier,
    }
    return {"architecture": name, "num_classes": 0, "num_features": int(num_features), "global_pool": pool,
            "model_args": model_args, "pretrained_cfg": pretrained_cfg}


def timm_compatible(arch: dict[str, Any]) -> bool:
    """timm has no 3x3 stride-1 stem without max-pool and no widening head on its ResNets, so ResNets
    with either are lejepa-only (as is ResNet-Micro: timm has no model of its widths under a name)."""
    return arch["arch"] in _TIMM_VIT or (arch["arch"] in ("resnet18", "resnet50") and not arch.get("small_stem")
                                         and not arch.get("head_width"))


@dataclass
class Exported:
    out: Path
    files: list[Path]
    dtype: str
    architecture: str  # timm model name
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
        _onnx_modules()  # fail before touching an existing export
    out = Path(out)
    names = [CONFIG] + ([WEIGHTS] if format != "onnx" else []) + ([ONNX] if format != "safetensors" else [])
    clash = [n for n in (CONFIG, WEIGHTS, ONNX) if (out / n).exists()]
    if clash and not overwrite:
        raise UserError(f"{out} already holds an export ({', '.join(clash)}); pass --overwrite to replace it")
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
        "dtype": dtype, "timm_compatible": timm_compatible(arch), "version": __version__, "exported_by": f"lejepa-cli {__version__}",
    }
    config = timm_config(arch, num_features=backbone.embed_dim, mean=mean, std=std)
    result = Exported(out, [out / n for n in names], dtype, config["architecture"], info["timm_compatible"], info=info)

    if format != "onnx":
        target = DTYPES[dtype]
        state = {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu()).contiguous()
                 for k, v in backbone.state_dict().items()}
        tmp = out / f".{WEIGHTS}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})  # "pt": what timm / HF writers put here
        os.chmod(tmp, 0o644)  # safetensors creates 0600 files; an export is meant to be shared
        os.replace(tmp, out / WEIGHTS)
    if format != "safetensors":
        result.onnx_max_abs_diff = export_onnx(backbone, out / ONNX, image_size=info["image_size"], channels=info["channels"])
        info["onnx"] = {"file": ONNX, "input": "images", "output": "embedding", "max_abs_diff": result.onnx_max_abs_diff}
    tmp = out / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps({**config, "lejepa": info}, indent=2) + "\n")
    os.replace(tmp, out / CONFIG)  # written last: its presence means the folder is complete
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


# ---- ONNX ---------------------------------------------------------------------------------------


def _onnx_modules() -> Any:
    """onnxruntime (and onnx, which the exporter needs), or a UserError saying how to get them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'lejepa-cli[onnx]'") from None
    return onnxruntime


def export_onnx(backbone: nn.Module, path: Path, *, image_size: int, channels: int, opset: int = 17) -> float:
    """Trace `backbone` (fp32, CPU) to ONNX with a dynamic batch axis; returns the max abs
    difference from PyTorch over random batches of 2 and 3 images (raises above ONNX_TOLERANCE)."""
    ort = _onnx_modules()
    was_training = backbone.training
    first = next(iter(backbone.parameters()))
    model = backbone.eval().to("cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, channels, image_size, image_size, generator=gen)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # dynamo=False: the TorchScript exporter, which needs no onnxscript. It warns that it is
            # deprecated, and about the ViT's Python shape checks; the graph is traced at the native
            # image size (only the batch axis is dynamic), where those checks are constant.
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["images"],
                              output_names=["embedding"], opset_version=opset,
                              dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}})
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff = 0.0
        with torch.no_grad():
            for n in (2, 3):  # a batch other than the traced one proves the batch axis is dynamic
                x = torch.randn(n, channels, image_size, image_size, generator=gen)
                got = session.run(None, {"images": x.numpy()})[0]
                diff = max(diff, float((torch.from_numpy(got) - model(x)).abs().max()))
        if not diff <= ONNX_TOLERANCE:
            raise RunFailed(f"ONNX output differs from PyTorch by {diff:.2e} (> {ONNX_TOLERANCE:g}); {path} not written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        backbone.to(first.device, first.dtype).train(was_training)
    return diff
