"""Export, timm key compatibility, ONNX, embed, load_encoder and --init-from, on a tiny trained run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from conftest import TINY
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint, split_prefix
from lejepa_cli.cli import main
from lejepa_cli.config import load_config
from lejepa_cli.errors import UserError
from lejepa_cli.image.evaluate import eval_transform
from lejepa_cli.export import (
    export_backbone, export_encoder, load_backbone_weights, load_encoder, resample_pos_embed,
)
from lejepa_cli.models import ARCHS, build_backbone
from lejepa_cli.train import train

MANIFEST = json.loads((Path(__file__).parent / "timm_manifest.json").read_text())
RUN_SETS = [o for o in TINY if not o.startswith(("train.steps", "train.save_every"))] + ["train.steps=2", "train.save_every=2"]


def cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    train(load_config("demo", RUN_SETS), out, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(run_dir) -> tuple[torch.nn.Module, dict]:
    """The training model's backbone, rebuilt from the checkpoint the way training stored it."""
    tensors, meta = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    backbone = build_backbone(**meta["backbone"])
    backbone.load_state_dict(split_prefix(tensors, "model.backbone"))
    return backbone.eval(), meta


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "fp32"
    assert cli("export", run_dir, "--out", out) == 0
    return out


def images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- export + load_encoder ----------------------------------------------------------------------


@torch.no_grad()
def test_export_reloads_to_the_training_models_features(exported, trained, run_dir):
    backbone, meta = trained
    with safe_open(str(exported / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(backbone.state_dict())  # the encoder alone: no projector, probe or optimizer

    enc = load_encoder(exported)
    assert not enc.training
    x = images()
    assert torch.equal(enc(x), backbone(x))
    assert torch.equal(enc.probe_features(x), backbone.probe_features(x))
    # The checkpoint and the run folder load to the same encoder.
    for source in (list_checkpoints(run_dir / "checkpoints")[-1], run_dir):
        assert torch.equal(load_encoder(source)(x), backbone(x))

    info = enc.lejepa_info
    assert info["arch_config"] == meta["backbone"] and info["step"] == 2
    assert info["mean"] == meta["data"]["mean"] and info["std"] == meta["data"]["std"]
    assert (info["image_size"], info["channels"], info["patch_size"]) == (16, 3, 4)
    assert info["config"]["model"]["arch"] == "vit_micro" and info["preset"] == "demo" and info["lambda"] == load_config("demo").loss.lamb
    assert info["data"]["fingerprint"] == meta["data"]["fingerprint"]
    assert set(info["probe"]) >= {"knn_top1"}  # the scores logged at that step

    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224" and cfg["num_classes"] == 0 and cfg["num_features"] == 128
    assert cfg["model_args"] == {"img_size": 16, "patch_size": 4, "in_chans": 3, "dynamic_img_size": True,
                                 "embed_dim": 128, "depth": 6, "num_heads": 4}
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 16, 16] and pc["mean"] == info["mean"] and pc["num_classes"] == 0


@torch.no_grad()
@pytest.mark.parametrize("dtype,torch_dtype,tag", [("bf16", torch.bfloat16, "BF16"), ("fp16", torch.float16, "F16")])
def test_half_precision_export(run_dir, exported, trained, tmp_path, dtype, torch_dtype, tag):
    out = tmp_path / dtype
    r = export_encoder(run_dir, out, dtype=dtype)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {tag}
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.55 * (exported / "model.safetensors").stat().st_size
    assert r.info["dtype"] == dtype
    enc = load_encoder(out)
    backbone, _ = trained
    for k, v in enc.state_dict().items():  # loaded back as fp32 holding the rounded values
        assert v.dtype == torch.float32 and torch.equal(v, backbone.state_dict()[k].to(torch_dtype).float()), k
    x = images()
    ref = backbone(x)
    assert torch.nn.functional.cosine_similarity(enc(x), ref).min() > 0.999


def test_export_refuses_to_overwrite_and_rejects_bad_options(run_dir, exported, tmp_path):
    with pytest.raises(UserError, match="--overwrite"):
        export_encoder(run_dir, exported)
    with pytest.raises(UserError, match="fp32 only"):
        export_encoder(run_dir, tmp_path / "x", dtype="bf16", format="onnx")
    assert cli("export", run_dir, "--out", tmp_path / "y", "--dtype", "fp64") == 2


# ---- timm compatibility --------------------------------------------------------------------------


def _check_against_manifest(name: str, keys_shapes: dict[str, list[int]]) -> None:
    expected = MANIFEST[name]["keys"]
    missing, extra = sorted(expected.keys() - keys_shapes.keys()), sorted(keys_shapes.keys() - expected.keys())
    assert not missing and not extra, f"{name}: missing {missing[:5]}, unexpected {extra[:5]}"
    wrong = {k: (keys_shapes[k], expected[k]) for k in expected if keys_shapes[k] != expected[k]}
    assert not wrong, f"{name}: shapes differ (ours, timm's): {dict(list(wrong.items())[:5])}"


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "resnet50"])
def test_exported_keys_match_timm_manifest(name, tmp_path):
    spec = MANIFEST[name]["lejepa"]
    backbone = build_backbone(**spec)
    r = export_backbone(backbone, tmp_path, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], dtype="fp16")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    _check_against_manifest(name, found)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == name and r.timm_compatible and cfg["lejepa"]["timm_compatible"]
    assert cfg["num_features"] == backbone.embed_dim and cfg["pretrained_cfg"]["input_size"] == [3, 224, 224]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_224", "resnet18"])
def test_state_dict_matches_timm_manifest(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        backbone = build_backbone(**MANIFEST[name]["lejepa"])
    _check_against_manifest(name, {k: list(v.shape) for k, v in backbone.state_dict().items()})


@torch.no_grad()
def test_real_timm_loads_export_strictly_by_every_documented_route(exported, trained):
    timm = pytest.importorskip("timm", reason="timm does not import beside this torch; the manifest tests stand in")
    from safetensors.torch import load_file

    cfg = json.loads((exported / "config.json").read_text())
    x = images()
    # Route 1: local-dir reads architecture, model_args, pretrained_cfg and the weights.
    model = timm.create_model(f"local-dir:{exported}", pretrained=True, num_classes=0).eval()
    torch.testing.assert_close(model(x), trained[0](x), atol=1e-5, rtol=1e-5)
    data_cfg = timm.data.resolve_data_config(model=model)
    assert data_cfg["input_size"] == (3, 16, 16) and list(data_cfg["mean"]) == cfg["pretrained_cfg"]["mean"]
    # Route 2: the config's fields by hand, weights loaded strictly.
    model = timm.create_model(cfg["architecture"], num_classes=0, pretrained_cfg=cfg["pretrained_cfg"],
                              **cfg["model_args"]).eval()
    model.load_state_dict(load_file(str(exported / "model.safetensors")), strict=True)
    torch.testing.assert_close(model(x), trained[0](x), atol=1e-5, rtol=1e-5)
    assert timm.data.resolve_data_config(model=model)["input_size"] == (3, 16, 16)
    # The bare name builds timm's default geometry, which this export does not fit (as documented).
    with pytest.raises(RuntimeError):
        timm.create_model(cfg["architecture"], num_classes=0).load_state_dict(load_file(str(exported / "model.safetensors")))


def test_real_timm_refuses_lejepa_only_exports_by_name(tmp_path):
    timm = pytest.importorskip("timm", reason="timm does not import beside this torch; the name tests stand in")
    net = build_backbone("resnet18", img_size=32, small_stem=True, in_chans=3).eval()
    export_backbone(net, tmp_path, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(RuntimeError, match="Unknown model \\(lejepa_only_resnet18_small_stem1\\)"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=0)


@torch.no_grad()
@pytest.mark.parametrize("arch,stem_stride,head_width", [("resnet18", 1, 0), ("resnet_micro", 1, 0), ("resnet_micro", 2, 0),
                                                         ("resnet_micro", 2, 48)])
def test_small_stem_resnet_round_trips_and_is_marked_lejepa_only(tmp_path, arch, stem_stride, head_width):
    torch.manual_seed(0)
    net = build_backbone(arch, img_size=32, small_stem=True, stem_stride=stem_stride, in_chans=1, head_width=head_width)
    for m in net.modules():  # non-trivial BatchNorm statistics, so the buffers are checked too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    net.eval()
    r = export_backbone(net, tmp_path, mean=[0.13], std=[0.31])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert not r.timm_compatible and cfg["lejepa"]["timm_compatible"] is False
    # A name timm does not know, so timm's local-dir stops with "Unknown model" instead of building its own stem.
    assert cfg["architecture"].startswith("lejepa_only_" + arch) and cfg["architecture"] not in MANIFEST
    reason = cfg["lejepa"]["timm_incompatibility"]
    assert ("no model with resnet_micro's layer widths" in reason) if arch == "resnet_micro" else ("stem" in reason)
    enc = load_encoder(tmp_path / "model.safetensors")  # the weights file alone, config.json beside it
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(enc(x), net(x))
    assert enc.lejepa_info["step"] is None and enc.lejepa_info["channels"] == 1


def test_resnet_with_a_widening_head_is_lejepa_only():
    from lejepa_cli.export import timm_compatible
    from lejepa_cli.models.timm_compat import timm_architecture, timm_incompatibility

    assert timm_compatible({"arch": "resnet50", "small_stem": False})  # written before head_width existed
    assert timm_compatible({"arch": "resnet50", "small_stem": False, "head_width": 0})
    arch = {"arch": "resnet50", "small_stem": False, "head_width": 2048}
    assert not timm_compatible(arch) and timm_architecture(arch) == "lejepa_only_resnet50_head2048"
    assert "widening 1x1 head" in timm_incompatibility(arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_gets_a_timm_route_or_a_precise_reason(arch, tmp_path):
    """Per architecture: a timm name whose state dict the manifest pins, model_args giving our geometry,
    pretrained_cfg giving our preprocessing; or a lejepa_only_ name and a reason (also in the CLI hint)."""
    from lejepa_cli.models.timm_compat import timm_config, timm_hint, timm_incompatibility

    kwargs = {"img_size": 32, "patch_size": 8} if arch.startswith("vit") else {"img_size": 32}
    net = build_backbone(arch, in_chans=3, **kwargs)
    spec = net.arch_config()
    cfg = timm_config(spec, num_features=net.embed_dim, mean=[0.4] * 3, std=[0.2] * 3)
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [3, 32, 32] and pc["mean"] == [0.4] * 3 and pc["std"] == [0.2] * 3
    assert set(pc) <= set(MANIFEST["_pretrained_cfg_fields"])  # timm's PretrainedCfg accepts every key
    hint = timm_hint(spec, "DIR")
    if timm_incompatibility(spec) is None:
        assert cfg["architecture"] in MANIFEST["_timm_names"] and "local-dir:DIR" in hint
        if arch.startswith("vit"):  # model_args carry patch, size and (for micro) the widths
            assert cfg["model_args"]["img_size"] == 32 and cfg["model_args"]["patch_size"] == 8
            assert cfg["model_args"].get("embed_dim", net.embed_dim) == net.embed_dim
    else:
        assert cfg["architecture"].startswith("lejepa_only_") and cfg["architecture"] not in MANIFEST["_timm_names"]
        assert hint.startswith("not loadable in timm: " + timm_incompatibility(spec))


def test_the_per_preset_timm_table_in_the_docs_matches_the_exports():
    """docs/export.md's table names, for every preset, the architecture an export writes and whether timm loads it."""
    from lejepa_cli.config import list_presets
    from lejepa_cli.models.timm_compat import timm_architecture, timm_incompatibility

    doc = (Path(__file__).resolve().parent.parent / "docs" / "export.md").read_text()
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^\| `([\w-]+)` \| [^|]+ \| `(\w+)` \| (\w+)", doc, re.M)}
    assert set(rows) == set(list_presets())
    for preset, (architecture, verdict) in rows.items():
        c = load_config(preset)
        arch = {"arch": c.model.arch, "img_size": c.views.global_size, "patch_size": c.model.patch_size,
                "small_stem": c.model.small_stem, "stem_stride": c.model.stem_stride, "head_width": c.model.head_width}
        assert timm_architecture(arch) == architecture, preset
        assert (verdict == "routes") == (timm_incompatibility(arch) is None), preset


# ---- ONNX ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_onnx_export_matches_pytorch_at_other_sizes_and_embed_reads_the_folder(run_dir, exported, tmp_path):
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install onnx onnxruntime)")
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install onnx onnxruntime)")
    import onnx

    out = tmp_path / "onnx"
    r = export_encoder(run_dir, out, format="onnx")
    assert r.onnx_max_abs_diff is not None and r.onnx_max_abs_diff < 1e-4
    meta = json.loads((out / "config.json").read_text())["lejepa"]["onnx"]
    assert meta["max_abs_diff"] == r.onnx_max_abs_diff and meta["size_rule"] == "height and width multiples of 4"
    dims = onnx.load(str(out / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]  # dynamic batch, height, width

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = load_encoder(exported)
    for size in (16, 12, 24):  # native, and two other sizes (the ViT resamples pos_embed inside the graph)
        x = images(n=7, size=size, seed=3)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert got.shape == (7, 128)
        assert (got - enc(x)).abs().max() < 1e-4, size
    x = images(n=2, size=20, seed=4)  # not square
    assert (torch.from_numpy(session.run(None, {"images": x.numpy()})[0]) - enc(x)).abs().max() < 1e-4

    # The folder is a whole export: the weights and config.json beside model.onnx, so lejepa reads it.
    assert torch.equal(load_encoder(out)(x), enc(x))
    assert cli("embed", out, "builtin", "--out", tmp_path / "e.npy", "--no-progress") == 0


@torch.no_grad()
@pytest.mark.parametrize("arch,kwargs", [("resnet_micro", {"small_stem": True}), ("resnet18", {})])
def test_onnx_resnet_takes_any_height_and_width(arch, kwargs, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install onnx onnxruntime)")
    pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install onnx onnxruntime)")
    torch.manual_seed(0)
    net = build_backbone(arch, img_size=32, in_chans=3, **kwargs).eval()
    r = export_backbone(net, tmp_path, mean=[0.5] * 3, std=[0.25] * 3, format="onnx")
    assert r.info["onnx"]["size_rule"] == "any height and width"
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for h, w in ((32, 32), (40, 56)):
        x = torch.randn(3, 3, h, w)
        assert (torch.from_numpy(session.run(None, {"images": x.numpy()})[0]) - net(x)).abs().max() < 1e-4


def test_an_onnx_only_folder_says_what_to_pass(exported, tmp_path):
    folder = tmp_path / "old"  # what `export --format onnx` used to write: no weights beside the graph
    folder.mkdir()
    (folder / "config.json").write_text((exported / "config.json").read_text())
    (folder / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(UserError, match="model.onnx without model.safetensors.*--format all --overwrite"):
        load_encoder(folder)
    assert cli("embed", folder, "builtin", "--out", tmp_path / "e.npy") == 2


# ---- embed ---------------------------------------------------------------------------------------


def _image_folder(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    ids = []
    for cls in ("cat", "dog"):
        for i in range(3):
            h, w = 18 + 3 * i, 22 + i
            path = root / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
            ids.append(f"{cls}/{i}.png")
    return ids


@torch.no_grad()
def test_embed_writes_one_row_per_image_with_ids(exported, tmp_path):
    from lejepa_cli.data.decode import decode

    ids = _image_folder(tmp_path / "imgs")
    out = tmp_path / "emb.npy"
    assert cli("embed", exported, tmp_path / "imgs", "--out", out, "--batch-size", "4", "--no-progress") == 0
    emb = np.load(out, allow_pickle=False)
    side = json.loads((tmp_path / "emb.ids.json").read_text())
    assert emb.shape == (6, 128) and emb.dtype == np.float32
    assert side["ids"] == ids and side["labels"] == [0, 0, 0, 1, 1, 1] and side["class_names"] == ["cat", "dog"]
    # Row i is the encoder's embedding of image ids[i], decoded and normalised as documented.
    enc = load_encoder(exported)
    info = enc.lejepa_info
    pixels = np.stack([decode(str(tmp_path / "imgs" / i), 16, 3) for i in ids])  # (6, 16, 16, 3)
    x = eval_transform(torch.from_numpy(pixels).permute(0, 3, 1, 2), 16, info["mean"], info["std"])
    np.testing.assert_allclose(emb, enc(x).numpy(), atol=1e-5)

    assert cli("embed", exported, tmp_path / "imgs", "--out", out) == 2  # exists: needs --overwrite
    assert cli("embed", exported, tmp_path / "imgs", "--out", tmp_path / "emb.csv") == 2


def _npz(path: Path) -> Path:
    rng = np.random.default_rng(1)
    np.savez(path, x_train=rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), y_train=np.arange(8) % 2,
             x_test=rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8), y_test=np.array([1, 0, 1, 1, 0]))
    return path


def test_embed_prepared_split_equals_raw_source(exported, tmp_path):
    from lejepa_cli.data.prepare import prepare
    from lejepa_cli.image.embed import embed

    npz = _npz(tmp_path / "d.npz")
    prepare(npz, tmp_path / "prep", workers=0, progress=False)
    for data, name in ((npz, "raw"), (tmp_path / "prep", "prep")):
        s = embed(exported, data, tmp_path / f"{name}.npy", split="val", features="probe", progress=False)
        assert s["rows"] == 5 and s["dim"] == 256  # probe features of a ViT: two CLS tokens
    raw, prep = np.load(tmp_path / "raw.npy"), np.load(tmp_path / "prep.npy")
    np.testing.assert_allclose(raw, prep, atol=1e-6)  # same pixels, same rows, same order
    side = json.loads((tmp_path / "raw.ids.json").read_text())
    assert side["ids"] == [f"d.npz:val:{i}" for i in range(5)] and side["labels"] == [1, 0, 1, 1, 0]
    assert json.loads((tmp_path / "prep.ids.json").read_text())["labels"] == [1, 0, 1, 1, 0]


def test_embed_parquet(exported, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the parquet extra) is not installed")
    import pyarrow.parquet as pq

    from lejepa_cli.image.embed import embed

    npz = _npz(tmp_path / "d.npz")
    embed(exported, npz, tmp_path / "e.parquet", split="train", progress=False)
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column_names == ["id", "label", "embedding"] and table.num_rows == 8
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 128)
    assert table.column("id").to_pylist() == [f"d.npz:train:{i}" for i in range(8)]
    assert table.column("label").to_pylist() == [i % 2 for i in range(8)]
    embed(exported, npz, tmp_path / "e.npy", split="train", progress=False)
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_numpy(zero_copy_only=False)), np.load(tmp_path / "e.npy"))


# ---- --init-from -------------------------------------------------------------------------------


def test_init_from_export_starts_a_new_run_from_its_weights(exported, tmp_path, monkeypatch):
    import lejepa_cli.image.objective as image_mod

    seen: dict[str, torch.Tensor] = {}
    original = image_mod.lejepa_step

    def first_step(run, *args, **kwargs):  # the weights the first optimizer step starts from
        if not seen:
            seen.update({k: v.detach().clone() for k, v in run.backbone.state_dict().items()})
        return original(run, *args, **kwargs)

    monkeypatch.setattr(image_mod, "lejepa_step", first_step)
    sets = [a for o in RUN_SETS if not o.startswith("train.steps") for a in ("--set", o)]
    code = cli("train", "--preset", "demo", *sets, "--set", "train.steps=1", "--set", "train.seed=7",
               "--out", tmp_path / "run2", "--init-from", exported, "--no-progress")
    assert code == 0
    ref = load_encoder(exported).state_dict()
    assert seen.keys() == ref.keys()
    for k in ref:
        assert torch.equal(seen[k], ref[k]), k
    # A new run: it starts at step 0 and trains on, unlike --resume.
    assert [p.name for p in list_checkpoints(tmp_path / "run2" / "checkpoints")] == ["step-000000001.safetensors"]


def test_init_from_resamples_pos_embed_to_a_new_grid(exported):
    src = load_encoder(exported).state_dict()
    bigger = build_backbone("vit_micro", img_size=24, patch_size=4)  # 6x6 grid instead of 4x4
    notes: list[str] = []
    load_backbone_weights(bigger, exported, log=notes.append)
    assert bigger.pos_embed.shape == (1, 37, 128)
    assert torch.equal(bigger.pos_embed.data, resample_pos_embed(src["pos_embed"], 6))
    assert torch.equal(bigger.pos_embed.data[:, 0], src["pos_embed"][:, 0])  # the CLS position is kept
    assert torch.equal(bigger.blocks[3].mlp.fc1.weight, src["blocks.3.mlp.fc1.weight"])
    assert any("4x4 to a 6x6" in n for n in notes)


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="vit_small", img_size=16, patch_size=4), "arch vit_micro there, vit_small here"),
    (dict(arch="vit_micro", img_size=16, patch_size=8), "patch_size 4 there, 8 here"),
    (dict(arch="vit_micro", img_size=16, patch_size=4, in_chans=1), "in_chans 3 there, 1 here"),
    (dict(arch="resnet18", img_size=16), "arch vit_micro there, resnet18 here"),
])
def test_init_from_mismatch_is_one_line_naming_it(exported, kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        load_backbone_weights(build_backbone(**kwargs), exported, log=lambda m: None)
    assert "\n" not in str(e.value)


# ---- what is not an encoder ----------------------------------------------------------------------


def test_non_encoders_are_one_line_user_errors(tmp_path, exported):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "timmdir").mkdir()
    (tmp_path / "timmdir" / "config.json").write_text(json.dumps({"architecture": "resnet50"}))
    (tmp_path / "timmdir" / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    for bad in ("junk.safetensors", "notes.txt", "timmdir", "missing", "."):
        with pytest.raises(UserError) as e:
            load_encoder(tmp_path / bad)
        assert "\n" not in str(e.value), bad
    assert cli("export", tmp_path / "notes.txt", "--out", tmp_path / "o") == 2


def test_load_encoder_needs_only_torch_and_safetensors(exported):
    # Block the CLI / data stack; loading and running the encoder must not need any of it.
    code = (
        "import sys\n"
        "for m in ('yaml', 'typer', 'rich', 'PIL', 'lejepa_cli.config', 'lejepa_cli.cli'): sys.modules[m] = None\n"
        "import torch\n"
        "from lejepa_cli.export import load_encoder\n"
        f"enc = load_encoder({str(exported)!r})\n"
        "print(tuple(enc(torch.zeros(2, 3, 16, 16)).shape))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 128)"
