"""Config tree: defaults <- preset <- overrides, with one-line errors naming the key."""

from __future__ import annotations

import pytest
import yaml

from lejepa_cli.config import Config, config_from_dict, list_presets, load_config
from lejepa_cli.errors import UserError

REQUIRED = ["train.steps", "train.batch_size", "train.save_every", "train.seed", "optim.lr", "loss.lamb", "loss.num_slices"]


def test_required_keys_exist_and_override():
    cfg = load_config("demo", [f"{k}=3" for k in REQUIRED if k != "loss.lamb"] + ["loss.lamb=0.1"])
    assert cfg.train.steps == 3 and cfg.train.batch_size == 3 and cfg.optim.lr == 3.0 and cfg.loss.lamb == 0.1


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lr=abc", "'optim.lr'"),
        ("nosuch.key=1", "'nosuch.key'"),
        ("train.nosuch=1", "'train.nosuch'"),
        ("train.steps=0", "'train.steps'"),
        ("train.steps=2.5", "'train.steps'"),
        ("loss.lamb=1.5", "'loss.lamb'"),
        ("model.arch=vit_giant", "'model.arch'"),
        ("views.global_scale=[0.5]", "'views.global_scale'"),
        ("train.online_probe=maybe", "'train.online_probe'"),
        ("train", "key.sub=value"),
        ("model.stem_stride=3", "'model.stem_stride'"),
        ("model.stem_stride=2", "'model.stem_stride'"),  # the demo's ViT has no ResNet stem
        ("model.head_width=-1", "'model.head_width'"),
        ("model.head_width=64", "'model.head_width'"),  # nor a ResNet head
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(UserError) as info:
        load_config("demo", [override])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_every_preset_loads_and_round_trips():
    names = list_presets()
    for required in ("demo", "vit-t", "vit-s", "vit-b", "vit-l", "vit-h", "resnet18", "resnet50"):
        assert required in names
    for name in names:
        cfg = load_config(name)
        assert cfg.preset == name
        again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg


def test_unknown_preset_lists_choices():
    with pytest.raises(UserError, match="demo"):
        load_config("no-such-preset")


def test_every_preset_key_is_commented():
    from lejepa_cli.config import preset_path

    for name in list_presets():
        for line in preset_path(name).read_text().splitlines():
            if ":" in line and not line.lstrip().startswith("#") and line.startswith("  "):
                assert "#" in line, f"{name}: uncommented key line {line!r}"


def test_defaults_are_valid():
    from lejepa_cli.config import validate

    validate(Config())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_its_model(name):
    """Forward a tiny batch through each preset's backbone + projector; shapes only (meta) for the big ones."""
    import torch

    from lejepa_cli.models import build_backbone_from_config, build_projector_from_config

    cfg = load_config(name)
    big = cfg.model.arch in ("vit_base", "vit_large", "vit_huge", "resnet50")
    with torch.device("meta" if big else "cpu"):
        backbone = build_backbone_from_config(cfg, in_chans=3)
        projector = build_projector_from_config(cfg, backbone.embed_dim)
        size = cfg.views.global_size
        x = torch.zeros(2, 3, size, size)
        with torch.no_grad():
            h = backbone.eval()(x)
            z = projector.eval()(h)
    assert h.shape == (2, backbone.embed_dim) and z.shape == (2, cfg.model.proj_dim)
    if cfg.views.local_views and cfg.model.arch.startswith("vit") and not big:
        local = torch.zeros(2, 3, cfg.views.local_size, cfg.views.local_size)
        with torch.no_grad():
            assert backbone(local).shape == (2, backbone.embed_dim)


# ---- a world config's frame size and latent width under their old names ---------------------------------


@pytest.fixture
def notes(monkeypatch, capsys):
    """The deprecation notes printed from here on (each old name is reported once per process)."""
    from lejepa_cli import config

    monkeypatch.setattr(config, "_noted", set())
    capsys.readouterr()
    return lambda: [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]


def test_world_presets_use_the_world_keys_and_round_trip_silently(notes):
    cfg = load_config("world-tworoom")
    assert (cfg.world.frame_size, cfg.world.latent_dim) == (32, 64)
    assert (cfg.views.global_size, cfg.model.proj_dim) == (32, 64)  # mirrored: a saved config agrees with itself
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg and notes() == []


def test_old_names_in_a_world_config_are_read_with_one_note(notes):
    cfg = load_config("world-tworoom", ["views.global_size=16", "model.proj_dim=8"])  # --set over the preset
    assert (cfg.world.frame_size, cfg.world.latent_dim, cfg.views.global_size, cfg.model.proj_dim) == (16, 8, 16, 8)
    assert len(notes()) == 1
    load_config("world-tworoom", ["views.global_size=24"])
    assert notes() == []  # once per process


def test_a_config_saved_before_the_world_keys_loads_as_it_trained(notes):
    from lejepa_cli.config import apply_overrides

    old = load_config("world-tworoom").to_dict()
    for key in ("frame_size", "latent_dim"):
        del old["world"][key]
    old["views"]["global_size"], old["model"]["proj_dim"] = 48, 24
    cfg = config_from_dict(old)
    assert (cfg.world.frame_size, cfg.world.latent_dim) == (48, 24) and len(notes()) == 1
    later = apply_overrides(cfg, ["world.frame_size=40"])  # a later source wins over the saved old name
    assert (later.world.frame_size, later.views.global_size, later.world.latent_dim) == (40, 40, 24)


def test_both_names_disagreeing_in_one_source_is_an_error():
    with pytest.raises(UserError, match=r"'views.global_size' = 16 and 'world.frame_size' = 32 disagree"):
        load_config("world-tworoom", ["views.global_size=16", "world.frame_size=32"])
    assert load_config("world-tworoom", ["views.global_size=16", "world.frame_size=16"]).world.frame_size == 16


def test_image_configs_keep_their_views_and_projector_keys(notes):
    cfg = load_config("demo", ["world.frame_size=64", "world.latent_dim=8"])
    assert (cfg.views.global_size, cfg.model.proj_dim) == (load_config("demo").views.global_size, 128)
    assert notes() == []
