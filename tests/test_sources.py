"""Data sources: .npz keys, and data.val_fraction carving a seeded held-out split where a source has none."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY
from lejepa_cli.cli import main
from lejepa_cli.config import DataConfig, load_config
from lejepa_cli.data import NPZ_KEYS_HELP
from lejepa_cli.data.prepare import prepare
from lejepa_cli.data.sources import IndexedImages, has_split, held_out_note, load_dataset
from lejepa_cli.errors import UserError


def numbered_images(n: int, size: int = 8) -> np.ndarray:
    """uint8 (n, size, size): image i holds the value i everywhere, so a row says where it came from."""
    return np.repeat(np.arange(n, dtype=np.uint8)[:, None, None], size * size, axis=1).reshape(n, size, size)


def single_split_npz(path: Path, n: int = 40, x_key: str = "x", y_key: str = "y") -> Path:
    np.savez(path, **{x_key: numbered_images(n), y_key: np.arange(n) % 4})
    return path


def _origin(ds) -> np.ndarray:
    return np.asarray(ds.images[np.arange(len(ds))])[:, 0, 0, 0].astype(int)  # (N,) the source index of each row


@pytest.mark.parametrize("x_key,y_key", [("x", "y"), ("images", "labels"), ("x_train", "y_train")])
def test_val_fraction_carves_a_disjoint_seeded_split_from_a_single_split_npz(tmp_path, x_key, y_key):
    cfg = DataConfig(source=str(single_split_npz(tmp_path / "d.npz", x_key=x_key, y_key=y_key)))
    assert not has_split(cfg, "val")
    with pytest.raises(UserError, match="no 'x_test or x_val' array"):
        load_dataset(cfg, "val")  # without the key: no held-out split, as before
    cfg.val_fraction = 0.25
    train, val = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    assert (len(train), len(val)) == (30, 10)
    a, b = _origin(train), _origin(val)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(40))  # a partition of the source
    np.testing.assert_array_equal(train.labels, a % 4)  # labels follow their images
    np.testing.assert_array_equal(val.labels, b % 4)
    np.testing.assert_array_equal(_origin(load_dataset(cfg, "val")), b)  # the same split every time
    assert train.fingerprint != val.fingerprint  # feature caches and checkpoints tell them apart
    assert train.mean == val.mean  # both normalised with the whole training source's statistics


def test_val_fraction_leaves_a_source_with_its_own_split_alone(tmp_path):
    path = tmp_path / "two.npz"
    np.savez(path, x_train=numbered_images(20), y_train=np.zeros(20, int), x_val=numbered_images(6), y_val=np.ones(6, int))
    cfg = DataConfig(source=str(path), val_fraction=0.5)
    assert has_split(cfg, "val")
    assert len(load_dataset(cfg, "train")) == 20 and load_dataset(cfg, "val").labels.tolist() == [1] * 6
    builtin = DataConfig(builtin_train=16, builtin_val=8, builtin_size=8, val_fraction=0.5)
    assert (len(load_dataset(builtin, "train")), len(load_dataset(builtin, "val"))) == (16, 8)


def test_val_fraction_on_a_prepared_folder_reads_lazily(tmp_path):
    out = tmp_path / "prepared"
    prepare(str(single_split_npz(tmp_path / "d.npz", n=30)), out, workers=0, progress=False)
    cfg = DataConfig(source=str(out), val_fraction=0.2)  # prepared without --val-fraction: a train split only
    assert not has_split(cfg, "val") and has_split(cfg, "train")
    train, val = load_dataset(cfg, "train"), load_dataset(cfg, "val")
    assert isinstance(val.images, IndexedImages) and (len(train), len(val)) == (24, 6)
    assert sorted(np.concatenate([_origin(train), _origin(val)]).tolist()) == list(range(30))
    assert val.images[np.array([0])].shape == (1, 8, 8, 1)


def test_val_fraction_on_an_idx_folder_without_t10k(tmp_path):
    images = numbered_images(12)
    header = b"\x00\x00\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    cfg = DataConfig(source=str(tmp_path), val_fraction=0.25)
    assert has_split(cfg, "train") and not has_split(cfg, "val")
    assert (len(load_dataset(cfg, "train")), len(load_dataset(cfg, "val"))) == (9, 3)


def test_val_fraction_is_validated(tmp_path):
    for bad in ("-0.1", "1", "1.5"):
        with pytest.raises(UserError, match=r"data.val_fraction.*\[0, 1\)"):
            load_config(None, [f"data.val_fraction={bad}"])
    cfg = DataConfig(source=str(single_split_npz(tmp_path / "d.npz", n=3)), val_fraction=0.5)
    with pytest.raises(UserError, match="at least 1 held out and 2 to train on"):
        load_dataset(cfg, "train")


def test_held_out_note_says_what_is_missing_and_how_to_add_it(tmp_path, capsys):
    cfg = DataConfig(source=str(single_split_npz(tmp_path / "d.npz")))
    train = load_dataset(cfg, "train")
    note = held_out_note(cfg, train, None)
    assert "no held-out split 'val'" in note and "kNN" in note and "data.val_fraction=0.1" in note
    assert held_out_note(cfg, train, train) is None  # a held-out split: nothing to say
    assert "x_val" in NPZ_KEYS_HELP and "x_test" in NPZ_KEYS_HELP and "images" in NPZ_KEYS_HELP

    # At the start of training, one line; with data.val_fraction the run evaluates instead.
    sets = [o for o in TINY if not o.startswith(("data.source", "train.steps", "train.save_every", "model.patch_size",
                                                 "views.global_size", "views.local_size"))]
    sets += ["train.steps=1", "train.save_every=1", "views.global_size=8", "views.local_size=4", "model.patch_size=4"]
    args = ["train", "--data", cfg.source, "--out", str(tmp_path / "run"), "--no-progress"]
    assert _cli(*args, *[x for s in sets for x in ("--set", s)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if "no held-out split" in line] == [held_out_note(cfg, train, None)]  # one line
    assert _cli(*args[:-2], str(tmp_path / "run2"), "--no-progress", *[x for s in sets + ["data.val_fraction=0.25"]
                                                                       for x in ("--set", s)]) == 0
    assert "no held-out split" not in capsys.readouterr().err
    assert "knn_top1" in (tmp_path / "run2" / "metrics.jsonl").read_text()


def test_npz_keys_are_in_the_help_of_train_and_prepare(capsys):
    for args in (["train", "--help"], ["data", "prepare", "--help"]):
        assert _cli(*args) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "x_train" in text and "x_val" in text and "val" in text.split("x_test")[1][:80]


def _cli(*args: str) -> int:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code
