"""What the commands write for files and pipes, and where they write it: presets verbatim, tables
that keep whole paths, plain flags in --help, output paths checked before the work, and embed
skipping undecodable files as prepare does."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from cli_run import invoke as run
from conftest import TINY
from data_fixtures import BAD_FILES, make_image_folder
from lejepa_cli.cli import app
from lejepa_cli.commands.presets import preset_description
from lejepa_cli.config import list_presets, load_config, preset_path
from lejepa_cli.errors import UserError
from lejepa_cli.outputs import check_output_file, check_output_folder
from lejepa_cli.terminal import plural

ROOT_SKIP = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")


# ---- presets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_presets())
def test_presets_show_round_trips_through_a_file(name, tmp_path, capsys):
    """`lejepa presets show NAME > my.yaml` is the preset, byte for byte, and loads as the same config."""
    code, out, _ = run(["presets", "show", name], capsys)
    assert code == 0
    assert out == preset_path(name).read_text()  # no wrapping, no markup, comments kept
    mine = tmp_path / f"{name}.yaml"
    mine.write_text(out)
    assert load_config(str(mine)).to_dict() == load_config(name).to_dict()


def test_preset_descriptions_are_whole_sentences(capsys):
    code, out, _ = run(["presets", "list"], capsys)
    assert code == 0 and "…" not in out
    for name in list_presets():
        text = preset_path(name).read_text()
        description = preset_description(text, name)
        assert description and not description.startswith(f"{name}:")
        assert description in out  # one row, not wrapped: the output is a pipe
        # It ends where a sentence ends: no dangling word or punctuation, and what follows it in
        # the opening comment (if anything) starts a new sentence.
        assert not re.search(r"(\b(a|an|the|on|of|for|and|or|with|to|in)|[,:;(/-])$", description), (name, description)
        paragraph = " ".join(line.lstrip("#").strip() for line in text.splitlines()[:8] if line.startswith("#"))
        rest = paragraph.split(description, 1)[1].strip() if description in paragraph else ""
        assert not rest or rest[0].isupper(), (name, rest[:40])
    assert "2-core CPU: linear 0.903" in preset_description(preset_path("fmnist").read_text(), "fmnist")


def test_description_of_a_sentence_over_several_lines():
    text = "# x: one long sentence that runs\n# over two lines. Then more.\n# Another sentence\ndata: {}\n"
    assert preset_description(text, "x") == "one long sentence that runs over two lines."
    assert preset_description("# x: title (no period)\n# Source: elsewhere\n", "x") == "title (no period)"


# ---- tables and help ----------------------------------------------------------------------------------


def test_piped_tables_keep_whole_paths(tmp_path, capsys):
    from lejepa_cli.data.prepare import prepare

    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "prepared-dataset-with-a-long-name"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (6, 8, 8, 3), dtype=np.uint8), y=np.arange(6) % 2)
    prepare(tmp_path / "d.npz", deep, workers=0, progress=False)
    code, out, _ = run(["data", "info", deep], capsys)
    assert code == 0 and "…" not in out and str(deep) in out
    assert "1 shard)" in out  # counted nouns


def test_help_shows_no_value_placeholder_on_flags(capsys):
    import typer

    def commands(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, [*path, name])

    paths = list(commands(typer.main.get_command(app), []))
    assert len(paths) > 10
    for path in paths:
        code, out, _ = run([*path, "--help"], capsys)
        assert code == 0 and "Usage" in out, path
        assert "<bool>" not in out, path


def test_plural():
    assert plural(1, "image") == "1 image" and plural(0, "image") == "0 images" and plural(2, "class") == "2 classes"
    assert plural(1, "class") == "1 class" and plural(3, "unreadable file") == "3 unreadable files"


# ---- output paths checked before the work -------------------------------------------------------------


def test_output_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "r.json", "--json") == tmp_path / "new" / "deeper" / "r.json"
    # Replacing a file of the user's needs --overwrite (issue 31: reports had replaced datasets' files).
    assert check_output_file(tmp_path / "f", "--json", overwrite=True) == tmp_path / "f"
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        check_output_file(tmp_path / "f", "--json")
    assert check_output_folder(tmp_path / "new", "--out") == tmp_path / "new"
    with pytest.raises(UserError, match="--json .* is a folder"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(UserError, match="--out .* is a file; give a folder"):
        check_output_folder(tmp_path / "f", "--out")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file(tmp_path / "f" / "r.json", "--json")
    assert not list(tmp_path.glob(".lejepa-write-test-*"))  # the write test leaves nothing behind


@ROOT_SKIP
def test_output_checks_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for check, target in ((check_output_file, ro / "x.npy"), (check_output_folder, ro / "plots"), (check_output_folder, ro)):
            with pytest.raises(UserError, match="cannot write"):
                check(target, "--out")
    finally:
        ro.chmod(0o755)


# ---- embed on a raw folder: undecodable files skipped and listed, as prepare does ----------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from lejepa_cli.train import train

    out = tmp_path_factory.mktemp("run")
    train(load_config("demo", TINY + ["train.steps=1", "train.save_every=1"]), out, progress=False)
    return out


def test_embed_skips_and_lists_undecodable_files_like_prepare(exported, tmp_path, capsys):
    from lejepa_cli.data.prepare import prepare

    folder = make_image_folder(tmp_path / "imgs", per_class=3)
    out = tmp_path / "emb.npy"
    code, _, err = run(["embed", exported, folder, "--out", out, "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    listed = [json.loads(line) for line in (tmp_path / "emb.skipped.jsonl").read_text().splitlines()]
    assert {r["path"] for r in listed} == BAD_FILES and all(r["reason"] for r in listed)
    assert f"skipped {len(BAD_FILES)} unreadable files, listed in {tmp_path / 'emb.skipped.jsonl'}" in " ".join(err.split())
    side = json.loads((tmp_path / "emb.ids.json").read_text())
    assert not set(side["ids"]) & BAD_FILES and side["skipped"] == len(BAD_FILES)
    assert np.load(out).shape[0] == len(side["ids"]) == len(side["labels"])
    # The same images, in the same order, as prepare keeps.
    s = prepare(folder, tmp_path / "prep", workers=0, progress=False)
    assert s["skipped"] == len(BAD_FILES) and len(side["ids"]) == sum(s["splits"].values())
    # Replacing the output with a clean folder's embedding removes the stale list.
    for bad in BAD_FILES:
        (folder / bad).unlink()
    code, _, err = run(["embed", exported, folder, "--out", out, "--overwrite", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0 and "skipped" not in err and not (tmp_path / "emb.skipped.jsonl").exists()


def test_embed_out_that_cannot_be_written_fails_before_loading(exported, tmp_path, capsys, monkeypatch):
    import lejepa_cli.image.embed as embed_mod

    monkeypatch.setattr(embed_mod, "load_encoder", lambda *a, **k: pytest.fail("loaded before checking --out"))
    (tmp_path / "f").write_text("x")
    code, _, err = run(["embed", exported, "builtin", "--out", tmp_path / "f" / "e.npy"], capsys)
    assert code == 2 and err.startswith("error: --out") and len(err.strip().splitlines()) == 1
