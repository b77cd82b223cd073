"""Sensor-corruption views: each op's statistics, gating, clamping, determinism, config and presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lejepa_cli.image import corruptions
from lejepa_cli.image import views as views_mod
from lejepa_cli.config import ViewsConfig, load_config
from lejepa_cli.errors import UserError
from lejepa_cli.image.views import make_views

RAW = {"mean": (0.0,), "std": (1.0,)}  # views stay in [0, 1]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain(**kw) -> ViewsConfig:
    """One whole-image global view, every other op off: only the corruptions under test act."""
    base = dict(global_views=1, local_views=0, global_size=16, local_size=8, global_scale=(1.0, 1.0),
                ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    return ViewsConfig(**{**base, **kw})


def _grey(n: int, value: int, c: int = 1, size: int = 16) -> torch.Tensor:
    return torch.full((n, c, size, size), value, dtype=torch.uint8)


def _views(images: torch.Tensor, cfg: ViewsConfig, seed: int = 0) -> torch.Tensor:
    c = images.shape[1]
    return make_views(images, cfg, generator=_gen(seed), mean=(0.0,) * c, std=(1.0,) * c)[0][0]  # (N, C, S, S)


ALL_ON = dict(noise_p=1.0, shot_noise_p=1.0, brightness_shift_p=1.0, contrast_shift_p=1.0, jpeg_p=1.0, dead_pixel_p=1.0)


def test_default_config_draws_nothing_more_and_runs_no_corruption(monkeypatch) -> None:
    """p = 0 everywhere (the default and every shipped preset): the corruption code never runs and
    the generator advances by exactly the view groups' own draws, so views are bit for bit those
    of the pipeline without corruptions."""
    monkeypatch.setattr(views_mod, "_corrupt", lambda *a, **k: pytest.fail("corruption ran with p = 0"))
    for preset in ("demo", "fmnist"):
        cfg = load_config(preset).views
        assert corruptions.active(cfg) == []
        images = torch.randint(0, 256, (4, 1, 28, 28), generator=_gen(1), dtype=torch.uint8)
        g = _gen(3)
        make_views(images, cfg, generator=g, mean=(0.5,), std=(0.25,))
        ref = _gen(3)
        torch.rand(cfg.global_views, 4, views_mod._NUM_DRAWS, generator=ref)
        if cfg.local_views:
            torch.rand(cfg.local_views, 4, views_mod._NUM_DRAWS, generator=ref)
        assert torch.equal(g.get_state(), ref.get_state())


def test_strength_keys_alone_change_nothing() -> None:
    images = torch.randint(0, 256, (6, 3, 20, 20), generator=_gen(2), dtype=torch.uint8)
    base = ViewsConfig(global_size=16, local_size=8)
    odd = dataclasses.replace(base, noise_std=(0.5, 0.9), jpeg_quality=(1.0, 2.0), brightness_shift=(0.9, 1.0))
    norm = {"mean": (0.5,) * 3, "std": (0.2,) * 3}
    a, b = make_views(images, base, generator=_gen(4), **norm), make_views(images, odd, generator=_gen(4), **norm)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gaussian_noise_has_the_requested_std() -> None:
    out = _views(_grey(64, 128), _plain(noise_p=1.0, noise_std=(0.08, 0.08)))
    assert abs(out.std().item() - 0.08) < 0.004
    assert abs(out.mean().item() - 128 / 255) < 0.003


def test_shot_noise_grows_with_the_signal_and_spares_black() -> None:
    cfg = _plain(shot_noise_p=1.0, shot_noise_std=(0.2, 0.2))
    quarter = _views(_grey(64, 64), cfg)  # x = 0.251: std 0.2 * sqrt(x) = 0.100
    assert abs(quarter.std().item() - 0.2 * (64 / 255) ** 0.5) < 0.005
    assert torch.equal(_views(_grey(8, 0), cfg), torch.zeros(8, 1, 16, 16))


def test_brightness_shift_moves_the_mean_by_the_offset_and_clamps() -> None:
    images = torch.randint(50, 150, (16, 1, 16, 16), generator=_gen(5), dtype=torch.uint8)
    clean = _views(images, _plain())
    shifted = _views(images, _plain(brightness_shift_p=1.0, brightness_shift=(0.3, 0.3)))
    assert torch.allclose(shifted - clean, torch.full_like(clean, 0.3), atol=1e-6)
    darker = _views(images, _plain(brightness_shift_p=1.0, brightness_shift=(-1.0, -1.0)))
    assert torch.equal(darker, torch.zeros_like(darker))


def test_contrast_shift_scales_the_spread_about_the_mean() -> None:
    images = torch.randint(60, 200, (16, 3, 16, 16), generator=_gen(6), dtype=torch.uint8)
    clean = _views(images, _plain())
    low = _views(images, _plain(contrast_shift_p=1.0, contrast_shift=(0.25, 0.25)))
    mean = clean.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(low.mean(dim=(1, 2, 3), keepdim=True), mean, atol=1e-5)
    assert torch.allclose(low - mean, 0.25 * (clean - mean), atol=1e-5)


def _block_dct(x: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) with S a multiple of 8 -> (B, C, S/8, S/8, 8, 8) orthonormal DCT coefficients."""
    b, c, h, w = x.shape
    d = corruptions._dct_matrix(x.device)
    blocks = x.view(b, c, h // 8, 8, w // 8, 8).transpose(3, 4)
    return d @ blocks @ d.T


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_blocks_remove_high_frequencies_within_each_8x8_block(channels: int) -> None:
    # Mid grey with faint texture: no clamping, so the output's block spectrum is the quantised one.
    texture = 0.5 + 0.02 * torch.randn(4, channels, 24, 24, generator=_gen(7))
    out = corruptions.jpeg_blocks(texture.clone(), torch.full((4,), 10.0))
    before, after = _block_dct(texture * 255), _block_dct(out * 255)
    u, v = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    high = (u + v) >= 4
    assert before[..., high].abs().mean() > 2.0  # the texture had high frequencies
    assert after[..., high].abs().max() < 1e-2  # all gone (up to float rounding)
    # Quality 100 (every table entry 1) is close to the identity: coefficient error <= 0.5 / 255.
    fine = corruptions.jpeg_blocks(texture.clone(), torch.full((4,), 100.0))
    assert (fine - texture).abs().max() < 3 / 255


def test_jpeg_tables_follow_libjpeg_quality_scaling() -> None:
    t = corruptions.jpeg_tables(torch.tensor([50.0, 100.0, 1.0, 75.0]))
    assert t[0, 0, 0, 0] == 16 and t[0, 1, 0, 0] == 17  # quality 50: the standard tables
    assert torch.all(t[1] == 1) and torch.all(t[2] == 255)
    assert t[3, 0, 0, 0] == 8  # (16 * 50 + 50) // 100


def test_jpeg_on_a_non_multiple_of_8_view_keeps_its_shape() -> None:
    out = _views(torch.randint(0, 256, (3, 3, 20, 20), generator=_gen(8), dtype=torch.uint8),
                 _plain(global_size=12, jpeg_p=1.0, jpeg_quality=(5.0, 5.0)))
    assert out.shape == (3, 3, 12, 12) and 0 <= out.min() and out.max() <= 1


def test_dead_pixels_stick_the_requested_fraction_in_every_channel() -> None:
    out = _views(_grey(64, 128, c=3), _plain(dead_pixel_p=1.0, dead_pixel_fraction=(0.1, 0.1)))
    dark, hot = (out == 0).all(dim=1), (out == 1).all(dim=1)  # (N, S, S): stuck in all channels at once
    assert abs(dark.float().mean().item() - 0.05) < 0.01 and abs(hot.float().mean().item() - 0.05) < 0.01
    untouched = ~(dark | hot)  # every other pixel keeps its value in every channel
    assert torch.all(out.permute(1, 0, 2, 3)[:, untouched] == 128 / 255)


@pytest.mark.parametrize("op", ["noise", "shot_noise", "brightness_shift", "contrast_shift", "jpeg", "dead_pixels"])
def test_probability_applies_to_about_p_of_samples(op: str) -> None:
    p_key, s_key = corruptions.OPS[op]
    strength = {"noise": (0.1, 0.1), "shot_noise": (0.2, 0.2), "brightness_shift": (0.2, 0.2),
                "contrast_shift": (0.2, 0.2), "jpeg": (5.0, 5.0), "dead_pixels": (0.2, 0.2)}[op]
    images = torch.randint(60, 200, (1500, 1, 8, 8), generator=_gen(9), dtype=torch.uint8)
    base = _plain(global_size=8)
    clean = _views(images, base)
    out = _views(images, dataclasses.replace(base, **{p_key: 0.3, s_key: strength}))
    changed = (out != clean).flatten(1).any(dim=1).float().mean().item()
    assert abs(changed - 0.3) < 0.045  # 4 binomial standard deviations


def test_every_op_stays_in_range_at_extreme_strengths() -> None:
    cfg = _plain(**ALL_ON, noise_std=(1.0, 1.0), shot_noise_std=(1.0, 1.0), brightness_shift=(0.9, 1.0),
                 contrast_shift=(0.0, 0.0), jpeg_quality=(1.0, 1.0), dead_pixel_fraction=(0.5, 0.5))
    out = _views(torch.randint(0, 256, (8, 3, 16, 16), generator=_gen(10), dtype=torch.uint8), cfg)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_corrupted_views_are_a_function_of_the_generator(monkeypatch) -> None:
    cfg = ViewsConfig(global_size=16, local_size=8, **{k: 0.5 for k in ALL_ON})
    images = torch.randint(0, 256, (6, 3, 20, 20), generator=_gen(11), dtype=torch.uint8)
    norm = {"mean": (0.5,) * 3, "std": (0.2,) * 3}
    before = torch.get_rng_state()
    a = make_views(images, cfg, generator=_gen(1), **norm)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never touched
    b = make_views(images, cfg, generator=_gen(1), **norm)
    c = make_views(images, cfg, generator=_gen(2), **norm)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.allclose(a[0], c[0])
    # The accelerator path (compute all, pick with `where`) gives the same views.
    monkeypatch.setattr(views_mod, "_select_by_index", lambda device: False)
    d = make_views(images, cfg, generator=_gen(1), **norm)
    assert torch.allclose(a[0], d[0], atol=1e-6) and torch.allclose(a[1], d[1], atol=1e-6)


@pytest.mark.parametrize("override", [
    "views.noise_p=1.5", "views.jpeg_p=-0.1", "views.noise_std=[0.3, 0.1]", "views.noise_std=[0.1, 2.0]",
    "views.brightness_shift=[-2, 0.5]", "views.contrast_shift=[0.5, 1.5]", "views.jpeg_quality=[0, 50]",
    "views.dead_pixel_fraction=[0.2, 0.1]", "views.shot_noise_std=0.1",
])
def test_bad_corruption_settings_are_one_line_errors(override: str) -> None:
    with pytest.raises(UserError, match="views."):
        load_config("demo", [override])


def test_presets_list_every_corruption_key_switched_off() -> None:
    from lejepa_cli.config import preset_path

    for preset in ("demo", "fmnist"):
        text = preset_path(preset).read_text()
        cfg = load_config(preset).views
        for p_key, s_key in corruptions.OPS.values():
            assert f"  {p_key}: 0.0" in text and f"  {s_key}: [" in text, (preset, p_key)
            assert getattr(cfg, p_key) == 0.0


def test_training_with_every_corruption_on_runs_and_its_checkpoint_keeps_the_settings(tmp_path) -> None:
    """A tiny run with all six ops at p = 0.5: finite losses, and the config round-trips through
    the checkpoint, which a resumed run rebuilds its config from."""
    import json

    from conftest import TINY
    from lejepa_cli.checkpoint import list_checkpoints, read_metadata
    from lejepa_cli.train import train

    sets = TINY + [f"views.{k}=0.5" for k in ALL_ON] + ["views.noise_std=[0.05, 0.3]", "views.jpeg_quality=[5, 40]"]
    out = tmp_path / "run"
    summary = train(load_config("demo", sets), out, progress=False)
    assert summary["step"] == 4
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(abs(v) < 1e6 for v in losses)
    saved = read_metadata(list_checkpoints(out / "checkpoints")[-1])["config"]["views"]
    assert saved["jpeg_p"] == 0.5 and saved["jpeg_quality"] == [5.0, 40.0] and saved["noise_std"] == [0.05, 0.3]


@pytest.mark.parametrize("which", ["all", "global", "local"])
def test_corrupt_views_picks_the_views_the_corruptions_hit(which: str) -> None:
    """corrupt_views: global keeps every local view clean (and local every global one): a grey image stays grey."""
    cfg = _plain(global_views=2, local_views=3, local_scale=(1.0, 1.0), noise_p=1.0, noise_std=(0.2, 0.2),
                 corrupt_views=which)
    g, loc = make_views(_grey(4, 128), cfg, generator=_gen(12), mean=(0.0,), std=(1.0,))
    noisy = {"global": bool(((g - 128 / 255).abs() > 0.01).any()), "local": bool(((loc - 128 / 255).abs() > 0.01).any())}
    assert noisy == {"global": which in ("all", "global"), "local": which in ("all", "local")}


def test_corrupt_views_rejects_an_unknown_choice() -> None:
    from lejepa_cli.config import load_config
    from lejepa_cli.errors import UserError

    with pytest.raises(UserError, match="corrupt_views"):
        load_config("demo", ["views.corrupt_views=some"])


def test_corrupt_views_global_is_all_when_every_view_is_global() -> None:
    """fmnist-robust's recipe has no local views: `global` and `all` give it the same views bit for bit."""
    from lejepa_cli.config import load_config

    views = load_config("fmnist-robust").views
    images = torch.randint(0, 256, (8, 1, 28, 28), generator=_gen(13), dtype=torch.uint8)
    a, b = (make_views(images, dataclasses.replace(views, corrupt_views=w), generator=_gen(3), mean=(0.3,), std=(0.3,))
            for w in ("all", "global"))
    assert views.local_views == 0 and torch.equal(a[0], b[0])
