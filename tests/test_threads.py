"""The default CPU thread count: the user's pin wins; a busy machine gets one thread; else torch's."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lejepa_cli import threads


def test_a_pinned_count_wins_over_the_load() -> None:
    assert threads.choose({"OMP_NUM_THREADS": "3"}, load=50.0, cores=2) == (3, "pinned by OMP_NUM_THREADS=3")
    assert threads.choose({"LEJEPA_THREADS": "2", "OMP_NUM_THREADS": "5"}, load=0.0, cores=2)[0] == 2
    count, why = threads.choose({"OMP_NUM_THREADS": "many"}, load=50.0, cores=2)
    assert count is None and "not a positive integer" in why


def test_a_busy_machine_gets_one_thread_an_idle_one_torchs_default() -> None:
    count, why = threads.choose({}, load=7.5, cores=2)
    assert count == 1 and "load 7.5 on 2 cores" in why and "OMP_NUM_THREADS" in why
    count, why = threads.choose({}, load=0.4, cores=2)
    assert count is None and why.startswith("torch's default")
    assert threads.choose({}, load=9.0, cores=1)[0] is None  # one core: nothing to choose


def test_the_cli_sets_one_thread_before_torch_on_a_busy_machine() -> None:
    """The choice must happen before torch reads OMP_NUM_THREADS at import, as `lejepa` makes it."""
    code = ("import os; from lejepa_cli import threads; os.getloadavg = lambda: (99.0, 99.0, 99.0); "
            "threads.apply_default(); import torch; print(torch.get_num_threads(), threads.choice())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LEJEPA_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if threads.usable_cores() > 1:
        assert out.startswith("1 1 thread: 1-minute load 99.0")


def test_torch_already_imported_gets_the_count_too(monkeypatch) -> None:
    monkeypatch.delenv("LEJEPA_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        threads.apply_default()
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert "load 99.0 on 2 cores" in threads.choice()
    finally:
        torch.set_num_threads(before)
