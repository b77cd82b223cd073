"""prepare -> shards -> load_prepared on generated sources: decoding oddities, skips, resume after
SIGKILL (byte-identical), splits, every source kind, the reader, info/verify and the CLI."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import (
    BAD_FILES, BLUE, exif_marker_ok, make_cifar10_bin, make_cifar10_python, make_idx_folder, make_image_folder, py2_pickle,
)
from PIL import Image
from typer.testing import CliRunner

from lejepa_cli.commands.data import app
from lejepa_cli.data.prepare import info, prepare
from lejepa_cli.data.readers import detect_source
from lejepa_cli.data.shards import ShardedImages, is_prepared, load_prepared, verify, write_array
from lejepa_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("src") / "images")


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prep") / "out"
    summary = prepare(folder, out, resolution=16, val_fraction=0.2, seed=3, workers=2, shard_size=16, progress=False)
    return out, summary


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _image(out: Path, rel: str) -> np.ndarray:
    for split in ("train", "val"):
        ds = load_prepared(out, split, ids=True)
        if rel in ds.ids:
            return ds.images[np.array([ds.ids.index(rel)])][0]
    raise AssertionError(f"{rel} not in the prepared dataset")


def test_image_folder_summary_skips_and_layout(prepared, folder):
    out, s = prepared
    assert s["kind"] == "image-folder" and s["class_names"] == ["a", "b", "c"]
    assert s["resolution"] == 16 and s["channels"] == 3
    n_files = 3 * 70 + 4 + 4  # 4 bad + cmyk, sixteen, rgba, exif
    assert s["splits"]["train"] + s["splits"]["val"] == n_files - 4
    assert s["splits"]["val"] == pytest.approx(0.2 * n_files, abs=2)
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {r["path"] for r in skipped} == BAD_FILES and s["skipped"] == 4
    reasons = {r["path"]: r["reason"] for r in skipped}
    assert reasons["b/zero.png"] == "empty file" and reasons["b/notes.txt"].startswith("not an image")
    index = json.loads((out / "index.json").read_text())
    assert index["num_skipped"] == 4 and {r["path"] for r in index["skipped"]} == BAD_FILES
    assert (out / "train" / "shard-00000.npy").is_file() and (out / "train" / "labels.npy").is_file()
    assert not (out / ".partial").exists()
    arr = np.load(out / "train" / "shard-00000.npy", mmap_mode="r", allow_pickle=False)
    assert isinstance(arr, np.memmap) and arr.shape == (16, 16, 16, 3) and arr.dtype == np.uint8
    assert verify(out) == [] and is_prepared(out)


def test_labels_ids_and_stats_match_source(prepared, folder):
    out, _ = prepared
    train, val = load_prepared(out, "train", ids=True), load_prepared(out, "val", ids=True)
    assert not set(train.ids) & set(val.ids)
    for ds in (train, val):
        assert [ds.class_names[label] for label in ds.labels] == [i.split("/")[0] for i in ds.ids]
        assert ds.ids == sorted(ds.ids)  # each split keeps the folder order
    # The class tint survives decoding: class "a" images are red-dominant, "b" green, "c" blue.
    idx = np.array([i for i, name in enumerate(train.ids) if "/img" in name])
    imgs, labels = train.batch(idx)
    dominant = imgs.reshape(len(idx), -1, 3).mean(1).argmax(1)
    assert (dominant == labels).mean() > 0.95
    x = train.images[np.arange(len(train))].astype(np.float64) / 255
    assert np.allclose(train.mean, x.reshape(-1, 3).mean(0), atol=1e-5)
    assert np.allclose(train.std, x.reshape(-1, 3).std(0), atol=1e-5)


def test_decoding_oddities(prepared):
    out, _ = prepared
    assert exif_marker_ok(_image(out, "c/exif.jpg")), "EXIF orientation 6 not applied"
    cmyk = _image(out, "c/cmyk.jpg").astype(int)
    assert cmyk[..., 0].min() > 200 and cmyk[..., 1:].max() < 60  # CMYK (0,255,255,0) is red
    sixteen = _image(out, "c/sixteen.png").astype(int)
    assert np.abs(sixteen - round(40000 / 257)).max() <= 1  # scaled, not clipped to 255
    rgba = _image(out, "c/rgba.png").astype(int)
    assert (rgba[:, :4] >= 245).all()  # transparent half shows the white background
    assert np.abs(rgba[:, -4:] - np.array(BLUE)).max() <= 3


def test_rerun_is_up_to_date_and_other_settings_are_refused(prepared, folder):
    out, _ = prepared
    before = _files(out)
    again = prepare(folder, out, resolution=16, val_fraction=0.2, seed=3, workers=0, shard_size=16, progress=False)
    assert again["up_to_date"] and _files(out) == before
    with pytest.raises(UserError, match="--overwrite") as e:
        prepare(folder, out, resolution=16, val_fraction=0.2, seed=4, workers=0, shard_size=16, progress=False)
    assert "\n" not in str(e.value)


def test_sigkill_then_resume_is_byte_identical(folder, tmp_path):
    args = dict(resolution=16, val_fraction=0.2, seed=3, shard_size=4, progress=False)
    clean = tmp_path / "clean"
    prepare(folder, clean, workers=2, **args)
    killed = tmp_path / "killed"
    code = (
        "from pathlib import Path; from lejepa_cli.data.prepare import prepare; "
        f"prepare({str(folder)!r}, Path({str(killed)!r}), workers=1, **{args!r})"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (killed / ".partial" / "train-00001.json").exists():  # two shards journalled
            assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the prepare and its decode workers
        proc.wait()
    assert not (killed / "index.json").exists(), "prepare finished before the kill"
    assert (killed / "train" / "shard-00000.npy").exists()
    s = prepare(folder, killed, workers=0, **args)
    assert s["resumed"] and not s["up_to_date"]
    assert _files(killed) == _files(clean)


def test_workers_do_not_change_the_bytes(folder, tmp_path):
    a = prepare(folder, tmp_path / "a", resolution=12, workers=0, shard_size=64, progress=False)
    prepare(folder, tmp_path / "b", resolution=12, workers=2, shard_size=64, progress=False)
    assert a["splits"] == {"train": 3 * 70 + 4} and _files(tmp_path / "a") == _files(tmp_path / "b")


def test_unlabelled_recursive_grey_folder_keeps_small_size(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "flat"
    for i in range(30):
        sub = root / f"d{i % 3}" / ("deep" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(sub / f"{i}.png")
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "top.png")  # a top-level image: not class folders
    (root / ".hidden.png").write_bytes(b"junk")
    assert detect_source(root)[0] == "unlabelled-folder"
    s = prepare(root, tmp_path / "out", progress=False, workers=0)
    assert s["splits"] == {"train": 31} and s["resolution"] == 12 and s["channels"] == 1 and s["skipped"] == 0
    ds = load_prepared(tmp_path / "out", ids=True)
    assert ds.labels is None and "d1/deep/1.png" in ds.ids
    original = np.asarray(Image.open(root / "d1/deep/1.png"))
    assert np.array_equal(ds.images[np.array([ds.ids.index("d1/deep/1.png")])][0, ..., 0], original)


def test_file_list_csv_with_names_and_missing_file(tmp_path, folder):
    lst = tmp_path / "list.csv"
    rows = ["path,label"] + [f"{folder}/a/img{i:03d}.jpg,cat" for i in (1, 2, 4, 5, 7)]
    rows += [f"{folder}/c/img{i:03d}.jpg,dog" for i in (1, 2, 4)]
    lst.write_text("\n".join(rows + ["nope/missing.jpg,dog"]) + "\n")
    s = prepare(lst, tmp_path / "out", resolution=8, progress=False, workers=0)
    assert s["kind"] == "file-list" and s["splits"] == {"train": 8} and s["class_names"] == ["cat", "dog"]
    ds = load_prepared(tmp_path / "out")
    assert ds.labels.tolist() == [0] * 5 + [1] * 3
    assert [(r["path"], r["reason"]) for r in info(tmp_path / "out")["skipped"]] == [("nope/missing.jpg", "missing file")]
    txt = tmp_path / "list.txt"
    txt.write_text("# images\n" + "\n".join(f"{folder}/b/img{i:03d}.jpg" for i in (1, 2, 4)) + "\n")
    s = prepare(txt, tmp_path / "out_txt", resolution=8, progress=False, workers=0)
    assert s["splits"] == {"train": 3} and load_prepared(tmp_path / "out_txt").labels is None


def test_npz_official_splits_and_npy_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 255, (40, 10, 10, 3), np.uint8), rng.integers(0, 255, (12, 10, 10, 3), np.uint8)
    y_train, y_test = rng.integers(0, 4, 40), rng.integers(0, 4, 12)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    s = prepare(tmp_path / "d.npz", tmp_path / "npz", val_fraction=0.5, progress=False)
    assert s["splits"] == {"train": 40, "val": 12} and s["resolution"] == 10  # official splits win
    val = load_prepared(tmp_path / "npz", "val")
    assert np.array_equal(val.images[np.arange(12)], x_test) and np.array_equal(val.labels, y_test)

    np.save(tmp_path / "x.npy", x_train)
    a = prepare(tmp_path / "x.npy", tmp_path / "npy_a", val_fraction=0.25, seed=0, resolution=20, progress=False, workers=0)
    b = prepare(tmp_path / "x.npy", tmp_path / "npy_b", val_fraction=0.25, seed=1, resolution=20, progress=False, workers=0)
    assert a["splits"] == b["splits"] == {"train": 30, "val": 10} and a["resolution"] == 20
    ids_a = load_prepared(tmp_path / "npy_a", "val", ids=True).ids
    ids_b = load_prepared(tmp_path / "npy_b", "val", ids=True).ids
    assert ids_a != ids_b  # the seed picks the held-out images
    up = load_prepared(tmp_path / "npy_a", "val").images[np.arange(10)]
    assert up.shape == (10, 20, 20, 3)
    first = x_train[int(ids_a[0].split(":")[1])].astype(float)
    assert abs(up[0].astype(float).mean() - first.mean()) < 4  # upscaled, same content


def test_idx_folder_via_load_idx(tmp_path):
    arrays = make_idx_folder(tmp_path / "mnist")
    s = prepare(tmp_path / "mnist", tmp_path / "out", progress=False)
    assert s["kind"] == "idx" and s["splits"] == {"train": 30, "val": 10}
    assert s["resolution"] == 28 and s["channels"] == 1
    val = load_prepared(tmp_path / "out", "val")
    assert np.array_equal(val.images[np.arange(10)][..., 0], arrays["t10k-images-idx3-ubyte.gz"])
    assert np.array_equal(val.labels, arrays["t10k-labels-idx1-ubyte.gz"])


def test_cifar_binary_and_python_batches(tmp_path):
    data = make_cifar10_bin(tmp_path / "cifar-10-batches-bin")
    s = prepare(tmp_path / "cifar-10-batches-bin", tmp_path / "out", progress=False)
    assert s["kind"] == "cifar10" and s["splits"] == {"train": 30, "val": 6} and s["class_names"][0] == "airplane"
    train = load_prepared(tmp_path / "out")
    images, labels = data["data_batch_2.bin"]
    assert np.array_equal(train.images[np.arange(6, 12)], images) and np.array_equal(train.labels[6:12], labels)
    # The "python version" of the same images (Python 2 pickles, read without unpickling) prepares to
    # the same shards, labels and class names.
    make_cifar10_python(tmp_path / "cifar-10-batches-py")
    s_py = prepare(tmp_path / "cifar-10-batches-py", tmp_path / "out_py", progress=False)
    assert {k: s_py[k] for k in ("kind", "splits", "class_names")} == {k: s[k] for k in ("kind", "splits", "class_names")}
    for split in ("train", "val"):
        a, b = load_prepared(tmp_path / "out", split), load_prepared(tmp_path / "out_py", split)
        every = np.arange(len(a))
        assert np.array_equal(a.images[every], b.images[every]) and np.array_equal(a.labels, b.labels)


def test_cifar100_python_keeps_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(1)
    pixels = {name: rng.integers(0, 255, (n, 3072), dtype=np.uint8) for name, n in (("train", 8), ("test", 4))}
    for name, data in pixels.items():
        fine = list(range(len(data)))
        (root / name).write_bytes(py2_pickle({b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * len(data)}))
    (root / "meta").write_bytes(py2_pickle({b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": [b"x"]}))
    s = prepare(root, tmp_path / "out", progress=False)
    assert s["kind"] == "cifar100" and s["splits"] == {"train": 8, "val": 4} and s["class_names"][:2] == ["c0", "c1"]
    train = load_prepared(tmp_path / "out")
    assert np.array_equal(train.labels, np.arange(8))
    assert np.array_equal(train.images[np.arange(8)], pixels["train"].reshape(8, 3, 32, 32).transpose(0, 2, 3, 1))
    (root / "meta").write_bytes(py2_pickle({b"fine_label_names": 7}))
    with pytest.raises(UserError, match="not a list of strings"):
        prepare(root, tmp_path / "out2", progress=False, overwrite=True)
    (root / "test").write_bytes(py2_pickle({b"data": pixels["test"], b"fine_labels": [1]}))  # one label for four images
    with pytest.raises(UserError, match="fine_labels"):
        prepare(root, tmp_path / "out2", progress=False, overwrite=True)


def test_builtin_source(tmp_path):
    s = prepare("builtin", tmp_path / "out", resolution=16, progress=False)
    assert s["kind"] == "builtin" and s["splits"] == {"train": 4096, "val": 1024} and s["num_classes"] == 10
    assert load_prepared(tmp_path / "out").images.shape == (4096, 16, 16, 3)


def test_pixel_limit_skips_bombs(tmp_path):
    root = tmp_path / "bombs"
    root.mkdir()
    for name, side in (("ok.png", 40), ("warn.png", 60), ("error.png", 100)):
        Image.new("RGB", (side, side), (10, 200, 10)).save(root / name)
    s = prepare(root, tmp_path / "out", pixel_limit=3000, progress=False, workers=1)  # 3600 warns, 10000 errors
    skipped = {r["path"]: r["reason"] for r in info(tmp_path / "out")["skipped"]}
    assert s["splits"] == {"train": 1} and set(skipped) == {"warn.png", "error.png"}
    assert all(r.startswith("too large") for r in skipped.values())


def test_parquet_without_pyarrow_is_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match="pyarrow") as e:
        prepare(tmp_path / "d.parquet", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def test_sharded_reader_indexing_and_pickle(tmp_path):
    rng = np.random.default_rng(0)
    full = rng.integers(0, 255, (23, 4, 4, 2), dtype=np.uint8)
    counts = [8, 8, 7]
    paths = []
    for k, (a, n) in enumerate(zip([0, 8, 16], counts)):
        paths.append(tmp_path / f"shard-{k}.npy")
        write_array(paths[-1], full[a : a + n])
    reader = ShardedImages(paths, counts, (4, 4, 2))
    assert reader.shape == full.shape and len(reader) == 23
    for idx in (rng.permutation(23), np.array([22, 0, 0, 9, -1, 15]), np.arange(5), np.array([], dtype=np.int64)):
        assert np.array_equal(reader[idx], full[idx])
    assert np.array_equal(reader[3:20:4], full[3:20:4]) and np.array_equal(reader[17], full[17])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps is None and np.array_equal(clone[np.array([21, 2])], full[[21, 2]])
    with pytest.raises(IndexError):
        reader[np.array([23])]


def test_load_prepared_errors_name_the_problem(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(UserError, match="split 'test'.*train, val"):
        load_prepared(out, "test")
    with pytest.raises(UserError, match="does not exist"):
        load_prepared(tmp_path / "nowhere")
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "index.json").write_text("{not json")
    with pytest.raises(UserError, match="garbled"):
        load_prepared(garbled)
    assert not is_prepared(garbled) and verify(garbled) and "garbled" in verify(garbled)[0]


def test_verify_finds_corruption_and_info_sees_source_changes(folder, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for cls in ("x", "y"):
        (src / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(src / cls / f"{i}.png")
    out = tmp_path / "out"
    prepare(src, out, shard_size=4, progress=False, workers=0)
    assert info(out)["source_status"] == "unchanged" and verify(out) == []
    shard = out / "train" / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "train" / "shard-00002.npy").unlink()
    problems = verify(out)
    assert any("shard-00001.npy: checksum mismatch" in p for p in problems)
    assert any("shard-00002.npy: missing" in p for p in problems)
    Image.new("RGB", (10, 10), (0, 255, 0)).save(src / "x" / "new.png")
    assert info(out)["source_status"] == "changed"
    os.rename(src, tmp_path / "moved")
    assert info(out)["source_status"] == "missing"


def test_out_folder_guards(folder, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        prepare(folder, junk, resolution=8, progress=False)
    with pytest.raises(UserError, match="inside the source"):
        prepare(folder, folder / "out", resolution=8, progress=False)
    out = tmp_path / "out"
    prepare(folder, out, resolution=8, shard_size=256, progress=False, workers=0)
    s = prepare(folder, out, resolution=10, shard_size=256, progress=False, workers=0, overwrite=True)
    assert s["resolution"] == 10 and load_prepared(out).images.shape[1:] == (10, 10, 3) and verify(out) == []
    with pytest.raises(UserError, match="does not exist"):
        prepare(tmp_path / "missing", out, progress=False)


def test_cli_prepare_and_info(folder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(app, ["prepare", str(folder), "--out", str(out), "--resolution", "8", "--val-fraction", "0.1", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert is_prepared(out) and load_prepared(out, "val").images.shape[1:] == (8, 8, 3)
    r = runner.invoke(app, ["info", str(out), "--verify"])
    assert r.exit_code == 0 and "image-folder" in r.output and "unchanged" in r.output
    r = runner.invoke(app, ["info", str(tmp_path / "nothing")])
    assert isinstance(r.exception, UserError)


def test_parquet_hub_layout_and_hf_save_to_disk(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the optional [parquet] extra) is not installed")
    import io

    import pyarrow.parquet as pq

    def table(n: int, offset: int):
        def png(i: int) -> bytes:
            b = io.BytesIO()
            Image.fromarray(np.full((10, 10, 3), (offset + i) * 10, np.uint8)).save(b, "PNG")
            return b.getvalue()

        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        images = pa.array([{"bytes": png(i), "path": f"{i}.png"} for i in range(n)], image_type)
        return pa.table({"image": images, "label": pa.array([i % 3 for i in range(n)], pa.int64())})

    hub = tmp_path / "hub"
    hub.mkdir()
    pq.write_table(table(9, 0), hub / "train-00000-of-00001.parquet")
    pq.write_table(table(3, 9), hub / "test-00000-of-00001.parquet")
    s = prepare(hub, tmp_path / "out_hub", progress=False, workers=0)
    assert s["kind"] == "parquet" and s["splits"] == {"train": 9, "val": 3} and s["resolution"] == 10
    val = load_prepared(tmp_path / "out_hub", "val")
    assert val.images[np.arange(3)][:, 0, 0, 0].tolist() == [90, 100, 110] and val.labels.tolist() == [0, 1, 2]

    hf = tmp_path / "hf"  # datasets.DatasetDict.save_to_disk layout: Arrow IPC streams per split
    for split, n, offset in (("train", 6, 0), ("validation", 3, 6)):
        (hf / split).mkdir(parents=True)
        t = table(n, offset)
        with pa.OSFile(str(hf / split / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
            w.write_table(t)
        (hf / split / "dataset_info.json").write_text(json.dumps({"features": {"label": {"names": ["x", "y", "z"]}}}))
    (hf / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    s = prepare(hf, tmp_path / "out_hf", progress=False, workers=0)
    assert s["splits"] == {"train": 6, "val": 3} and s["class_names"] == ["x", "y", "z"]
