"""How an export meets timm: config.json in timm's hub form, and which loading routes work.

timm reads three things from an export folder: `architecture` (a model name it knows),
`model_args` (keyword arguments that give that model our geometry: image size, patch size,
widths) and `pretrained_cfg` (input_size / mean / std / interpolation, what
`timm.data.resolve_data_config` returns). Our encoders use timm's parameter names, so for the
ViTs and the standard-stem ResNets the weights load strictly, by either route:

    model = timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)     # reads all three
    model = timm.create_model(cfg["architecture"], num_classes=0, pretrained_cfg=cfg["pretrained_cfg"],
                              **cfg["model_args"])                                  # then load_state_dict

`timm.create_model(cfg["architecture"], num_classes=0)` alone builds timm's default geometry
(224 px, patch 16, ViT-Tiny's widths), which does not fit an export of another geometry, and
without `pretrained_cfg` timm reports its own defaults (224 px, mean/std 0.5) instead of the
run's preprocessing. Encoders timm has no model for are exported under a name timm does not
know (`lejepa_only_...`), so `local-dir:` stops with "Unknown model (lejepa_only_...)" instead
of building a different network; `timm_incompatibility` says why, per architecture.
"""

from __future__ import annotations

from typing import Any, Iterable

# Our ViT sizes -> the timm model with the same widths; patch / image size go in model_args.
TIMM_VIT = {
    "vit_nano": "vit_tiny_patch16_224",  # narrower, shallower tinies: model_args carry their sizes
    "vit_micro": "vit_tiny_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}
TIMM_RESNETS = ("resnet18", "resnet50")
LEJEPA_ONLY_PREFIX = "lejepa_only_"


def timm_incompatibility(arch: dict[str, Any]) -> str | None:
    """Why timm cannot build this encoder (one clause), or None when it can."""
    name = arch["arch"]
    if name in TIMM_VIT:
        return None
    if name not in TIMM_RESNETS:
        return f"timm has no model with {name}'s layer widths"
    if arch.get("small_stem"):
        stride = arch.get("stem_stride", 1)
        return (f"its 3x3 stride-{stride} stem without max-pool (model.small_stem) is not timm's {name} stem "
                f"(7x7 stride 2 + max-pool), so the weights would load into a different network")
    if arch.get("head_width"):
        return f"timm's {name} has no widening 1x1 head (model.head_width={arch['head_width']})"
    return None


def timm_compatible(arch: dict[str, Any]) -> bool:
    """True when timm builds this encoder and its weights load there strictly."""
    return timm_incompatibility(arch) is None


def timm_architecture(arch: dict[str, Any]) -> str:
    """The `architecture` written to config.json: timm's model name, or a lejepa_only_ name timm rejects."""
    name = arch["arch"]
    if name in TIMM_VIT:
        return TIMM_VIT[name]
    if timm_compatible(arch):
        return name
    parts = [name]
    if arch.get("small_stem"):
        parts.append(f"small_stem{arch.get('stem_stride', 1)}")
    if arch.get("head_width"):
        parts.append(f"head{arch['head_width']}")
    return LEJEPA_ONLY_PREFIX + "_".join(parts)


def timm_config(arch: dict[str, Any], *, num_features: int, mean: Iterable[float], std: Iterable[float]) -> dict[str, Any]:
    """config.json fields in timm's hub form (architecture, model_args, pretrained_cfg, ...).

    The pretrained_cfg keys follow timm 1.0's `PretrainedCfg`; the preprocessing it describes is
    lejepa's eval transform (resize the whole image, bilinear, no crop).
    """
    size, chans = int(arch["img_size"]), int(arch.get("in_chans", 3))
    if arch["arch"] in TIMM_VIT:
        # dynamic_img_size: timm then resamples pos_embed per input as our ViT does.
        model_args = {"img_size": size, "patch_size": int(arch["patch_size"]), "in_chans": chans, "dynamic_img_size": True}
        if arch["arch"] in ("vit_nano", "vit_micro"):
            from lejepa_cli.models.vit import VIT_SIZES

            dim, depth, heads = VIT_SIZES[arch["arch"]]
            model_args.update(embed_dim=dim, depth=depth, num_heads=heads)
        pool, first_conv, classifier, pool_size = "token", "patch_embed.proj", "head", None
    else:
        model_args = {"in_chans": chans}
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
    return {"architecture": timm_architecture(arch), "num_classes": 0, "num_features": int(num_features),
            "global_pool": pool, "model_args": model_args, "pretrained_cfg": pretrained_cfg}


def timm_hint(arch: dict[str, Any], folder: str) -> str:
    """What to type to load an export in timm, or precisely why timm cannot (for the CLI)."""
    reason = timm_incompatibility(arch)
    if reason is not None:
        return f"not loadable in timm: {reason}; load it with lejepa_cli.load_encoder('{folder}')"
    return (f"timm: timm.create_model('local-dir:{folder}', pretrained=True, num_classes=0) loads the weights "
            f"and this run's input size / mean / std (resolve_data_config reads them)")
