"""Training survives kills and non-finite numbers.

The kill test drives real `python -m lejepa_cli train` processes: one uninterrupted reference run
and, beside it, one run folder that is SIGKILLed at seeded random moments (at start-up, between
steps, in the middle of a checkpoint write), stopped by SIGTERM and SIGINT, and refused its disk,
each time continued with `--resume auto`. It must end bit for bit where the reference ends.
Helpers, thread pinning and the tiny settings come from test_reliability.py.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import lejepa_cli.checkpoint as checkpoint_mod
import lejepa_cli.image.objective as image_mod
from lejepa_cli.checkpoint import list_checkpoints, load_checkpoint
from lejepa_cli.config import load_config
from lejepa_cli.errors import RunFailed
from lejepa_cli.train import train
from test_reliability import (  # noqa: F401  (_one_thread, _cli_on_one_thread: autouse fixtures, active here too)
    ENV, REPO, _cli_on_one_thread, _one_thread, assert_identical, fast, final_error_line, newest_step, run_cli, squash,
    step_records, temp_files, tensors_of,
)


# ---- kills -----------------------------------------------------------------------------------------


class Trainer:
    """One `lejepa train` subprocess whose stderr is collected by a thread."""

    def __init__(self, out: Path, steps: int, save_every: int, *, resume: bool, fsize_limit: int | None = None):
        sets = [a for o in fast(f"train.steps={steps}", f"train.save_every={save_every}") for a in ("--set", o)]
        cmd = [sys.executable, "-m", "lejepa_cli", "train", "--preset", "demo", "--out", str(out), "--no-progress", *sets]
        cmd += ["--resume", "auto"] if resume else []
        limit = None if fsize_limit is None else (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit)))
        self.out = out
        self.stale_temps = temp_files(out)  # left by an earlier killed writer
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=limit)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True)
        self._reader.start()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, what: str, poll: float, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"train exited ({self.proc.returncode}) before {what}:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} within {timeout} s:\n{self.stderr}")
            time.sleep(poll)

    def wait_in_loop(self, step: int) -> None:
        """Until this process has logged step `step` (lines of earlier processes are trimmed before its header)."""
        def stepped() -> bool:
            if not any("global batch" in line for line in self.lines):
                return False
            text = (self.out / "metrics.jsonl").read_text()
            last = text.splitlines()[-1] if text.endswith("\n") and text.strip() else "{}"
            return json.loads(last).get("step", 0) >= step and "loss" in last
        self.wait_for(stepped, f"step {step}", poll=0.01)

    def wait_writing(self, completed_writes: int) -> None:
        """Until a checkpoint write is in progress after `completed_writes` new checkpoints of this process."""
        folder = self.out / "checkpoints"
        before = set(os.listdir(folder))

        def writing() -> bool:  # one listdir a poll: this loop shares the CPU with the trainer
            names = set(os.listdir(folder)) - before
            temps = {n for n in names if n.startswith(".")} - self.stale_temps
            return len(names - temps) >= completed_writes and bool(temps)
        self.wait_for(writing, "a checkpoint write", poll=0.002)

    def finish(self, timeout: float = 300.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)


def test_kills_at_random_moments_then_resume_is_bit_exact(tmp_path):
    steps, every, rng = 36, 3, random.Random(20240808)
    reference = Trainer(tmp_path / "reference", steps, every, resume=False)  # runs beside the chain
    run = tmp_path / "run"
    # Ten SIGKILLs in a seeded order (the first after step 4, so a checkpoint exists), with SIGTERM,
    # SIGINT and a full disk at seeded places among them.
    plan = ["step"] + rng.sample(["startup"] * 2 + ["step"] * 3 + ["write"] * 4, 9)
    for kind in ("SIGTERM", "SIGINT", "disk-full"):
        plan.insert(rng.randrange(1, len(plan) + 1), kind)
    kills = mid_write = 0
    log: list[str] = []
    for i, kind in enumerate(plan):
        before = newest_step(run)
        trainer = Trainer(run, steps, every, resume=True, fsize_limit=8 << 20 if kind == "disk-full" else None)
        if kind == "startup":  # importing, loading the checkpoint, trimming metrics.jsonl ...
            time.sleep(rng.uniform(0.2, 2.5))
        elif kind == "step":
            trainer.wait_in_loop(4 if i == 0 else before + rng.randint(1, 3))
        elif kind == "write":  # during this process's first or second checkpoint write
            trainer.wait_in_loop(before + 1)
            trainer.wait_writing(rng.randrange(2))
            time.sleep(rng.uniform(0.0, 0.01))
        elif kind in ("SIGTERM", "SIGINT"):
            trainer.wait_in_loop(before + 1)
        if kind != "disk-full":
            trainer.kill(getattr(signal, kind) if kind.startswith("SIG") else signal.SIGKILL)
        rc = trainer.finish()
        now = newest_step(run)
        if kind in ("startup", "step", "write"):
            assert rc == -signal.SIGKILL, f"{kind}: {rc}\n{trainer.stderr}"
            kills += 1
            if kind == "write" and temp_files(run) - trainer.stale_temps:
                mid_write += 1  # it died with its temporary file in place: the write was cut short
        elif kind == "disk-full":  # RLIMIT_FSIZE: the write fails with EFBIG, as on a full disk
            line = final_error_line(trainer.stderr)
            assert rc == 1 and "could not write checkpoint" in line and "the previous checkpoints are intact" in line
            assert now == before > 0 and not temp_files(run) - trainer.stale_temps  # nothing half-written left
        else:
            line = final_error_line(trainer.stderr)
            match = re.fullmatch(rf"error: stopped by {kind} after step (\d+); checkpoint saved, continue with --resume auto", line)
            assert rc == 1 and match, trainer.stderr
            assert int(match.group(1)) == now > before  # the step it names is the checkpoint it saved
        assert "Traceback" not in trainer.stderr, trainer.stderr
        assert now >= before and now < steps
        if now:  # the newest checkpoint is always complete: it loads and its checksum matches
            assert load_checkpoint(run / "checkpoints" / checkpoint_mod.checkpoint_name(now))[1]["step"] == now
        log.append(f"{kind}@{before}->{now}")
    final = Trainer(run, steps, every, resume=True)
    assert final.finish() == 0, final.stderr
    assert reference.finish() == 0, reference.stderr
    assert f"resuming from {run / 'checkpoints'}" in final.stderr

    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == [checkpoint_mod.checkpoint_name(s) for s in (30, 33, 36)], log
    assert not temp_files(run)  # temporaries of killed writes were cleaned up
    assert_identical(tensors_of(ckpts[-1]), tensors_of(tmp_path / "reference" / "checkpoints" / ckpts[-1].name))
    assert step_records(run) == step_records(tmp_path / "reference")  # every step logged once, same losses
    assert kills == 10 and mid_write >= 1, log
    print(f"\nkills survived: {kills} SIGKILL ({mid_write} mid-write) + SIGTERM + SIGINT + disk full: {' '.join(log)}")


# ---- numerical faults (test_train.py covers a NaN loss with stop and an inf loss with skip) -----------------


def _poison_views(monkeypatch, bad_steps: set[int], value: float = float("nan")) -> None:
    """One NaN (or inf) pixel in the global views of the given 0-based steps."""
    real, calls = image_mod.make_views, [0]

    def make_views(*args, **kwargs):
        global_views, local_views = real(*args, **kwargs)
        if calls[0] in bad_steps:
            global_views = global_views.clone()
            global_views.view(-1)[0] = value
        calls[0] += 1
        return global_views, local_views

    monkeypatch.setattr(image_mod, "make_views", make_views)


def test_nan_input_found_at_a_save_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    # log.every=3: the NaN of step 3 is read first at the step-4 save, which must not happen.
    _poison_views(monkeypatch, {3})
    sets = [a for o in fast("train.steps=6", "log.every=3") for a in ("--set", o)]
    code, err = run_cli(capsys, "train", "--out", tmp_path / "run", "--no-progress", *sets)
    line = final_error_line(err)
    assert code == 1 and line.startswith("error: non-finite loss at step 3; stopping"), line
    assert "step-000000002.safetensors" in line
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-000000002.safetensors"]
    assert all(torch.isfinite(t).all() for t in tensors_of(ckpts[0]).values() if t.is_floating_point())


def test_inf_loss_on_the_first_step_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    real = image_mod.lejepa_loss

    def poisoned(z, *, step, **kw):
        parts = real(z, step=step, **kw)
        parts["loss"] = parts["loss"] + float("inf")
        return parts

    monkeypatch.setattr(image_mod, "lejepa_loss", poisoned)
    with pytest.raises(RunFailed, match=r"non-finite loss at step 0; stopping \(no checkpoint was written\)"):
        train(load_config("demo", fast()), tmp_path / "run", progress=False)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_skip_mode_survives_nan_input_without_poisoning_any_state(tmp_path, capsys, monkeypatch):
    _poison_views(monkeypatch, {1, 2})
    train(load_config("demo", fast("train.on_nonfinite=skip")), tmp_path / "run", progress=False)
    err = squash(capsys.readouterr().err)
    assert squash("step 1: non-finite loss, update skipped") in err and squash("step 2: non-finite loss, update skipped") in err
    tensors = tensors_of(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad  # weights, optimizer moments, BatchNorm statistics and the online probe
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(lines[-1]["knn_top1"]) and math.isfinite(lines[-2]["loss"])
