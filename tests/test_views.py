"""Multi-crop views: shapes, exact resume, crop geometry, anti-aliasing and each photometric op."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lejepa_cli.image import views as views_mod
from lejepa_cli.config import ViewsConfig
from lejepa_cli.image.views import make_views

RAW = {"mean": (0.0,), "std": (1.0,)}  # outputs stay in [0, 1]
PIXELS = {"mean": (0.0,), "std": (1 / 255,)}  # outputs in input pixel units


def _plain(**kw) -> ViewsConfig:
    """No randomness at all: one whole-image global view, every photometric op off."""
    base = dict(
        global_views=1, local_views=0, global_size=16, local_size=8, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
        flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
    )
    return ViewsConfig(**{**base, **kw})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), generator=_gen(seed), dtype=torch.uint8)


def _smooth_images(n: int = 8, c: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    """Photo-like: low-frequency colour fields, so blur barely changes the statistics."""
    coarse = torch.rand(n, c, 4, 4, generator=_gen(seed))
    return (F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 1) * 255).to(torch.uint8)


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", align_corners=False)


def _one(images: torch.Tensor, cfg: ViewsConfig, seed: int = 0, norm: dict = RAW) -> torch.Tensor:
    return make_views(images, cfg, generator=_gen(seed), **norm)[0][0]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("local_views", [0, 3])
def test_shapes_and_dtypes(channels: int, local_views: int) -> None:
    cfg = ViewsConfig(global_views=2, local_views=local_views, global_size=16, local_size=8)
    mean, std = (0.5,) * channels, (0.25,) * channels
    g, loc = make_views(_images(5, channels, 20, 12), cfg, mean=mean, std=std, generator=_gen())
    assert g.shape == (2, 5, channels, 16, 16) and g.dtype == torch.float32
    assert torch.isfinite(g).all()
    if local_views:
        assert loc is not None and loc.shape == (3, 5, channels, 8, 8) and loc.dtype == torch.float32
        assert torch.isfinite(loc).all()
    else:
        assert loc is None


def test_same_generator_state_gives_identical_views_and_global_rng_is_untouched() -> None:
    cfg = ViewsConfig(global_views=2, local_views=2, global_size=16, local_size=8)
    imgs = _images(6, 3, 24, 24)
    norm = {"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2)}
    before = torch.get_rng_state()
    a = make_views(imgs, cfg, generator=_gen(7), **norm)
    assert torch.equal(torch.get_rng_state(), before)
    b = make_views(imgs, cfg, generator=_gen(7), **norm)
    c = make_views(imgs, cfg, generator=_gen(8), **norm)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])
    # Resuming from a saved generator state reproduces the next step exactly.
    g = _gen(3)
    make_views(imgs, cfg, generator=g, **norm)
    state = g.get_state()
    nxt = make_views(imgs, cfg, generator=g, **norm)
    g2 = torch.Generator()
    g2.set_state(state)
    again = make_views(imgs, cfg, generator=g2, **norm)
    assert torch.equal(nxt[0], again[0]) and torch.equal(nxt[1], again[1])


def test_views_of_one_image_differ_from_each_other() -> None:
    g, loc = make_views(_images(2, 3, 32, 32), ViewsConfig(global_size=16, local_size=8), mean=(0.5,), std=(0.25,),
                        generator=_gen())
    assert not torch.allclose(g[0], g[1])
    assert all(not torch.allclose(loc[0], loc[i]) for i in range(1, loc.shape[0]))


@pytest.mark.parametrize("side", [12, 16, 24, 32])  # up- and down-scaling up to 2x: plain bilinear
def test_plain_view_is_the_normalised_bilinear_resize(side: int) -> None:
    imgs = _images(3, 3, side, side)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    out = make_views(imgs, _plain(), mean=mean, std=std, generator=_gen())[0][0]
    expected = (_resized(imgs, 16) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("h,w", [(12, 20), (20, 12)])
def test_full_scale_square_ratio_on_a_non_square_image_is_its_centre_square(h: int, w: int) -> None:
    imgs = _images(2, 1, h, w)
    side, top, left = min(h, w), (h - min(h, w)) // 2, (w - min(h, w)) // 2
    out = _one(imgs, _plain())
    torch.testing.assert_close(out, _resized(imgs[..., top : top + side, left : left + side], 16), atol=2e-5, rtol=0)


def test_crop_boxes_follow_the_random_resized_crop_rules() -> None:
    h, w, scale, ratio = 30, 50, (0.08, 0.6), (0.75, 4 / 3)
    u = torch.rand(4, 500, views_mod._NUM_DRAWS, generator=_gen())
    left, top, cw, ch = views_mod._crop_boxes(u, (h, w), scale, ratio)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + cw <= w + 1e-4).all() and (top + ch <= h + 1e-4).all()
    frac, r = cw * ch / (h * w), cw / ch
    assert (frac >= scale[0] - 1e-5).all() and (frac <= scale[1] + 1e-5).all()
    assert (r >= ratio[0] - 1e-5).all() and (r <= ratio[1] + 1e-5).all()
    assert left.std() > 3 and top.std() > 2  # positions spread over the image
    # No trial fits (a crop bigger than the image): torchvision's fallback, the centred ratio-trimmed image.
    left, top, cw, ch = views_mod._crop_boxes(u[:, :5], (20, 40), (1.0, 1.0), (1.0, 1.5))
    for got, want in ((cw, 30.0), (ch, 20.0), (left, 5.0), (top, 0.0)):
        torch.testing.assert_close(got, torch.full_like(got, want))


def test_crops_and_flips_land_where_the_drawn_boxes_say() -> None:
    # Channel 0 ramps with x, channel 1 with y: bilinear sampling reads back the sample position.
    n, side, size = 6, 64, 48
    ramp = torch.arange(side, dtype=torch.float32) * 4
    img = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    img[:, 0] = ramp.view(1, side).to(torch.uint8)
    img[:, 1] = ramp.view(side, 1).to(torch.uint8)
    cfg = _plain(global_views=3, global_size=size, global_scale=(0.2, 0.9), ratio=(0.6, 1.6), flip_p=0.5)
    out = make_views(img, cfg, generator=_gen(5), **PIXELS)[0]  # (V, N, 3, S, S)

    u = torch.rand(3, n, views_mod._NUM_DRAWS, generator=_gen(5))  # the draws make_views saw
    left, top, cw, ch = views_mod._crop_boxes(u, (side, side), cfg.global_scale, cfg.ratio)
    t = (torch.arange(size) + 0.5) / size
    flip = u[..., views_mod._C_FLIP] < 0.5
    assert flip.any() and (~flip).any()
    tx = torch.where(flip[..., None], 1 - t, t)

    def expected(start: torch.Tensor, length: torch.Tensor, frac: torch.Tensor) -> torch.Tensor:
        pos = start[..., None] + frac * length[..., None]
        pos = torch.minimum(torch.maximum(pos, start[..., None] + 0.5), (start + length)[..., None] - 0.5)
        return 4 * (pos - 0.5)  # ramp value at that pixel-centre coordinate

    torch.testing.assert_close(out[:, :, 0], expected(left, cw, tx)[:, :, None, :].expand_as(out[:, :, 0]),
                               atol=2e-3, rtol=0)
    torch.testing.assert_close(out[:, :, 1], expected(top, ch, t)[:, :, :, None].expand_as(out[:, :, 1]),
                               atol=2e-3, rtol=0)


@pytest.mark.parametrize("h,w", [(128, 128), (97, 131)])
def test_large_downscale_is_antialiased(h: int, w: int) -> None:
    # White noise shrunk 6-8x: averaging the footprint leaves std ~0.29/6; two bilinear taps ~0.29/2.
    noise = _images(4, 1, h, w)
    out = _one(noise, _plain(global_size=16))
    assert out.std() < 0.07
    assert _resized(noise, 16).std() > 0.1  # what plain bilinear would give
    assert abs(out.mean() - noise.float().mean() / 255) < 0.01
    # A power-of-two factor reads one mip level at its pixel centres: exactly area averaging.
    # Other factors blend two pixels of the level just finer than the footprint, a slightly wider filter.
    smooth = _smooth_images(2, 3, 128)[..., :h, :w].contiguous()
    side, top, left = min(h, w), (h - min(h, w)) // 2, (w - min(h, w)) // 2
    square = smooth[..., top : top + side, left : left + side].float() / 255
    out = _one(smooth, _plain(global_size=16))
    if side == 128:
        torch.testing.assert_close(out, F.interpolate(square, size=(16, 16), mode="area"), atol=1e-5, rtol=0)
    ref = F.interpolate(square, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert (out - ref).abs().mean() < 0.02


def test_mip_levels_keep_the_crop_location() -> None:
    # 256 px crops read from coarse mip levels still centre on their box.
    side = 256
    img = torch.arange(side, dtype=torch.uint8).view(1, 1, 1, side).expand(3, 3, side, side).contiguous()
    cfg = _plain(global_views=4, global_size=16, global_scale=(0.3, 0.9), ratio=(0.75, 4 / 3))
    out = make_views(img, cfg, generator=_gen(2), **PIXELS)[0]  # (V, N, 3, 16, 16)
    u = torch.rand(4, 3, views_mod._NUM_DRAWS, generator=_gen(2))
    left, _, cw, _ = views_mod._crop_boxes(u, (side, side), cfg.global_scale, cfg.ratio)
    centre = left + cw / 2 - 0.5
    assert (out[:, :, 0].mean(dim=(-2, -1)) - centre).abs().max() < 1.0


def test_flip_mirrors_the_view() -> None:
    imgs = _images(4, 3, 20, 20)
    cfg = _plain(global_views=2, global_scale=(0.3, 1.0), ratio=(0.75, 4 / 3))
    plain = make_views(imgs, cfg, generator=_gen(1), **RAW)[0]
    flipped = make_views(imgs, dataclasses.replace(cfg, flip_p=1.0), generator=_gen(1), **RAW)[0]
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-5, rtol=0)


def test_solarize_at_threshold_zero_inverts() -> None:
    imgs = _images(3, 3, 16, 16)
    out = _one(imgs, _plain(solarize_p=1.0, solarize_threshold=0))
    torch.testing.assert_close(out, 1 - _resized(imgs, 16), atol=2e-5, rtol=0)
    # At 128 only the bright half flips.
    half = _one(imgs, _plain(solarize_p=1.0, solarize_threshold=128))
    ref = _resized(imgs, 16)
    clear = (ref - 128 / 255).abs() > 1e-4  # pixels on the threshold may go either way by rounding
    torch.testing.assert_close(half[clear], torch.where(ref >= 128 / 255, 1 - ref, ref)[clear], atol=2e-5, rtol=0)


def test_grayscale_gives_equal_channels_with_the_luma() -> None:
    imgs = _images(3, 3, 16, 16)
    out = _one(imgs, _plain(grayscale_p=1.0))
    ref = _resized(imgs, 16)
    luma = 0.2989 * ref[:, 0] + 0.587 * ref[:, 1] + 0.114 * ref[:, 2]
    for ch in range(3):
        torch.testing.assert_close(out[:, ch], luma, atol=2e-5, rtol=0)


def _high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    lap = x[..., 1:-1, 1:-1] * 4 - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.pow(2).mean(dim=(-3, -2, -1))


@pytest.mark.parametrize("size", [16, 8])
def test_blur_reduces_high_frequency_energy(size: int) -> None:
    imgs = _images(4, 3, size, size)
    sharp = _one(imgs, _plain(global_size=size))
    blurred = _one(imgs, _plain(global_size=size, blur_p=1.0, blur_sigma=(1.0, 2.0)))
    assert (_high_freq_energy(blurred) < 0.2 * _high_freq_energy(sharp)).all()
    # A blur averages: the mean survives, nothing leaves [0, 1].
    torch.testing.assert_close(blurred.mean(dim=(-2, -1)), sharp.mean(dim=(-2, -1)), atol=0.03, rtol=0)
    assert blurred.min() >= 0 and blurred.max() <= 1


def test_tiny_sigma_blur_is_nearly_the_identity() -> None:
    imgs = _images(2, 3, 16, 16)
    out = _one(imgs, _plain(blur_p=1.0, blur_sigma=(0.1, 0.1)))
    torch.testing.assert_close(out, _resized(imgs, 16), atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_jitter_changes_the_image_and_stays_in_range(channels: int) -> None:
    imgs = _images(6, channels, 16, 16)
    out = _one(imgs, _plain(jitter_p=1.0))
    ref = _resized(imgs, 16)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert ((out - ref).abs().mean(dim=(-3, -2, -1)) > 1e-3).all()  # every sample changed


def test_brightness_scales_each_sample_by_one_factor_in_range() -> None:
    imgs = (_images(8, 3, 16, 16).float() / 2).to(torch.uint8)  # <= 0.5: a factor <= 1.4 never clips
    out = _one(imgs, _plain(jitter_p=1.0, contrast=0.0, saturation=0.0, hue=0.0, brightness=0.4))
    ref = _resized(imgs, 16)
    factor = (out * ref).sum(dim=(-3, -2, -1)) / ref.pow(2).sum(dim=(-3, -2, -1))  # least squares
    torch.testing.assert_close(out, ref * factor.view(-1, 1, 1, 1), atol=1e-5, rtol=0)
    assert (factor >= 0.6 - 1e-6).all() and (factor <= 1.4 + 1e-6).all() and factor.std() > 0.05


def test_contrast_keeps_the_mean_luma_and_saturation_keeps_the_luma() -> None:
    imgs = (64 + _images(8, 3, 16, 16).float() / 2).to(torch.uint8)  # in [0.25, 0.75]: no clipping
    ref = _resized(imgs, 16)
    luma = lambda x: 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # noqa: E731
    con = _one(imgs, _plain(jitter_p=1.0, brightness=0.0, saturation=0.0, hue=0.0, contrast=0.4))
    torch.testing.assert_close(luma(con).mean(dim=(-2, -1)), luma(ref).mean(dim=(-2, -1)), atol=1e-4, rtol=0)
    assert not torch.allclose(con, ref, atol=1e-3)
    sat = _one(imgs, _plain(jitter_p=1.0, brightness=0.0, contrast=0.0, hue=0.0, saturation=0.2))
    torch.testing.assert_close(luma(sat), luma(ref), atol=1e-4, rtol=0)
    assert not torch.allclose(sat, ref, atol=1e-3)


def test_hue_rotation_keeps_grays_and_luma() -> None:
    gray = _images(4, 1, 16, 16).expand(4, 3, 16, 16).contiguous()
    cfg = _plain(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.1)
    torch.testing.assert_close(_one(gray, cfg), _resized(gray, 16), atol=1e-5, rtol=0)
    colour = (64 + _images(4, 3, 16, 16).float() / 4).to(torch.uint8)  # mild colours: stay in gamut
    out, ref = _one(colour, cfg), _resized(colour, 16)
    y = lambda x: 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # noqa: E731
    torch.testing.assert_close(y(out), y(ref), atol=1e-4, rtol=0)
    assert (out - ref).abs().max() > 0.01


def test_single_channel_jitter_is_brightness_then_contrast_clamped_once() -> None:
    imgs = _images(8, 1, 16, 16)
    out = _one(imgs, _plain(jitter_p=1.0), seed=3)
    u = torch.rand(1, 8, views_mod._NUM_DRAWS, generator=_gen(3))[0]  # the draws make_views saw
    b, c = (0.6 + 0.8 * u[:, views_mod._C_JITTER + k].view(-1, 1, 1, 1) for k in (1, 2))
    x = _resized(imgs, 16) * b
    x = c * x + (1 - c) * x.mean(dim=(-3, -2, -1), keepdim=True)
    torch.testing.assert_close(out, x.clamp(0, 1), atol=1e-5, rtol=0)


def test_single_channel_skips_colour_only_ops() -> None:
    imgs = _images(3, 1, 16, 16)
    out = _one(imgs, _plain(grayscale_p=1.0, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.5, hue=0.5))
    torch.testing.assert_close(out, _resized(imgs, 16), atol=2e-5, rtol=0)


def test_default_recipe_views_are_roughly_normalised() -> None:
    imgs = _smooth_images(16, 3, 24)
    x = imgs.float() / 255
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
    g, loc = make_views(imgs, ViewsConfig(global_size=16, local_size=8), mean=mean, std=std, generator=_gen())
    for v in (g, loc):
        assert v.mean().abs() < 0.3
        assert 0.6 < v.std() < 1.4


def test_index_and_where_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CPU computes gated ops on the chosen samples only; accelerators compute all and pick.
    cfg = ViewsConfig(global_size=16, local_size=8, jitter_p=0.5, grayscale_p=0.5, blur_p=0.5, solarize_p=0.5)
    imgs = _images(8, 3, 24, 24)
    by_index = make_views(imgs, cfg, mean=(0.5,), std=(0.25,), generator=_gen(4))
    monkeypatch.setattr(views_mod, "_select_by_index", lambda device: False)
    by_where = make_views(imgs, cfg, mean=(0.5,), std=(0.25,), generator=_gen(4))
    torch.testing.assert_close(by_index[0], by_where[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(by_index[1], by_where[1], atol=1e-5, rtol=0)


def test_autocast_region_still_gives_float32_views() -> None:
    cfg = ViewsConfig(global_size=16, local_size=8, jitter_p=1.0, blur_p=1.0)  # matmul, bmm: autocast candidates
    imgs = _images(4, 3, 24, 24)
    ref = make_views(imgs, cfg, mean=(0.5,), std=(0.25,), generator=_gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = make_views(imgs, cfg, mean=(0.5,), std=(0.25,), generator=_gen())
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_bad_inputs_are_rejected() -> None:
    cfg = _plain()
    with pytest.raises(ValueError, match="uint8"):
        make_views(torch.rand(2, 3, 8, 8), cfg, generator=_gen(), **RAW)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        make_views(_images(2, 2, 8, 8), cfg, generator=_gen(), **RAW)
    with pytest.raises(ValueError, match="mean/std"):
        make_views(_images(2, 3, 8, 8), cfg, mean=(0.5, 0.5), std=(0.2, 0.2), generator=_gen())


_ACCEL = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None


@pytest.mark.skipif(_ACCEL is None, reason="needs an accelerator")
def test_accelerator_views_are_deterministic_and_match_the_cpu_recipe() -> None:
    dev = _ACCEL
    imgs = _images(8, 3, 40, 40)
    cfg = ViewsConfig(global_size=32, local_size=16)
    a = make_views(imgs.to(dev), cfg, mean=(0.5,), std=(0.25,), generator=torch.Generator(dev).manual_seed(0))
    b = make_views(imgs.to(dev), cfg, mean=(0.5,), std=(0.25,), generator=torch.Generator(dev).manual_seed(0))
    assert a[0].device.type == dev.type and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Without randomness the device is the only difference.
    plain = _plain(global_size=32)
    gpu = make_views(imgs.to(dev), plain, generator=torch.Generator(dev).manual_seed(0), **RAW)[0]
    torch.testing.assert_close(gpu.cpu(), _one(imgs, plain), atol=1e-5, rtol=0)
