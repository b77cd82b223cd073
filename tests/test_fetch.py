"""fetch against a local HTTP server (127.0.0.1, never the internet): download + checksum,
resume with Range, mismatch, unsafe archives, offline error, local copies, then prepare."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import RangeServer, make_cifar10_bin, make_idx_folder, md5
from PIL import Image
from typer.testing import CliRunner

from lejepa_cli.commands.data import app
from lejepa_cli.data.fetch import MARKER, fetch, safe_extract
from lejepa_cli.data.prepare import prepare
from lejepa_cli.data.shards import load_prepared
from lejepa_cli.errors import UserError

MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    arrays = make_idx_folder(root, n_train=50, n_test=10)
    with RangeServer(root) as server:
        yield server, arrays, {f: md5(root / f) for f in MNIST_FILES}


def _tar_gz(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_download_verify_and_prepare(mirror, tmp_path):
    server, arrays, sums = mirror
    folder = fetch("mnist", tmp_path / "data", base_url=server.url, checksums=sums, local_dirs=[], progress=False)
    assert folder == (tmp_path / "data" / "mnist").resolve()
    for f in MNIST_FILES:
        assert md5(folder / f) == sums[f] and not (folder / f"{f}.part").exists()
    record = json.loads((folder / MARKER).read_text())["files"]
    assert all(r["check"] == "md5 matches" and r["from"].startswith(server.url) for r in record.values())
    n = len(server.requests)
    assert fetch("mnist", tmp_path / "data", base_url=server.url, checksums=sums, local_dirs=[]) == folder
    assert len(server.requests) == n  # complete folder: nothing fetched again
    s = prepare(folder, tmp_path / "prepared", progress=False)
    assert s["splits"] == {"train": 50, "val": 10} and s["resolution"] == 28
    assert np.array_equal(load_prepared(tmp_path / "prepared").images[np.arange(50)][..., 0], arrays["train-images-idx3-ubyte.gz"])


def test_partial_download_resumes_with_range(mirror, tmp_path):
    server, _, sums = mirror
    name = "train-images-idx3-ubyte.gz"
    full = (server.root / name).read_bytes()
    target = tmp_path / "data" / "mnist"
    target.mkdir(parents=True)
    (target / f"{name}.part").write_bytes(full[:1000])  # what an interrupted download left
    fetch("mnist", tmp_path / "data", base_url=server.url, checksums=sums, local_dirs=[], progress=False)
    assert (target / name).read_bytes() == full
    served = [(rng, sent) for path, rng, sent in server.requests if path == f"/{name}"]
    assert served == [("bytes=1000-", len(full) - 1000)]


def test_checksum_mismatch_is_an_error_and_removes_the_file(mirror, tmp_path):
    server, _, sums = mirror
    bad = {**sums, "train-labels-idx1-ubyte.gz": "md5:" + "0" * 32}
    with pytest.raises(UserError, match="checksum mismatch for train-labels-idx1-ubyte.gz") as e:
        fetch("mnist", tmp_path / "data", base_url=server.url, checksums=bad, local_dirs=[], progress=False)
    assert "\n" not in str(e.value)
    folder = tmp_path / "data" / "mnist"
    assert not (folder / "train-labels-idx1-ubyte.gz").exists() and not (folder / "train-labels-idx1-ubyte.gz.part").exists()
    assert not (folder / MARKER).exists()


def test_unreachable_mirror_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        fetch("mnist", tmp_path / "data", base_url="http://127.0.0.1:1/", local_dirs=[], progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "cannot download" in msg and "by hand to" in msg and "train-images-idx3-ubyte.gz" in msg


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'svhn'.*fashion-mnist"):
        fetch("svhn", tmp_path)


def test_tar_with_parent_member_is_refused(tmp_path):
    archive = tmp_path / "serve" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    _tar_gz(archive, [_file("cifar-10-batches-bin/ok.bin", b"1"), _file("../evil", b"pwned")])
    with RangeServer(archive.parent) as server, pytest.raises(UserError, match="'../evil' points outside"):
        fetch("cifar10", tmp_path / "data", base_url=server.url, checksums={archive.name: md5(archive)}, progress=False)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "data" / "cifar-10-batches-bin").exists()


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "absolute", "device"])
def test_safe_extract_refuses_links_absolute_and_devices(tmp_path, kind):
    info = tarfile.TarInfo("data/x")
    if kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "data/y"
    elif kind == "absolute":
        info.name = "/tmp/abs"
    else:
        info.type = tarfile.CHRTYPE
    archive = _tar_gz(tmp_path / "a.tar.gz", [_file("data/ok", b"fine"), (info, None)])
    with pytest.raises(UserError, match="refusing to extract a.tar.gz"):
        safe_extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest" / "data").exists()  # nothing written before the check


def test_cifar_archive_extracts_to_preparable_folder(tmp_path):
    staging = tmp_path / "staging" / "cifar-10-batches-bin"
    data = make_cifar10_bin(staging, per_batch=4)
    serve = tmp_path / "serve"
    serve.mkdir()
    archive = serve / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname="cifar-10-batches-bin")
    with RangeServer(serve) as server:
        folder = fetch("cifar10", tmp_path / "data", base_url=server.url, checksums={archive.name: md5(archive)}, progress=False)
    assert folder.name == "cifar-10-batches-bin" and not (tmp_path / "data" / archive.name).exists()
    s = prepare(folder, tmp_path / "prepared", progress=False)
    assert s["kind"] == "cifar10" and s["splits"] == {"train": 20, "val": 4}
    assert np.array_equal(load_prepared(tmp_path / "prepared", "val").images[np.arange(4)], data["test_batch.bin"][0])


def test_imagenette_checks_the_published_sha256_then_prepares(tmp_path):
    staging = tmp_path / "staging"
    for split in ("train", "val"):
        for cls, colour in (("n01", (200, 0, 0)), ("n02", (0, 0, 200))):
            (staging / "imagenette2-160" / split / cls).mkdir(parents=True)
            Image.new("RGB", (30, 20), colour).save(staging / "imagenette2-160" / split / cls / "x.JPEG")
    (staging / "imagenette2-160" / "noisy_imagenette.csv").write_text("path,label\n")
    serve = tmp_path / "serve"
    serve.mkdir()
    archive = serve / "imagenette2-160.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "imagenette2-160", arcname="imagenette2-160")
    sha = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    with RangeServer(serve) as server:
        # The generated archive is not the published one: its SHA-256 must not pass.
        with pytest.raises(UserError, match="checksum mismatch for imagenette2-160.tgz.*expected sha256 64d0c485"):
            fetch("imagenette", tmp_path / "data", base_url=server.url, progress=False)
        assert not list((tmp_path / "data").glob("imagenette2-160.tgz*"))
        folder = fetch("imagenette", tmp_path / "data", base_url=server.url, checksums={archive.name: sha}, progress=False)
    record = json.loads((folder / MARKER).read_text())["files"]["imagenette2-160.tgz"]
    assert record["check"] == "sha256 matches"
    s = prepare(folder, tmp_path / "prepared", resolution=8, progress=False, workers=0)
    assert s["kind"] == "split-folders" and s["splits"] == {"train": 2, "val": 2} and s["class_names"] == ["n01", "n02"]


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_local_copy_needs_no_network(tmp_path):
    folder = fetch("fashion-mnist", tmp_path / "data", base_url="http://127.0.0.1:1/", progress=False)
    record = json.loads((folder / MARKER).read_text())["files"]
    assert all(r["from"].startswith(str(DEBIAN)) for r in record.values())
    assert {(folder / f).stat().st_size for f in MNIST_FILES} == {(DEBIAN / f).stat().st_size for f in MNIST_FILES}


def test_cli_fetch_prints_the_folder(mirror, tmp_path, monkeypatch):
    server, _, sums = mirror
    import lejepa_cli.data.fetch as fetch_module

    # The CLI has no checksum option; point the published ones at the generated files.
    monkeypatch.setitem(fetch_module.DATASETS, "mnist", fetch_module.DATASETS["mnist"].__class__(
        server.url, tuple((f, sums[f]) for f in MNIST_FILES), "mnist"))
    r = CliRunner().invoke(app, ["fetch", "mnist", "--out", str(tmp_path / "data"), "--base-url", server.url])
    assert r.exit_code == 0, r.output
    assert str((tmp_path / "data" / "mnist").resolve()) in r.output
