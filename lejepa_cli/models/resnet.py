"""ResNet-18 / ResNet-50 (and the narrow ResNet-Micro) backbones with timm-identical parameter names, no classifier.

Names follow timm's `ResNet` (`conv1`, `bn1`, `layer{1..4}.{j}.conv{k}` / `bn{k}`,
`downsample.0` conv + `downsample.1` BN; BasicBlock for 18, Bottleneck with the stride in the
3x3 conv for 50), so a state dict loads into `timm.create_model("resnet50", num_classes=0)`
unchanged. `small_stem=True` swaps the 7x7/2 conv + max-pool stem for a 3x3/1 conv (the usual
CIFAR variant for 28-32 px images); `conv1` keeps its name but not timm's shape then.
`stem_stride=2` gives that small stem stride 2: every feature map is halved, so a 28 px image
costs about a quarter as much (for data whose detail survives a 14x14 first stage).
`width` is the first stage's channel count (64 in ResNet-18/50; stages double it): ResNet-Micro
(one BasicBlock per stage, width 32, 256-d features) is not a timm model but is named the same way.
`head_width > 0` adds a 1x1 conv + BN + ReLU that widens the last feature map before the pool
(MobileNet/EfficientNet's `conv_head`): wide features for a narrow network without widening its 3x3
convs (ResNet-Micro, 256 -> 2048 on a 2x2 map: 2 M multiply-adds beside its 14 M per 28 px view, a
~20 % slower step with the wider projector input; Fashion-MNIST linear 0.878 vs 0.862 at 525 steps).

    net = ResNet(arch="resnet18", layers=(2, 2, 2, 2), block=BasicBlock, small_stem=True)
    h = net(images)                 # (N, 512) global-average-pooled features
    tokens = net.patch_tokens(images)  # (N, H*W, 512) last feature map, row-major
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class BasicBlock(nn.Module):
    """Two 3x3 convs; ResNet-18/34 block."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand x4; ResNet-50 block."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running stats unchanged while a checkpointed stage is recomputed.

    Recomputation runs the stage's forward a second time in train mode; without this the
    running mean/var would take two momentum steps per training step.
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: exactly unchanged
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class ResNet(nn.Module):
    """ResNet encoder without `fc`. `forward` gives global-average-pooled features (N, embed_dim)."""

    def __init__(
        self,
        *,
        arch: str,
        layers: tuple[int, int, int, int],
        block: type[BasicBlock] | type[Bottleneck],
        img_size: int = 224,
        in_chans: int = 3,
        small_stem: bool = False,
        stem_stride: int = 1,
        width: int = 64,
        head_width: int = 0,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.img_size = img_size  # informational: a CNN takes any resolution
        self.patch_size = None  # not a patch model; kept so every backbone has the same attributes
        self.in_chans = in_chans
        self.small_stem = small_stem
        if stem_stride != 1 and not small_stem:
            raise ValueError("stem_stride applies to the small stem only (small_stem=True)")
        self.stem_stride = stem_stride
        self.grad_checkpointing = False

        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, width, 3, stride=stem_stride, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)

        inplanes = width
        stage_widths = (width, 2 * width, 4 * width, 8 * width)
        for i, (planes, n_blocks, stride) in enumerate(zip(stage_widths, layers, (1, 2, 2, 2))):
            stage, inplanes = self._make_stage(block, inplanes, planes, n_blocks, stride)
            self.add_module(f"layer{i + 1}", stage)
        self.head_width = head_width
        if head_width:
            self.conv_head = nn.Conv2d(inplanes, head_width, 1, bias=False)
            self.bn_head = nn.BatchNorm2d(head_width)
            self.act_head = nn.ReLU(inplace=True)
            inplanes = head_width
        self.embed_dim = inplanes
        self.feature_dim = inplanes
        self._init_weights(zero_init_last)

    @staticmethod
    def _make_stage(block, inplanes: int, planes: int, n_blocks: int, stride: int) -> tuple[nn.Sequential, int]:
        outplanes = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != outplanes:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), nn.BatchNorm2d(outplanes)
            )
        blocks = [block(inplanes, planes, stride, downsample)]
        blocks += [block(outplanes, planes) for _ in range(n_blocks - 1)]
        return nn.Sequential(*blocks), outplanes

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            # Each residual block starts as the identity, which steadies early training.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    # --- public API -------------------------------------------------------------------------

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) -> last feature map (N, embed_dim, H/32, W/32; H/(8 * stem_stride) with small_stem),
        through the widening head when there is one."""
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if use_ckpt:
                x = checkpoint(
                    stage,
                    x,
                    use_reentrant=False,
                    context_fn=lambda s=stage: (contextlib.nullcontext(), _bn_stats_frozen(s)),
                )
            else:
                x = stage(x)
        if self.head_width:
            x = self.act_head(self.bn_head(self.conv_head(x)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> embedding h (N, embed_dim): global average pool of the last feature map."""
        return self.feature_map(x).mean(dim=(2, 3))

    def probe_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (N, feature_dim): the pooled features (the CNN probe reads h itself)."""
        return self.forward(x)

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> (N, H*W, embed_dim): the last feature map's positions as tokens, row-major."""
        return self.feature_map(x).flatten(2).transpose(1, 2)

    def arch_config(self) -> dict:
        """JSON-serialisable kwargs that rebuild this backbone with `build_backbone(**cfg)`."""
        return {"arch": self.arch, "img_size": self.img_size, "in_chans": self.in_chans, "small_stem": self.small_stem,
                "stem_stride": self.stem_stride, "head_width": self.head_width}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage (layer1..layer4) in backward instead of storing its activations.

        BatchNorm running statistics are updated once per step, as without checkpointing.
        """
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names (besides biases and norms) that the optimizer should not decay: none."""
        return set()
