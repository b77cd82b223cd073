"""Nothing in a checkpoint, export, dataset or archive can run code or escape its folder.

- the package source never unpickles (checked on its syntax tree, not by grep, so comments and
  docstrings that mention pickle are fine), never loads YAML unsafely, never evals, and never
  lets Pillow pick a format itself (EPS would run Ghostscript);
- pickles dressed up as checkpoints, exports and datasets are refused by every command with one
  line, and the code inside them never runs (it would create a marker file);
- safetensors headers are size-checked before the parser sees them;
- archives from `data fetch` may not write outside the target folder (see also test_fetch.py).
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lejepa_cli
import lejepa_cli.checkpoint as checkpoint_mod
import lejepa_cli.export as export_mod
from lejepa_cli.checkpoint import load_checkpoint, read_metadata
from lejepa_cli.cli import main
from lejepa_cli.data.fetch import safe_extract
from lejepa_cli.errors import UserError
from lejepa_cli.export import load_encoder

PACKAGE = Path(lejepa_cli.__file__).parent
# A run that builds in a fraction of a second (the --init-from file is read after data and model).
SMALL = [a for o in ("data.builtin_train=16", "data.builtin_val=8", "data.builtin_size=16", "views.global_size=16",
                     "views.local_views=0", "model.patch_size=8", "train.batch_size=8", "train.device=cpu",
                     "train.steps=1") for a in ("--set", o)]
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "jsonpickle"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two OpenMP threads on a loaded 2-core machine spin against each other (see test_reliability.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the source ---------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    """'np.load' for np.load, 'torch.serialization.load' for that, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every way `source` could execute code from data, as 'line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("torch.load", "torch.serialization.load") and not _is_const(_keyword(node, "weights_only"), True):
            found.append(f"{node.lineno}: {name} without weights_only=True")
        elif name in ("np.load", "numpy.load") and not (_keyword(node, "allow_pickle") is None or _is_const(_keyword(node, "allow_pickle"), False)):
            found.append(f"{node.lineno}: {name} with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all") and "Safe" not in _dotted(_keyword(node, "Loader") or ast.Name("")):
            found.append(f"{node.lineno}: {name} without a safe Loader")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "pd.read_pickle", "pandas.read_pickle"):
            found.append(f"{node.lineno}: {name}")
        elif name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{node.lineno}: {name}()")
        elif last == "open" and name.endswith("Image.open") and _keyword(node, "formats") is None:
            found.append(f"{node.lineno}: {name} without formats= (Pillow would open EPS via Ghostscript)")
    return found


def test_the_checker_finds_what_it_must():
    bad = (
        "import pickle\nfrom dill import loads\nimport numpy as np, torch, yaml\nfrom PIL import Image\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
        "yaml.load(s)\nyaml.unsafe_load(s)\neval(s)\nImage.open(p)\nimport marshal\n"
    )
    assert sorted(int(x.split(':')[0]) for x in unsafe_uses(bad)) == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
    good = (
        "import numpy as np, torch, yaml\nfrom PIL import Image\n# import pickle\n'''torch.load(x)'''\n"
        "torch.load(p, weights_only=True)\nnp.load(p)\nnp.load(p, allow_pickle=False, mmap_mode='r')\n"
        "yaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nImage.open(p, formats=('PNG',))\nmodel.eval()\n"
    )
    assert unsafe_uses(good) == []


def test_package_source_never_unpickles_or_evals():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [f"{path.relative_to(PACKAGE.parent)}:{p}" for path in files for p in unsafe_uses(path.read_text(), str(path))]
    assert problems == []


# ---- pickles dressed as artefacts -----------------------------------------------------------------------


class _Payload:
    """Unpickling this creates `path`: the proof that code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _run(capsys, *argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return int(info.value.code or 0), capsys.readouterr().err


def test_pickled_artefacts_never_run_and_fail_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(_Payload(marker))
    files = tmp_path / "files"
    files.mkdir()
    (files / "model.safetensors").write_bytes(bomb)
    (files / "checkpoint.pt").write_bytes(bomb)
    torch_like = files / "torch-like.safetensors"
    with __import__("zipfile").ZipFile(torch_like, "w") as z:  # the layout torch.save writes
        z.writestr("archive/data.pkl", bomb)
        z.writestr("archive/version", "3\n")
    export = tmp_path / "export"  # an export folder whose weights are a pickle
    export.mkdir()
    (export / "model.safetensors").write_bytes(bomb)
    (export / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "lejepa": {
        "format": export_mod.EXPORT_FORMAT, "arch_config": {"arch": "vit_tiny", "img_size": 16, "patch_size": 4, "in_chans": 3},
        "mean": [0.5] * 3, "std": [0.2] * 3}}))
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    objects = np.empty(2, dtype=object)
    objects[:] = [_Payload(marker), _Payload(marker)]
    np.save(arrays / "images.npy", objects, allow_pickle=True)
    np.savez(arrays / "data.npz", x_train=objects, y_train=np.zeros(2, np.int64))
    cifar_py = tmp_path / "cifar-10-batches-py"
    cifar_py.mkdir()
    for name in ("data_batch_1", "batches.meta"):
        (cifar_py / name).write_bytes(bomb)
    prepared = tmp_path / "prepared"  # a prepared folder whose labels file is a pickle
    (prepared / "train").mkdir(parents=True)
    np.save(prepared / "train" / "labels.npy", objects, allow_pickle=True)
    (prepared / "index.json").write_text(json.dumps({"format": "lejepa-prepared-v1", "splits": {"train": {
        "count": 2, "shards": [], "labels": {"file": "train/labels.npy"}}}}))

    out = tmp_path / "out"
    commands = []
    for f in (files / "model.safetensors", files / "checkpoint.pt", torch_like, export, export / "model.safetensors"):
        commands += [
            ["train", "--resume", f, "--out", out / "t", "--no-progress"],
            ["train", "--init-from", f, "--out", out / "i", "--no-progress", *SMALL],
            ["probe", f, "--no-progress", "--device", "cpu"],
            ["export", f, "--out", out / "e"],
            ["embed", f, arrays / "data.npz", "--out", out / "x.npy", "--no-progress"],
            ["viz", f, "--out", out / "v", "--device", "cpu"],
        ]
    for source in (arrays / "images.npy", arrays / "data.npz", cifar_py):
        commands += [["data", "prepare", source, "--out", out / "p", "--workers", "0"],
                     ["train", "--data", source, "--out", out / "d", "--no-progress", "--set", "train.steps=1"]]
    commands += [["data", "info", prepared], ["data", "info", prepared, "--verify"],
                 ["train", "--data", prepared, "--out", out / "d2", "--no-progress", "--set", "train.steps=1"]]
    for argv in commands:
        code, err = _run(capsys, *argv)
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert not marker.exists(), argv
    assert len(commands) == 39
    with pytest.raises(UserError):  # and the Python API
        load_encoder(files / "model.safetensors")
    assert not marker.exists()


# ---- safetensors headers ----------------------------------------------------------------------------------


def test_a_10gb_header_is_refused_before_parsing(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the parser was reached")

    monkeypatch.setattr(checkpoint_mod, "safe_open", never)
    monkeypatch.setattr(export_mod, "safe_open", never)
    import safetensors.torch  # export folders are read through lejepa_cli.data.inputs, which calls this

    monkeypatch.setattr(safetensors.torch, "load_file", never)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10 << 30) + b'{"__metadata__":{}}' + b" " * 100)
    beyond = tmp_path / "beyond.safetensors"  # within the cap but longer than the file
    beyond.write_bytes(struct.pack("<Q", 50 << 20) + b"{}")
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(huge.read_bytes())
    (export / "config.json").write_text(json.dumps({"lejepa": {"format": export_mod.EXPORT_FORMAT, "arch_config": {}}}))
    t0 = time.perf_counter()
    for path, call in ((huge, read_metadata), (huge, load_checkpoint), (beyond, load_checkpoint), (export, load_encoder)):
        with pytest.raises(UserError, match="not a safetensors file or is truncated") as info:
            call(path)
        assert "\n" not in str(info.value)
    assert time.perf_counter() - t0 < 5


def test_safetensors_header_cap_is_far_above_real_headers(tmp_path):
    """A real checkpoint's header (hundreds of tensors, the config) is tiny next to the cap."""
    tensors = {f"model.backbone.blocks.{i}.w": torch.zeros(2) for i in range(2000)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"config": json.dumps({"k": "v" * 100_000})})
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header < checkpoint_mod.MAX_HEADER_BYTES / 100
    checkpoint_mod.check_header(path)


# ---- archives (test_fetch.py covers '../x', absolute paths, links and devices) ------------------------------


def _tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"data"))
    return path


@pytest.mark.parametrize("name", ["cifar/../../escape", "cifar/./../../escape", "C:/escape", "\\escape", "..", "cifar/.."])
def test_archive_members_may_not_leave_the_folder(tmp_path, name):
    archive = _tar(tmp_path / "a.tar.gz", ["cifar/ok.bin", name])
    dest = tmp_path / "dest" / "inner"
    dest.mkdir(parents=True)
    with pytest.raises(UserError, match="refusing to extract a.tar.gz"):
        safe_extract(archive, dest)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.tar.gz", "dest", "inner"]  # nothing written anywhere


def test_archive_with_a_link_then_a_file_through_it_is_refused(tmp_path):
    """The classic two-step escape: a symlink to /, then a file written 'inside' the link."""
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        link = tarfile.TarInfo("cifar/up")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path)
        tar.addfile(link)
        info = tarfile.TarInfo("cifar/up/escaped")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"data"))
    with pytest.raises(UserError, match="is a link"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "dest").exists()


def test_extraction_never_follows_an_existing_link_in_the_target(tmp_path):
    """Members are written into a fresh staging folder, so a symlink already in `dest` is not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "cifar")
    archive = _tar(tmp_path / "a.tar.gz", ["cifar/file.bin"])
    assert safe_extract(archive, dest) == ["cifar"]
    assert not any(outside.iterdir()) and (dest / "cifar" / "file.bin").read_bytes() == b"data"
    assert not (dest / "cifar").is_symlink()


def test_extraction_never_replaces_a_folder_the_user_already_has(tmp_path):
    """A folder with the archive's top-level name stops the extraction; its files stay as they were."""
    dest = tmp_path / "dest"
    (dest / "cifar").mkdir(parents=True)
    (dest / "cifar" / "my-notes.txt").write_text("mine")
    archive = _tar(tmp_path / "a.tar.gz", ["cifar/file.bin"])
    with pytest.raises(UserError, match="already exists"):
        safe_extract(archive, dest)
    assert (dest / "cifar" / "my-notes.txt").read_text() == "mine" and not (dest / "cifar" / "file.bin").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["cifar"]  # no staging folder left behind
