"""Are LeJEPA's conditions met? Normality and isotropy diagnostics of an embedding sample.

LeJEPA's theory says the best embedding distribution for downstream prediction is an isotropic
Gaussian, and SIGReg pushes towards it. `diagnose(h)` measures how close a sample (N, D) is:

- the SIGReg statistic on fixed random directions (about 1 for i.i.d. N(0, I) rows);
- the fraction of random 1-D projections that pass an Epps-Pulley normality test at level
  alpha (about 1 - alpha for a Gaussian; the critical value is calibrated by Monte-Carlo on
  Gaussian samples of the same N and cached);
- the covariance eigenvalue spectrum, effective rank and condition number, compared with those
  of an N(0, I) sample of the same shape (a finite sample's spectrum is never flat);
- per-dimension mean and std, and the median excess kurtosis of the projections;
- a one-line verdict: "near isotropic Gaussian", or which condition fails (collapse,
  anisotropy, heavy tails, other non-Gaussian shape);
- `explain(...)`: which embedding a verdict is about (the backbone output h that probes read, or
  the projector output z that SIGReg acts on) and what it means next to the linear probe, so a
  narrow projector is never reported as a collapsed encoder.

The shape is what is tested: the sample is centred and divided by ONE global scale (the RMS
std over dimensions) first, so an offset or an overall scale does not fail the test but
unequal variances and correlations (anisotropy) do. Offset and scale are reported beside it.

    report = diagnose(embeddings)          # embeddings: (N, D) float tensor
    print(report["verdict"])
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lejepa_cli.sigreg import epps_pulley, random_directions, sigreg

# Thresholds of the verdict. Ratios compare with an N(0, I) sample of the same N and D.
COLLAPSE_RANK_RATIO = 0.05  # effective rank below 5% of an isotropic sample's: dimensional collapse
ANISOTROPY_RANK_RATIO = 0.8  # below 80%: variance concentrated in a subspace
ANISOTROPY_CONDITION_RATIO = 3.0  # or a condition number over 3x an isotropic sample's
NULL_EIGENVALUE = 1e-9  # relative to the largest: numerically zero
MIN_PASS_RATE = 0.8  # a Gaussian passes ~95% of projections at alpha = 0.05
HEAVY_TAIL_KURTOSIS = 1.0  # median excess kurtosis of projections (0 for a Gaussian, 6 for Student-t df=5)


def critical_value(
    n: int, *, alpha: float = 0.05, draws: int = 4000, t_max: float = 3.0, num_knots: int = 17,
    seed: int = 0, cache_dir: Path | None = None,
) -> float:
    """The (1 - alpha) quantile of the Epps-Pulley statistic for N centred N(0, 1) samples.

    Estimated from `draws` Monte-Carlo samples (centred like the data `diagnose` tests, since
    centring makes the statistic smaller). With `cache_dir`, the value is stored in
    `cache_dir/ep_critical.json` and reused for the same (n, alpha, draws, knots, t_max, seed).
    """
    key = f"n={n},alpha={alpha},draws={draws},t_max={t_max},knots={num_knots},seed={seed},centred"
    path = cache_dir / "ep_critical.json" if cache_dir is not None else None
    table: dict[str, float] = {}
    if path is not None and path.is_file():
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):  # undecodable text too
            table = {}  # a damaged cache is recomputed, not fatal
        if key in table:
            return float(table[key])
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randn(n, draws, generator=gen)
    samples -= samples.mean(dim=0, keepdim=True)
    stats = epps_pulley(samples, t_max=t_max, num_knots=num_knots)
    value = float(torch.quantile(stats, 1.0 - alpha))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        table[key] = value
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return value


def effective_rank(eigenvalues: torch.Tensor) -> float:
    """exp(entropy of the normalised spectrum) (Roy & Vetterli 2007): D for a flat spectrum, 1 for rank one."""
    lam = eigenvalues.clamp_min(0).double()
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def covariance_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the sample covariance of x (N, D), descending, float64 (D,)."""
    xc = x.double() - x.double().mean(dim=0, keepdim=True)
    cov = xc.T @ xc / max(1, len(x) - 1)  # (D, D)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)


def _null_dims(eigs: torch.Tensor) -> int:
    """Eigenvalues that are zero up to rounding: fewer samples than dimensions, or an exact linear
    constraint (a LayerNorm output, e.g. a ViT's CLS embedding, always has one)."""
    return int((eigs <= NULL_EIGENVALUE * eigs[0]).sum())


def _condition_number(eigs: torch.Tensor) -> float:
    """Largest over smallest eigenvalue of the non-null part of the spectrum."""
    live = eigs[eigs > NULL_EIGENVALUE * eigs[0]]
    return float(live[0] / live[-1]) if len(live) else math.inf


def diagnose(
    embeddings: torch.Tensor, *, num_slices: int = 1024, seed: int = 0, alpha: float = 0.05,
    t_max: float = 3.0, num_knots: int = 17, cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Normality / isotropy statistics of embeddings (N, D) and a verdict; JSON-serialisable.

    Keys: n, dim, verdict, failed (list of "collapse" | "anisotropy" | "heavy_tails" |
    "non_gaussian"), sigreg, pass_rate, critical_value, alpha, num_slices, median_excess_kurtosis,
    sigreg_gaussian, effective_rank, effective_rank_gaussian, effective_rank_ratio, condition_number
    (over the non-null spectrum), condition_number_gaussian, null_dims, null_dims_gaussian,
    eigenvalues, mean, std, mean_norm, scale. "..._gaussian" values are those of an N(0, I)
    sample of the same shape, standardised alike: the finite-sample reference.
    """
    h = embeddings.detach().double().cpu()  # (N, D)
    n, d = h.shape
    mean, std = h.mean(0), h.std(0)
    scale = float(std.square().mean().sqrt())  # RMS std over dimensions
    out: dict[str, Any] = {
        "n": n, "dim": d, "alpha": alpha, "num_slices": num_slices,
        "mean_norm": float(mean.norm()), "scale": scale,
        "mean": mean.tolist(), "std": std.tolist(),
    }
    if not math.isfinite(scale) or scale <= 1e-8 * (1.0 + float(mean.abs().max())):
        out.update({
            "verdict": "collapse: all embeddings are (nearly) identical", "failed": ["collapse"],
            "sigreg": None, "pass_rate": 0.0, "critical_value": None, "median_excess_kurtosis": None,
            "effective_rank": 0.0, "effective_rank_gaussian": None, "effective_rank_ratio": 0.0,
            "condition_number": math.inf, "condition_number_gaussian": None, "null_dims": d,
            "null_dims_gaussian": None, "eigenvalues": [0.0] * d,
        })
        return _finite_json(out)

    x = (h - mean) / scale  # (N, D): centred, one global scale
    eigs = covariance_spectrum(x)
    gen = torch.Generator().manual_seed(seed + 1)
    ref = torch.randn(n, d, generator=gen, dtype=torch.float64)
    ref = (ref - ref.mean(0)) / ref.std(0).square().mean().sqrt()  # standardised like x
    ref_eigs = covariance_spectrum(ref)
    erank, erank_ref = effective_rank(eigs), effective_rank(ref_eigs)

    directions = random_directions(d, num_slices, step=seed).double()  # (D, M), fixed
    p = (x @ directions).float()  # (N, M)
    ep = epps_pulley(p, t_max=t_max, num_knots=num_knots)  # (M,)
    crit = critical_value(n, alpha=alpha, t_max=t_max, num_knots=num_knots, cache_dir=cache_dir)
    pc = p - p.mean(0)
    kurt = (pc.pow(4).mean(0) / pc.square().mean(0).square().clamp_min(1e-300)) - 3.0  # (M,)
    out.update({
        "sigreg": float(sigreg(x.float(), step=seed, directions=directions, t_max=t_max, num_knots=num_knots)),
        "sigreg_gaussian": float(sigreg(ref.float(), step=seed, directions=directions, t_max=t_max, num_knots=num_knots)),
        "pass_rate": float((ep <= crit).double().mean()),
        "critical_value": crit,
        "median_excess_kurtosis": float(kurt.median()),
        "effective_rank": erank,
        "effective_rank_gaussian": erank_ref,
        "effective_rank_ratio": erank / erank_ref,
        "condition_number": _condition_number(eigs),
        "condition_number_gaussian": _condition_number(ref_eigs),
        "null_dims": _null_dims(eigs),
        "null_dims_gaussian": _null_dims(ref_eigs),
        "eigenvalues": eigs.tolist(),
    })
    out["failed"], out["verdict"] = _verdict(out)
    return _finite_json(out)


def _verdict(s: dict[str, Any]) -> tuple[list[str], str]:
    ratio, d = s["effective_rank_ratio"], s["dim"]
    if ratio < COLLAPSE_RANK_RATIO or s["effective_rank"] < 1.5:
        return ["collapse"], f"collapse: effective rank {s['effective_rank']:.1f} of {d} dimensions"
    failed, reasons = [], []
    # Kurtosis of a Gaussian sample fluctuates by ~sqrt(24 / N); demand far more than that.
    kurt_limit = max(HEAVY_TAIL_KURTOSIS, 8.0 * math.sqrt(24.0 / s["n"]))
    if s["median_excess_kurtosis"] > kurt_limit:
        failed.append("heavy_tails")
        reasons.append(f"heavy tails (median excess kurtosis {s['median_excess_kurtosis']:.1f})")
    cond, cond_ref = s["condition_number"], s["condition_number_gaussian"]
    spread = cond / cond_ref if math.isfinite(cond) and math.isfinite(cond_ref) else math.inf
    if ratio < ANISOTROPY_RANK_RATIO or spread > ANISOTROPY_CONDITION_RATIO:
        failed.append("anisotropy")
        reasons.append(f"anisotropy (effective rank {s['effective_rank']:.1f} of {d}, "
                       f"{100 * ratio:.0f}% of an isotropic sample's; condition number {cond:.3g})")
    if not failed and s["pass_rate"] < MIN_PASS_RATE:
        failed.append("non_gaussian")
        reasons.append(f"non-Gaussian shape: only {100 * s['pass_rate']:.0f}% of projections pass "
                       f"(skewed, multi-modal or light-tailed)")
    if not failed:
        return [], (f"near isotropic Gaussian ({100 * s['pass_rate']:.0f}% of projections pass at "
                    f"{100 * s['alpha']:.0f}%, effective rank {s['effective_rank']:.1f} of {d})")
    return failed, "; ".join(reasons)


def explain(cond: dict[str, Any], *, linear_top1: float | None = None, num_classes: int | None = None) -> list[str]:
    """What the verdicts of a probe's conditions check mean, one line per embedding judged.

    `cond` is `diagnose` of the backbone output h, optionally with `cond["projector"]`, the
    diagnosis of the projector output z. SIGReg acts on z only; probes and exports read h. A
    failed verdict is therefore weighed against the linear probe on h: an encoder that probes
    well is fine whatever z looks like (a narrow projector limits training, not these features).
    """
    chance = 1.0 / num_classes if num_classes else 0.0
    # "probes well": at least halfway from chance to perfect, e.g. 0.55 for 10 classes
    strong = linear_top1 is not None and linear_top1 >= chance + 0.5 * (1.0 - chance)
    probe = None if linear_top1 is None else f"{linear_top1:.2f}"
    h_line = f"backbone h (what probes and exports read; SIGReg does not act on it): {cond['verdict']}"
    if cond.get("failed") and probe is not None:
        h_line += (f"; yet it probes at {probe}: its classes are linearly separable, so the encoder is fine "
                   "(h need not be Gaussian)" if strong else
                   f"; and it probes at only {probe}: the encoder itself is weak")
    lines = [h_line]
    z = cond.get("projector")
    if z:
        z_line = f"projector z (SIGReg's target, {z['dim']} dims, read only by the training loss): {z['verdict']}"
        if z.get("failed") and probe is not None:
            z_line += (f"; backbone h probes at {probe}: the encoder is fine, the projector is narrow" if strong else
                       f"; backbone h probes at only {probe}: training did not reach SIGReg's target")
        lines.append(z_line)
    return lines


def _finite_json(obj: Any) -> Any:
    """JSON has no inf/nan: write them as None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    if isinstance(obj, np.floating):
        return _finite_json(float(obj))
    return obj
