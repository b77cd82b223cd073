"""Property-based tests: no configuration and no command line ends in a traceback.

Every generated case either runs or ends with ONE line starting with "error:" and exit code 2
(bad input) or 1 (a run that failed); `--help` and `lejepa` alone print help. Cases run in this
process through `lejepa_cli.cli.main`; where a command would start real work (a 1000-step run, a
download), that one function is replaced by a recorder, so the layers the user's text goes
through (option parsing, presets, overrides, validation, resume resolution, file checks) are the
real ones. A handful of random valid configurations do train for real, for one step.
Hypothesis runs derandomized, so CI sees the same cases every time; counts are printed with -s.
"""

from __future__ import annotations

import dataclasses
import string
import time
import typing
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lejepa_cli.data.fetch as fetch_mod
import lejepa_cli.train as train_mod
from cli_run import invoke as _invoke
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint
from lejepa_cli.cli import main
from lejepa_cli.config import Config, config_from_dict, list_presets, load_config, validate
from lejepa_cli.errors import UserError

_BASE = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz(examples: int) -> settings:
    return settings(_BASE, max_examples=examples)


def _leaves(node: object, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out += _leaves(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", typing.get_type_hints(type(node))[f.name]))
    return out


LEAVES = _leaves(Config())
KEYS = [k for k, _ in LEAVES]
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- strategies -----------------------------------------------------------------------------------------

_garbage_text = st.text(alphabet=string.printable + "éß中\u00a0\u200b[]/\\{}", max_size=24)

keys = st.one_of(
    st.sampled_from(KEYS),  # real keys (most cases)
    st.sampled_from(KEYS),
    st.sampled_from(SECTIONS),  # a section, not a key
    st.builds(lambda s, g: f"{s}.{g}", st.sampled_from(SECTIONS), _garbage_text),  # unknown key of a real section
    st.builds(lambda k, g: f"{k}.{g}", st.sampled_from(KEYS), st.sampled_from(["x", "0", "", "lo"])),  # below a leaf
    _garbage_text,
    st.sampled_from(["", " ", ".", "..", "train.", ".steps", "TRAIN.STEPS", "train..steps", "[/x]", "[bold]", "a=b"]),
)

_number = st.one_of(st.integers(-(10**20), 10**20), st.integers(-3, 70_000),
                    st.floats(allow_nan=True, allow_infinity=True, width=64))
values = st.one_of(
    _number.map(repr),
    st.sampled_from(["true", "false", "yes", "no", "on", "off", "null", "~", "", "[]", "{}", ".inf", "-.inf", ".nan",
                     "1e400", "0x10", "0o7", "1_000", "2024-01-01", "!!python/object/apply:os.system ['true']",
                     "!!binary aGVsbG8=", "&a [*a]", "[1, 2", "{a: 1}", "'quoted'", "\"x\"", "auto", "cpu", "cuda:x",
                     "vit_tiny", "resnet18", "stop", "skip", "bf16", "builtin", "[0.5, 1.0]", "[0.5]", "[1, 2, 3]",
                     "[true, false]", "[.nan, 1]", "- a\n- b", "a: [", "%TAG"]),
    st.lists(_number, max_size=3).map(lambda xs: "[" + ", ".join(repr(x) for x in xs) + "]"),
    _garbage_text,
)
_WORDS = ["auto", "cpu", "cuda", "cuda:1", "mps", "fp32", "bf16", "stop", "skip", "builtin", "train", "val",
          "vit_tiny", "vit_small", "resnet18", "resnet50", "demo", "x"]


def _typed_value(hint: object) -> st.SearchStrategy[str]:
    """Values of the key's own type, mostly in range: the overrides a user means to write."""
    if hint is bool:
        return st.sampled_from(["true", "false"])
    if hint is int:
        return st.integers(-2, 300).map(str)
    if hint is float:
        return st.floats(-0.5, 3.0, allow_nan=False).map(repr)
    if hint is str:
        return st.sampled_from(_WORDS)
    return st.lists(st.floats(0.0, 1.5, allow_nan=False), min_size=1, max_size=3).map(lambda xs: str(list(xs)))


typed_items = st.sampled_from(LEAVES).flatmap(lambda kh: _typed_value(kh[1]).map(lambda v: f"{kh[0]}={v}"))
overrides = st.one_of(
    st.lists(typed_items, min_size=1, max_size=3),  # what a user means to write: often valid
    st.lists(st.one_of(typed_items, st.builds(lambda k, v: f"{k}={v}", keys, values), _garbage_text), min_size=1, max_size=4),
)
presets = st.one_of(st.sampled_from(list_presets()), st.sampled_from(["", "nosuch", "../demo", "demo.yaml", "vit-s "]))


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- configurations ----------------------------------------------------------------------------------------


def test_random_overrides_validate_or_name_the_problem_in_one_line():
    outcomes: Counter[str] = Counter()

    @fuzz(300)
    @given(preset=presets, items=overrides)
    def check(preset: str, items: list[str]) -> None:
        try:
            cfg = load_config(preset, items)
        except UserError as e:
            if not any("\n" in x for x in items):  # the CLI joins lines itself (see the CLI tests)
                assert "\n" not in str(e), str(e)
            assert str(e).strip()
            outcomes["error"] += 1
            return
        # A config that validates survives the trip through a checkpoint's metadata.
        assert config_from_dict(cfg.to_dict()) == validate(cfg)
        outcomes["valid"] += 1

    check()
    print(f"\nconfigurations fuzzed: {sum(outcomes.values())} ({dict(outcomes)})")
    assert outcomes["valid"] >= 30 and outcomes["error"] >= 150


# ---- command lines -----------------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch cwd, artefacts that are not what they claim, and recorders for long work."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LEJEPA_DEBUG", "0")  # and restored after: --debug sets it for the process
    (tmp_path / "notes.txt").write_text("not data\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    runs: list[Config] = []

    def record_train(cfg: Config, out: Path, **kwargs) -> dict:
        validate(cfg)  # what reached train() is a valid config
        runs.append(cfg)
        return {"step": 0, "checkpoint": str(out)}

    real_fetch = fetch_mod.fetch

    def offline_fetch(name, out, *, base_url=None, **kwargs):  # never the internet
        return real_fetch(name, out, base_url="http://127.0.0.1:1/", local_dirs=[], progress=False)

    monkeypatch.setattr(train_mod, "train", record_train)
    monkeypatch.setattr(fetch_mod, "fetch", offline_fetch)
    return tmp_path, runs


def _check_outcome(argv: list[str], code: int, out: str, err: str, outcomes: Counter) -> None:
    assert "Traceback" not in out + err, (argv, err)
    if code == 0:
        outcomes["ran"] += 1
    elif not err.strip():
        assert code == 2 and "Usage" in out, (argv, code, out)  # no command given: the help, as click does
        outcomes["help"] += 1
    else:
        line = _error_line(err)
        assert code in (1, 2), (argv, code, line)
        outcomes["one-line error"] += 1


_set_pairs = st.lists(st.tuples(st.sampled_from(["--set", "-s"]), st.one_of(
    st.builds(lambda k, v: f"{k}={v}", keys, values), _garbage_text)), max_size=4).map(lambda ps: [x for p in ps for x in p])


def test_random_train_command_lines_run_or_fail_in_one_line(workdir, capsys):
    root, runs = workdir
    outcomes: Counter[str] = Counter()
    options = st.lists(st.one_of(
        _set_pairs,
        st.tuples(st.sampled_from(["--preset", "-p"]), presets).map(list),
        st.tuples(st.just("--data"), st.sampled_from(["builtin", "notes.txt", "empty", "missing", "fake.safetensors", ""])).map(list),
        st.tuples(st.just("--resume"), st.sampled_from(["auto", "fake.safetensors", "notes.txt", "missing", "empty", ""])).map(list),
        st.tuples(st.just("--init-from"), st.sampled_from(["fake.safetensors", "missing"])).map(list),
        st.tuples(st.sampled_from(["--out", "-o"]), st.sampled_from(["run", "empty", "notes.txt", "a/b"])).map(list),
        st.sampled_from([["--overwrite"], ["--no-progress"], ["--bogus"], ["-x"], ["--set"], ["--resume"], ["extra"], ["--help"]]),
    ), max_size=5).map(lambda groups: [x for g in groups for x in g])

    @fuzz(80)
    @given(argv=options)
    def check(argv: list[str]) -> None:
        code, out, err = _invoke(["train", *argv], capsys)
        _check_outcome(argv, code, out, err, outcomes)

    check()
    print(f"\ntrain command lines fuzzed: {sum(outcomes.values())} ({dict(outcomes)}), {len(runs)} reached train()")
    assert outcomes["ran"] >= 10 and outcomes["one-line error"] >= 30 and len(runs) >= 5


_TOKENS = [
    "train", "presets", "list", "show", "data", "prepare", "info", "fetch", "probe", "viz", "export", "embed",
    "demo", "vit-s", "nosuch", "mnist", "cifar10", "--help", "--version", "--out", "-o", "--set", "x=1",
    "train.steps=abc", "--dtype", "fp32", "bf16", "int3", "--format", "onnx", "safetensors", "--resolution", "0", "8",
    "-5", "abc", "--workers", "0", "--val-fraction", "0.5", "2", "--device", "cpu", "cuda:9", "--batch-size",
    "--split", "nosuch", "--features", "probe", "--base-url", "http://127.0.0.1:1/", "--verify", "--label-free",
    "--random-init", "--no-shift", "--epochs", "--image", "--json", "--overwrite", "--max-train", "--", "-",
    "notes.txt", "empty", "missing", "fake.safetensors", "out", "[/x]", "", " ", "é",
]


_COMMANDS = [[], ["--version"], ["--help"], ["presets", "list"], ["presets", "show"], ["train"], ["data"], ["data", "prepare"],
             ["data", "info"], ["data", "fetch"], ["probe"], ["viz"], ["export"], ["embed"], ["nosuch"]]


def test_random_command_lines_across_the_cli(workdir, capsys):
    outcomes: Counter[str] = Counter()

    @fuzz(150)
    @given(head=st.sampled_from(_COMMANDS), tail=st.lists(st.one_of(st.sampled_from(_TOKENS), _garbage_text), max_size=5))
    def check(head: list[str], tail: list[str]) -> None:
        argv = head + tail
        code, out, err = _invoke(argv, capsys)
        _check_outcome(argv, code, out, err, outcomes)

    check()
    print(f"\ncommand lines fuzzed: {sum(outcomes.values())} ({dict(outcomes)})")
    assert outcomes["one-line error"] >= 75 and outcomes["ran"] + outcomes["help"] >= 10


def test_scientific_notation_without_a_dot_is_a_number():
    """YAML 1.1 reads 1e-4 as a string; `--set optim.lr=1e-4` must still mean 0.0001 (found by the fuzzer)."""
    assert load_config("demo", ["optim.lr=1e-4", "loss.lamb=5E-2"]).optim.lr == 1e-4
    with pytest.raises(UserError, match="finite"):
        load_config("demo", ["optim.lr=1e999"])


def test_debug_flag_shows_the_traceback_instead(workdir, capsys):
    with pytest.raises(UserError, match="config key 'train.steps'"):
        main(["--debug", "train", "--set", "train.steps=abc"])


# ---- a few random valid configurations train for real ------------------------------------------------------


def test_a_few_random_valid_configurations_train_one_step(tmp_path, capsys):
    base = ["data.source=builtin", "data.builtin_train=16", "data.builtin_val=8", "data.builtin_size=16",
            "views.global_size=16", "model.arch=vit_tiny", "model.proj_hidden=32", "train.steps=1", "train.device=cpu",
            "train.save_every=1", "log.every=1"]
    choices = st.fixed_dictionaries({
        "views.global_views": st.integers(1, 3), "views.local_views": st.integers(0, 2),
        "views.local_size": st.sampled_from([4, 8, 12]), "model.patch_size": st.sampled_from([4, 8, 16, 5]),
        "model.proj_dim": st.integers(1, 16), "model.drop_path": st.floats(0, 0.9),
        "loss.lamb": st.floats(0, 1), "loss.num_slices": st.integers(1, 64), "loss.num_knots": st.integers(2, 9),
        "loss.t_max": st.floats(0.1, 10), "optim.lr": st.floats(1e-6, 10), "train.batch_size": st.sampled_from([2, 4, 8, 16]),
        "train.grad_accum": st.sampled_from([1, 2]), "train.precision": st.sampled_from(["fp32", "bf16"]),
        "train.online_probe": st.booleans(), "train.on_nonfinite": st.sampled_from(["stop", "skip"]),
    })
    outcomes: Counter[str] = Counter()

    @fuzz(4)
    @given(values=choices)
    def check(values: dict) -> None:
        out = tmp_path / f"run{sum(outcomes.values())}"
        argv = ["train", "--out", str(out), "--no-progress"]
        for item in base + [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()]:
            argv += ["--set", item]
        code, _, err = _invoke(argv, capsys)
        assert "Traceback" not in err
        if code == 0:
            assert load_checkpoint(list_checkpoints(out / "checkpoints")[-1])[1]["step"] == 1
            outcomes["trained"] += 1
        else:
            lines = [x for x in err.splitlines() if x.strip()]
            assert code in (1, 2) and lines[-1].startswith("error: ") and sum(x.startswith("error:") for x in lines) == 1, err
            outcomes["one-line error"] += 1

    check()
    print(f"\nreal one-step runs fuzzed: {sum(outcomes.values())} ({dict(outcomes)})")
    assert outcomes["trained"] >= 2


# ---- every numeric option of every command -----------------------------------------------------------------
#
# Found by walking the Typer/Click app, so an option added later is fuzzed without touching this file;
# a new command with numeric options needs a base command line below (the test says so). Each option
# gets edge values on top of a base command line that runs for real on a tiny run made once.

EDGE_VALUES = ["0", "-1", "-5", "1", "2", "16", str(10**12), "nan", "inf", "0.5", "abc"]


def _numeric_kind(param: object) -> str | None:
    """'int' or 'float' for an option taking a number; None otherwise (typer may vendor click, so duck-typed)."""
    if getattr(param, "param_type_name", None) != "option" or getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    descriptor = getattr(param, "type_descriptor", None)  # typer >= 0.20 parses values itself
    if descriptor is not None:
        return {int: "int", float: "float"}.get(descriptor.annotation)
    name = getattr(getattr(param, "type", None), "name", "")  # click's INT, FLOAT, IntRange, FloatRange
    return "int" if name.startswith("integer") else "float" if name.startswith("float") else None


def numeric_options() -> list[tuple[tuple[str, ...], str, str, list]]:
    """(command path, option, 'int' | 'float', its declared min/max) for every numeric option of the `lejepa` app."""
    import typer

    from lejepa_cli.cli import app

    found = []

    def walk(command, path: tuple[str, ...]) -> None:
        for param in command.params:
            kind = _numeric_kind(param)
            if kind:
                bounds = [b for b in (getattr(param, "min", None), getattr(param, "max", None)) if b is not None]
                found.append((path, max(param.opts, key=len), kind, bounds))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 2-step run and a 12-image .npz, made once: what the base command lines point at."""
    import numpy as np

    from conftest import TINY
    from lejepa_cli.train import train

    root = tmp_path_factory.mktemp("numeric")
    train(load_config("demo", TINY + ["train.steps=2", "train.save_every=2"]), root / "run", progress=False)
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", x=rng.integers(0, 255, (12, 8, 8, 3), dtype=np.uint8), y=np.arange(12) % 3)
    return root


def _base_command_lines(root: Path) -> dict[tuple[str, ...], list[str]]:
    """A command line per command that runs in about a second; the fuzzed option is appended (the last wins)."""
    from conftest import TINY

    run = str(root / "run")
    return {
        ("probe",): [run, "--no-progress", "--no-conditions", "--epochs", "1", "--shift-images", "4", "--device", "cpu"],
        ("viz",): [run, "--out", str(root / "viz"), "--num-images", "2", "--device", "cpu"],
        ("embed",): [run, str(root / "d.npz"), "--out", str(root / "e.npy"), "--overwrite", "--no-progress", "--device", "cpu"],
        ("data", "prepare"): [str(root / "d.npz"), "--out", str(root / "prep"), "--overwrite", "--workers", "0",
                              "--val-fraction", "0.25"],
        ("bench",): ["--quick", "--only", "sigreg"],  # the suite itself is replaced by a recorder below
        ("adapt",): [run, "--data", str(root / "d.npz"), "--out", str(root / "adapted"), "--overwrite", "--steps", "1"],
        ("world", "simulate"): ["two-room", "--out", str(root / "w"), "--episodes", "2", "--steps", "4",
                                "--val-episodes", "0", "--size", "16", "--overwrite", "--no-progress"],
        ("train",): ["--out", str(root / "t"), "--overwrite", "--no-progress",
                     *[x for item in TINY + ["train.steps=1"] for x in ("--set", item)]],
    }


def test_every_numeric_option_of_every_command_takes_edge_values(tiny_world, capsys, monkeypatch):
    """0, negatives, 1, huge, nan, inf, fractions and words for each numeric option: the command runs
    (exit 0) or ends in ONE line (exit 2 for the value, 1 for the machine), never a traceback; and each
    option both accepts a value and rejects one (it has a range, and the base command line is valid)."""
    import types

    import lejepa_cli.commands.bench as bench_cmd

    monkeypatch.chdir(tiny_world)
    monkeypatch.setenv("LEJEPA_CACHE_DIR", str(tiny_world / "cache"))
    monkeypatch.setenv("LEJEPA_DEBUG", "0")
    threads_seen: list = []
    suite = types.SimpleNamespace(run_suite=lambda quick, only, threads, progress: threads_seen.append(threads) or {},
                                  failed=lambda doc: [])
    monkeypatch.setattr(bench_cmd, "load_suite", lambda: suite)  # minutes of benchmarking: not the point here
    bases = _base_command_lines(tiny_world)
    # `lejepa world plan|probe|surprise|stress` need a world run: test_world_use.py sweeps them the same way.
    from test_world_use import use_command_lines

    elsewhere = set(use_command_lines(tiny_world))
    options = [o for o in numeric_options() if o[0] not in elsewhere]
    assert {"--epochs", "--max-train", "--shift-images", "--batch-size", "--num-images", "--workers"} <= {o for _, o, _, _ in options}
    missing = sorted({" ".join(path) for path, _, _, _ in options if path not in bases})
    assert not missing, f"add a base command line for `lejepa {missing[0]}` to _base_command_lines"
    report = []
    for path, option, kind, bounds in options:
        t0 = time.perf_counter()
        codes = Counter()
        edges = [str(b + d) for b in bounds for d in (-1, 0, 1)]  # either side of each declared bound
        for value in dict.fromkeys(EDGE_VALUES + edges):
            argv = [*path, *bases[path], option, value]
            code, out, err = _invoke(argv, capsys)
            assert "Traceback" not in out + err, (argv, err)
            if code != 0:
                line = _error_line(err)
                assert code in (1, 2), (argv, code, line)
            if kind == "int" and value in ("nan", "inf", "0.5", "abc"):
                assert code == 2, (argv, code)  # not a whole number: a usage error
            codes[code] += 1
        assert codes[0] and codes[2], (path, option, dict(codes))  # a valid value runs, a bad one is refused
        report.append(f"{' '.join(path)} {option}: {dict(codes)} {time.perf_counter() - t0:.1f}s")
    assert threads_seen and all(1 <= t <= bench_cmd.MAX_THREADS for t in threads_seen)
    print(f"\nnumeric options fuzzed: {len(options)}, {len(EDGE_VALUES)}+ values each\n  " + "\n  ".join(report))
