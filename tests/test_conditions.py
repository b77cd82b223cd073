"""Normality / isotropy diagnostics: the statistic, its calibration, and the verdict on known shapes."""

from __future__ import annotations

import json

import pytest
import torch

from lejepa_cli.image import conditions
from lejepa_cli.image.conditions import critical_value, diagnose, effective_rank, epps_pulley
from lejepa_cli.sigreg import random_directions, sigreg, sigreg_reference

N, D = 1000, 48


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration")


def sample(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_epps_pulley_per_direction_averages_to_sigreg():
    x = sample(1)[:300]
    a = random_directions(D, 40, step=7).double()
    per_direction = epps_pulley(x @ a)  # (40,)
    assert per_direction.shape == (40,)
    assert torch.allclose(per_direction.mean(), sigreg(x, step=0, directions=a), rtol=1e-9)
    assert torch.allclose(per_direction.mean(), sigreg_reference(x, step=0, directions=a), rtol=1e-9)
    # float32 path agrees too
    assert torch.allclose(epps_pulley((x @ a).float()).double(), per_direction, rtol=1e-3, atol=1e-4)


def test_critical_value_has_its_level_and_is_cached(calib, monkeypatch):
    crit = critical_value(200, cache_dir=calib)
    assert (calib / "ep_critical.json").is_file()
    # Fresh Gaussian samples (another seed), centred as the calibration assumes, exceed it ~5% of the time.
    fresh = torch.randn(200, 3000, generator=torch.Generator().manual_seed(99))
    fresh -= fresh.mean(0)
    rejected = float((epps_pulley(fresh) > crit).float().mean())
    assert 0.03 < rejected < 0.07
    # A second call reads the cache and computes nothing.
    monkeypatch.setattr(conditions, "epps_pulley", lambda *a, **k: pytest.fail("recomputed a cached value"))
    assert critical_value(200, cache_dir=calib) == crit


def test_effective_rank_extremes():
    assert effective_rank(torch.ones(10)) == pytest.approx(10.0)
    assert effective_rank(torch.tensor([5.0, 0, 0, 0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(4)) == 0.0


def test_gaussian_is_near_isotropic_gaussian(calib):
    report = diagnose(sample(2), cache_dir=calib)
    assert report["failed"] == [], report["verdict"]
    assert report["verdict"].startswith("near isotropic Gaussian")
    assert 0.88 <= report["pass_rate"] <= 1.0  # ~95% at the 5% level
    assert report["effective_rank_ratio"] == pytest.approx(1.0, abs=0.05)
    assert abs(report["median_excess_kurtosis"]) < 0.3
    assert report["sigreg"] == pytest.approx(report["sigreg_gaussian"], rel=0.5)
    assert len(report["eigenvalues"]) == len(report["mean"]) == len(report["std"]) == D
    json.dumps(report, allow_nan=False)  # JSON-ready: no inf / nan


def test_offset_and_overall_scale_do_not_matter(calib):
    x = sample(3)
    a, b = diagnose(x, cache_dir=calib), diagnose(4.0 * x - 7.0, cache_dir=calib)
    assert a["pass_rate"] == b["pass_rate"] and a["verdict"] == b["verdict"]
    assert b["scale"] == pytest.approx(4.0 * a["scale"]) and b["mean_norm"] > 40


def test_collapse_is_reported(calib):
    constant = torch.full((N, D), 0.3, dtype=torch.float64)
    report = diagnose(constant, cache_dir=calib)
    assert report["failed"] == ["collapse"] and report["verdict"].startswith("collapse")
    json.dumps(report, allow_nan=False)
    # Dimensional collapse: everything on one line in D dimensions.
    line = torch.randn(N, 1, dtype=torch.float64) @ torch.randn(1, D, dtype=torch.float64)
    assert diagnose(line, cache_dir=calib)["failed"] == ["collapse"]


def test_heavy_tails_are_reported(calib):
    t2 = torch.distributions.StudentT(torch.tensor(2.0, dtype=torch.float64)).sample((N, D))
    report = diagnose(t2, cache_dir=calib)
    assert "heavy_tails" in report["failed"], report["verdict"]
    assert "heavy tails" in report["verdict"]
    assert report["pass_rate"] < 0.5


def test_anisotropy_is_reported(calib):
    x = sample(4) * (0.85 ** torch.arange(D, dtype=torch.float64))  # geometric spectrum
    report = diagnose(x, cache_dir=calib)
    assert report["failed"] == ["anisotropy"], report["verdict"]
    assert report["verdict"].startswith("anisotropy")
    assert report["effective_rank_ratio"] < 0.5
    assert report["condition_number"] > 100 * report["condition_number_gaussian"]
    # Milder: standard deviations spread over 0.5 .. 1.5 is still caught.
    mild = diagnose(sample(5) * torch.linspace(0.5, 1.5, D, dtype=torch.float64), cache_dir=calib)
    assert mild["failed"] == ["anisotropy"], mild["verdict"]
