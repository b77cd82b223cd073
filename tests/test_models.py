"""Model zoo: shapes, gradients, drop-path, checkpointing, config round-trip, timm key names."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lejepa_cli.models import ARCHS, Projector, build_backbone, build_projector
from lejepa_cli.models.vit import DropPath


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every output direction.

    (Sums or squared norms of a LayerNorm output are constant in its input, so their gradients
    would be zero up to rounding and prove nothing.)
    """
    w = torch.randn(out.shape[-1], generator=torch.Generator().manual_seed(123))
    return (out * w).sum()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- ViT ---------------------------------------------------------------------------------------

VIT_CASES = [  # (arch, patch, native img, local img)
    ("vit_nano", 8, 32, 16),
    ("vit_micro", 4, 32, 16),
    ("vit_tiny", 4, 32, 16),
    ("vit_small", 4, 32, 16),
    ("vit_tiny", 16, 64, 32),
    ("vit_small", 16, 64, 32),
]


@pytest.mark.parametrize("arch,patch,img,local", VIT_CASES)
def test_vit_shapes_and_backward_at_both_resolutions(arch: str, patch: int, img: int, local: int) -> None:
    torch.manual_seed(0)
    m = build_backbone(arch, img_size=img, patch_size=patch, drop_path=0.1)
    d = m.embed_dim
    assert m.feature_dim == 2 * d and m.patch_size == patch and m.img_size == img and m.in_chans == 3
    loss = 0.0
    for side in (img, local):
        x = torch.randn(2, 3, side, side)
        h = m(x)
        assert h.shape == (2, d)
        assert m.probe_features(x).shape == (2, 2 * d)
        assert m.patch_tokens(x).shape == (2, (side // patch) ** 2, d)
        loss = loss + _loss(h)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_vit_rejects_inputs_that_are_not_a_patch_multiple() -> None:
    m = build_backbone("vit_tiny", img_size=32, patch_size=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        m(torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_backbone("vit_tiny", img_size=30, patch_size=4)


def test_pos_embed_gets_gradient_from_local_view_only() -> None:
    torch.manual_seed(0)
    m = build_backbone("vit_tiny", img_size=32, patch_size=4)
    _loss(m(torch.randn(2, 3, 16, 16))).backward()  # 4x4 grid, native is 8x8
    g = m.pos_embed.grad  # (1, 1 + 64, 192)
    assert g.shape == (1, 65, 192)
    assert g[0, 0].abs().sum() > 0  # CLS slot
    # Antialiased bicubic downsampling spreads every local position over the native grid.
    assert (g[0, 1:].abs().sum(-1) > 0).all()


def test_pos_embed_resampling_keeps_a_constant_grid_constant() -> None:
    m = build_backbone("vit_tiny", img_size=32, patch_size=4)
    with torch.no_grad():
        m.pos_embed[0, 1:] = torch.arange(192.0)  # every grid position holds the same vector
    for h, w in [(4, 4), (2, 6), (12, 12)]:
        pe = m._pos_embed_for(h, w)  # (1, 1 + h*w, D)
        assert pe.shape == (1, 1 + h * w, 192)
        torch.testing.assert_close(pe[0, 0], m.pos_embed[0, 0])
        torch.testing.assert_close(pe[0, 1:], torch.arange(192.0).expand(h * w, -1), atol=1e-4, rtol=0)
    assert m._pos_embed_for(8, 8) is m.pos_embed  # native grid: no resampling at all


def test_vit_under_bf16_autocast_at_local_resolution() -> None:
    m = build_backbone("vit_tiny", img_size=32, patch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = m(torch.randn(2, 3, 16, 16))
    assert h.shape == (2, 192) and torch.isfinite(h.float()).all()


def test_probe_features_are_normed_cls_of_last_two_blocks() -> None:
    torch.manual_seed(0)
    m = build_backbone("vit_tiny", img_size=16, patch_size=4).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        f = m.probe_features(x)
        t = m._tokens(x)
        for blk in m.blocks[:-1]:
            t = blk(t)
        prev_cls = m.norm(t[:, 0])
        last_cls = m.norm(m.blocks[-1](t)[:, 0])
        torch.testing.assert_close(f, torch.cat([prev_cls, last_cls], -1))
        torch.testing.assert_close(f[:, 192:], m(x))  # second half is h itself


# --- drop-path -----------------------------------------------------------------------------------


def test_drop_path_module_drops_whole_samples_and_rescales() -> None:
    torch.manual_seed(0)
    dp = DropPath(0.5)
    x = torch.ones(4000, 3, 2)
    y = dp(x)
    per_sample = y.reshape(4000, -1)
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.5) < 0.05
    assert dp.eval()(x) is x


def test_vit_drop_path_schedule_and_train_vs_eval() -> None:
    torch.manual_seed(0)
    m = build_backbone("vit_tiny", img_size=16, patch_size=4, drop_path=0.5)
    rates = [b.drop_path1.p for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)
    assert all(b - a == pytest.approx(0.5 / 11) for a, b in zip(rates, rates[1:]))
    plain = build_backbone("vit_tiny", img_size=16, patch_size=4, drop_path=0.0)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(8, 3, 16, 16)
    m.eval()
    torch.testing.assert_close(m(x), plain.eval()(x))  # eval: drop-path is the identity
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    assert torch.equal(a, m(x))  # train: random, but reproducible from the seed
    assert not torch.allclose(a, m(x))


# --- gradient checkpointing ------------------------------------------------------------------------


def test_vit_grad_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    m = build_backbone("vit_tiny", img_size=16, patch_size=4, drop_path=0.3).train()
    x = torch.randn(4, 3, 16, 16)
    results = []
    for enable in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(enable)
        torch.manual_seed(7)  # same drop-path masks in both runs
        loss = _loss(m(x)) + _loss(m.probe_features(x))
        loss.backward()
        results.append((loss.detach(), _grads(m)))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(m.parameters()))
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-5, rtol=1e-5, msg=k)


def test_resnet_grad_checkpointing_same_gradients_and_bn_stats() -> None:
    torch.manual_seed(0)
    ref = build_backbone("resnet18", img_size=16, small_stem=True).train()
    ckpt = build_backbone("resnet18", img_size=16, small_stem=True).train()
    ckpt.load_state_dict(ref.state_dict())
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 16, 16)
    for m in (ref, ckpt):
        _loss(m(x)).backward()
    g_ref, g_ckpt = _grads(ref), _grads(ckpt)
    assert g_ref.keys() == g_ckpt.keys()
    for k in g_ref:
        torch.testing.assert_close(g_ref[k], g_ckpt[k], atol=1e-5, rtol=1e-5, msg=k)
    # Recomputation must not move BatchNorm running stats a second time.
    for (k, a), (_, b) in zip(ref.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), k
    assert ckpt.layer1[0].bn1.momentum == 0.1


# --- ResNet --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,small_stem,side,grid",
    [("resnet18", True, 32, 4), ("resnet18", False, 64, 2), ("resnet50", False, 64, 2), ("resnet_micro", True, 28, 4)],
)
def test_resnet_shapes_and_backward(arch: str, small_stem: bool, side: int, grid: int) -> None:
    torch.manual_seed(0)
    m = build_backbone(arch, img_size=side, small_stem=small_stem)
    d = {"resnet18": 512, "resnet50": 2048, "resnet_micro": 256}[arch]
    assert m.embed_dim == m.feature_dim == d
    x = torch.randn(2, 3, side, side)
    h = m(x)
    assert h.shape == (2, d)
    assert m.probe_features(x).shape == (2, d)
    tokens = m.patch_tokens(x)
    assert tokens.shape == (2, grid * grid, d)
    torch.testing.assert_close(tokens.mean(1), h)  # h is the mean of the tokens
    _loss(h).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.conv1.weight.grad.abs().sum() > 0


def test_resnet_small_stem_layout() -> None:
    m = build_backbone("resnet18", img_size=32, small_stem=True)
    assert m.conv1.weight.shape == (64, 3, 3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert m.layer1[0].bn2.weight.abs().sum() == 0  # zero-init last BN gamma per block


def test_resnet_micro_is_one_narrow_block_per_stage() -> None:
    m = build_backbone("resnet_micro", img_size=28, small_stem=True, in_chans=1)
    assert m.conv1.weight.shape == (32, 1, 3, 3)
    assert [len(s) for s in (m.layer1, m.layer2, m.layer3, m.layer4)] == [1, 1, 1, 1]
    assert [s[0].conv2.out_channels for s in (m.layer1, m.layer2, m.layer3, m.layer4)] == [32, 64, 128, 256]
    assert build_backbone(**m.arch_config()).state_dict().keys() == m.state_dict().keys()


def test_resnet_stem_stride_two_halves_every_feature_map() -> None:
    torch.manual_seed(0)
    full = build_backbone("resnet_micro", img_size=28, small_stem=True, in_chans=1)
    half = build_backbone("resnet_micro", img_size=28, small_stem=True, stem_stride=2, in_chans=1)
    assert half.conv1.stride == (2, 2) and half.state_dict().keys() == full.state_dict().keys()
    x = torch.randn(2, 1, 28, 28)
    assert full.feature_map(x).shape[-2:] == (4, 4) and half.feature_map(x).shape[-2:] == (2, 2)
    assert half(x).shape == (2, 256)
    again = build_backbone(**half.arch_config())
    again.load_state_dict(half.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), half.eval()(x))
    with pytest.raises(ValueError, match="small stem"):
        build_backbone("resnet18", img_size=224, stem_stride=2)


def test_resnet_head_widens_the_pooled_features() -> None:
    torch.manual_seed(0)
    plain = build_backbone("resnet_micro", img_size=28, small_stem=True, stem_stride=2, in_chans=1)
    wide = build_backbone("resnet_micro", img_size=28, small_stem=True, stem_stride=2, in_chans=1, head_width=96)
    assert plain.head_width == 0 and not hasattr(plain, "conv_head")
    assert wide.conv_head.weight.shape == (96, 256, 1, 1) and wide.embed_dim == wide.feature_dim == 96
    x = torch.randn(4, 1, 28, 28)
    assert wide(x).shape == (4, 96) and wide.patch_tokens(x).shape == (4, 4, 96)
    assert (wide(x) >= 0).all()  # pooled after the head's ReLU
    # The head reads the same trunk: with the plain network's weights, the trunk's output is unchanged.
    wide.load_state_dict(plain.state_dict(), strict=False)
    trunk = wide.layer4(wide.layer3(wide.layer2(wide.layer1(wide.act1(wide.bn1(wide.conv1(x)))))))
    torch.testing.assert_close(trunk.mean(dim=(2, 3)), plain(x))
    again = build_backbone(**wide.arch_config())
    again.load_state_dict(wide.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x), wide.eval()(x))


def test_resnet_accepts_channels_last() -> None:
    torch.manual_seed(0)
    m = build_backbone("resnet18", img_size=32, small_stem=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        m_cl = m.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(m_cl(x_cl), ref, atol=1e-5, rtol=1e-5)
        assert m_cl.patch_tokens(x_cl).shape == (2, 16, 512)
    _loss(m_cl.train()(x_cl)).backward()
    assert m_cl.conv1.weight.grad is not None


# --- projector -----------------------------------------------------------------------------------


def test_projector_layout_and_shapes() -> None:
    p = build_projector(192, 64, 16)
    assert isinstance(p, Projector)
    kinds = [type(m) for m in p.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert [p.net[i].out_features for i in (0, 3, 6)] == [64, 64, 16]
    h = torch.randn(8, 192, requires_grad=True)
    z = p(h)
    assert z.shape == (8, 16)
    _loss(z).backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert p(torch.randn(3, 4, 192)).shape == (3, 4, 16)  # (V, N, D) -> (V, N, K)
    assert Projector(384).net[-1].out_features == 128 and Projector(384).net[0].out_features == 2048


# --- public API ----------------------------------------------------------------------------------


def test_archs_and_unknown_arch() -> None:
    from lejepa_cli.config import ARCHS as CONFIG_ARCHS

    assert ARCHS == (
        "vit_nano", "vit_micro", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "resnet_micro", "resnet18", "resnet50"
    )
    assert set(ARCHS) == set(CONFIG_ARCHS)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_gigantic", img_size=32)


def test_no_weight_decay_names_exist() -> None:
    vit = build_backbone("vit_tiny", img_size=16, patch_size=4)
    assert vit.no_weight_decay() == {"pos_embed", "cls_token"}
    assert vit.no_weight_decay() <= dict(vit.named_parameters()).keys()
    assert build_backbone("resnet18", img_size=32).no_weight_decay() == set()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(arch="vit_tiny", img_size=32, patch_size=4, drop_path=0.1),
        dict(arch="resnet18", img_size=32, small_stem=True),
        dict(arch="resnet18", img_size=32, in_chans=1),
    ],
)
def test_arch_config_round_trip(kwargs: dict) -> None:
    torch.manual_seed(0)
    m = build_backbone(**kwargs)
    c = m.in_chans
    m.train()(torch.randn(4, c, 32, 32))  # move BN running stats away from their init
    cfg = json.loads(json.dumps(m.arch_config()))
    rebuilt = build_backbone(**cfg)
    assert rebuilt.arch_config() == cfg
    rebuilt.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, c, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), m.eval()(x), atol=0, rtol=0)
        torch.testing.assert_close(rebuilt.probe_features(x), m.probe_features(x), atol=0, rtol=0)


# --- timm compatibility (names and shapes; built on the meta device: no memory, no init cost) ---------


def _timm_vit_keys(depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for mod in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{mod}.weight", f"blocks.{i}.{mod}.bias"}
    return keys


def _timm_resnet_keys(layers: tuple[int, ...], n_convs: int) -> set[str]:
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in bn}
    for stage, n_blocks in enumerate(layers, start=1):
        for j in range(n_blocks):
            p = f"layer{stage}.{j}"
            for k in range(1, n_convs + 1):
                keys |= {f"{p}.conv{k}.weight"} | {f"{p}.bn{k}.{s}" for s in bn}
            if j == 0 and (stage > 1 or n_convs == 3):  # resnet18's layer1 needs no projection
                keys |= {f"{p}.downsample.0.weight"} | {f"{p}.downsample.1.{s}" for s in bn}
    return keys


def test_vit_small_state_dict_matches_timm_names() -> None:
    with torch.device("meta"):
        m = build_backbone("vit_small", img_size=224, patch_size=16)
    sd = m.state_dict()
    assert set(sd) == _timm_vit_keys(12)
    expected = {
        "cls_token": (1, 1, 384),
        "pos_embed": (1, 197, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16),
        "blocks.0.attn.qkv.weight": (1152, 384),
        "blocks.0.attn.qkv.bias": (1152,),
        "blocks.5.attn.proj.weight": (384, 384),
        "blocks.11.mlp.fc1.weight": (1536, 384),
        "blocks.11.mlp.fc2.weight": (384, 1536),
        "norm.weight": (384,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k


def test_resnet_state_dicts_match_timm_names() -> None:
    with torch.device("meta"):
        r50 = build_backbone("resnet50", img_size=224)
        r18 = build_backbone("resnet18", img_size=224)
    sd50, sd18 = r50.state_dict(), r18.state_dict()
    assert set(sd50) == _timm_resnet_keys((3, 4, 6, 3), 3)
    assert set(sd18) == _timm_resnet_keys((2, 2, 2, 2), 2)
    expected50 = {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_var": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.weight": (2048,),
    }
    for k, shape in expected50.items():
        assert tuple(sd50[k].shape) == shape, k
    assert r50.layer2[0].conv2.stride == (2, 2)  # timm puts the stride in the 3x3 conv
    assert tuple(sd18["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(sd18["layer4.1.conv2.weight"].shape) == (512, 512, 3, 3)
    assert sum(p.numel() for p in r18.parameters()) == 11_176_512  # timm resnet18, num_classes=0
    assert sum(p.numel() for p in r50.parameters()) == 23_508_032  # timm resnet50, num_classes=0


@pytest.mark.parametrize(
    "arch,patch,n_params",
    # Exact counts of timm's vit_*_patch{14,16}_224 with num_classes=0.
    [("vit_large", 14, 303_178_752), ("vit_huge", 14, 630_764_800), ("vit_base", 16, 85_798_656)],
)
def test_large_vits_on_meta_device(arch: str, patch: int, n_params: int) -> None:
    with torch.device("meta"):
        m = build_backbone(arch, img_size=224, patch_size=patch)
    assert sum(p.numel() for p in m.parameters()) == n_params
    assert m.pos_embed.shape == (1, 1 + (224 // patch) ** 2, m.embed_dim)
    assert m.feature_dim == 2 * m.embed_dim
