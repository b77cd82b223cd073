"""The repository stands alone: no pointer to notes outside it, and every method reference resolves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"
# Built from parts so this file does not match its own search.
OUTSIDE = ("METHOD" + ".md", "WORLD" + ".md", "STYLE" + ".md", "../" + "shared", "/work/" + "shared")


def tracked_files() -> list[Path]:
    """Files git tracks (or, outside a git checkout, every file but .git and caches)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and ".git" not in p.parts and "__pycache__" not in p.parts]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def text_of(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files hold no prose


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def method_sections() -> tuple[set[str], set[str]]:
    """Section numbers ("4", "4.4") and anchors of docs/method.md's headings."""
    numbers, anchors = set(), set()
    for line in METHOD.read_text().splitlines():
        m = re.match(r"#{2,4} (.+)", line)
        if m:
            anchors.add(github_anchor(m.group(1)))
            num = re.match(r"(\d+(?:\.\d+)?)\.? ", m.group(1))
            if num:
                numbers.add(num.group(1))
    return numbers, anchors


def test_no_tracked_file_points_outside_the_repository():
    found = []
    for path in tracked_files():
        text = text_of(path)
        for needle in OUTSIDE:
            if text and needle in text:
                line = text[: text.index(needle)].count("\n") + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {needle}")
    assert not found, "the repository must stand alone (point at docs/method.md instead): " + "; ".join(found)


def test_every_method_reference_names_a_section_that_exists():
    assert METHOD.is_file()
    numbers, anchors = method_sections()
    assert {"1", "2", "3", "4", "4.3", "4.4", "5", "6", "6.1", "6.3", "7"} <= numbers
    bad, count = [], 0
    for path in tracked_files():
        text = text_of(path) or ""
        for m in re.finditer(r"method\.md(?:'s)? sections? (\d+(?:\.\d+)?)(?:-(\d+))?", text):
            count += 1
            for num in filter(None, m.groups()):
                if num not in numbers:
                    bad.append(f"{path.relative_to(ROOT)}: section {num}")
        for m in re.finditer(r"\(method\.md#([\w\-]+)\)", text):
            count += 1
            if m.group(1) not in anchors:
                bad.append(f"{path.relative_to(ROOT)}: #{m.group(1)}")
    assert count >= 20, count  # the code, presets and docs do cite it
    assert not bad, bad


@pytest.mark.parametrize("claim", ["0.402 N", "N_global", "float32", "all_reduce_mean", "exp(-t^2/2)",
                                   "angle addition", "data.val_fraction", "loss / lambda^0.4"])
def test_method_page_covers_what_the_code_cites_it_for(claim):
    assert claim in METHOD.read_text()


@pytest.mark.parametrize("doc", ["README.md", "docs/recipes.md"])
def test_timings_say_they_are_for_an_idle_machine_and_how_to_pin_threads(doc):
    text = (ROOT / doc).read_text()
    first_minutes = re.search(r"\d+(?:\.\d+)? min", text)
    assert first_minutes and "idle" in text[: first_minutes.end() + 200], "say the minutes are for an idle machine"
    assert "OMP_NUM_THREADS=1" in text and "shared with other" in text


def test_the_readme_test_command_prints_its_passed_line():
    """`python -m pytest -q` plus an `addopts = -q` is -qq, which hides the "N passed" line CI reads."""
    import tomllib

    config = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    addopts = config["tool"]["pytest"]["ini_options"].get("addopts", "")
    assert "-q" not in str(addopts).split()
