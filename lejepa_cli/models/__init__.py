"""Backbones and the projector behind one small API used by training, probing and export.

    from lejepa_cli.models import build_backbone, build_projector
    enc = build_backbone("vit_small", img_size=224, patch_size=16, drop_path=0.1)
    proj = build_projector(enc.embed_dim, 2048, 128)
    z = proj(enc(images))                    # (N, 128): what the loss reads
    feats = enc.probe_features(images)       # (N, enc.feature_dim): what probes read
    same = build_backbone(**enc.arch_config())  # rebuild from the JSON stored with exports

Every backbone has `arch`, `embed_dim` (dim of h), `feature_dim` (dim of probe features),
`in_chans`, `img_size`, `patch_size` (None for CNNs) and `forward`, `probe_features`,
`patch_tokens`, `arch_config`, `set_grad_checkpointing`, `no_weight_decay`. Parameter names
equal timm's, so exporting to timm needs no key renaming.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from lejepa_cli.errors import UserError

from lejepa_cli.models.projector import Projector
from lejepa_cli.models.resnet import BasicBlock, Bottleneck, ResNet
from lejepa_cli.models.vit import VIT_SIZES, VisionTransformer

if TYPE_CHECKING:  # config imports ARCHS from here: a type-only import keeps the graph acyclic
    from lejepa_cli.config import Config

# name -> (blocks per stage, block, first stage's width)
_RESNETS: dict[str, tuple[tuple[int, int, int, int], type, int]] = {
    "resnet_micro": ((1, 1, 1, 1), BasicBlock, 32),  # not a timm size: 28-32 px images on a CPU
    "resnet18": ((2, 2, 2, 2), BasicBlock, 64),
    "resnet50": ((3, 4, 6, 3), Bottleneck, 64),
}

ARCHS: tuple[str, ...] = tuple(VIT_SIZES) + tuple(_RESNETS)

__all__ = ["ARCHS", "Projector", "ResNet", "VisionTransformer", "build_backbone", "build_backbone_from_config", "build_projector",
           "build_projector_from_config"]


def build_backbone(
    arch: str,
    *,
    img_size: int,
    patch_size: int = 16,
    in_chans: int = 3,
    drop_path: float = 0.0,
    small_stem: bool = False,
    stem_stride: int = 1,
    head_width: int = 0,
) -> nn.Module:
    """Build a backbone by name.

    ViTs use `patch_size` and `drop_path` (stochastic depth rising linearly to it over depth)
    and ignore `small_stem`; ResNets use `small_stem` (and `stem_stride`, the small stem's
    stride) and `head_width` (a 1x1 widening conv before the pool, 0: none) and ignore
    `patch_size` and `drop_path` (the recipe's drop-path is a ViT setting). `img_size` is the
    ViT's native grid (other multiples of the patch are accepted at run time); for a ResNet it
    is informational.
    """
    if arch in VIT_SIZES:
        dim, depth, heads = VIT_SIZES[arch]
        return VisionTransformer(
            arch=arch,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            drop_path=drop_path,
        )
    if arch in _RESNETS:
        layers, block, width = _RESNETS[arch]
        return ResNet(arch=arch, layers=layers, block=block, width=width, img_size=img_size, in_chans=in_chans,
                      small_stem=small_stem, stem_stride=stem_stride, head_width=head_width)
    raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


def build_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> Projector:
    """The LeJEPA projector h -> z: Linear-BN-ReLU-Linear-BN-ReLU-Linear."""
    return Projector(in_dim, hidden_dim, out_dim)


def build_backbone_from_config(cfg: Config, in_chans: int) -> nn.Module:
    """The backbone a run's config describes (`model.*`, sized by `views.global_size`, or for
    objective world by `world.frame_size`)."""
    m, views = cfg.model, cfg.views
    if cfg.objective == "world":  # whole frames, no views
        side, sizes = cfg.world.frame_size, {"world.frame_size": cfg.world.frame_size}
    else:
        side, sizes = views.global_size, {"views.global_size": views.global_size}
        if views.local_views > 0:
            sizes["views.local_size"] = views.local_size
    if m.arch.startswith("vit"):
        for key, size in sizes.items():
            if size % m.patch_size:
                raise UserError(f"config key '{key}' = {size} must be a multiple of model.patch_size = {m.patch_size}")
    backbone = build_backbone(
        m.arch, img_size=side, patch_size=m.patch_size, in_chans=in_chans,
        drop_path=m.drop_path, small_stem=m.small_stem, stem_stride=m.stem_stride, head_width=m.head_width,
    )
    if m.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def build_projector_from_config(cfg: Config, embed_dim: int) -> nn.Module:
    """The projector a run's config describes (`model.proj_hidden`, `model.proj_dim`)."""
    return build_projector(embed_dim, cfg.model.proj_hidden, cfg.model.proj_dim)
