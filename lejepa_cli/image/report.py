"""The probe report for people (rich tables); the JSON file is written by `outputs.write_report`."""

from __future__ import annotations

from typing import Any, Callable

from rich.table import Table

from lejepa_cli.terminal import plural, unwrapped


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report_tables(report: dict[str, Any]) -> list[Table]:
    """Rich tables of a probe report, for the terminal."""
    title = f"{report['checkpoint']}" + (" (random init)" if report["random_init"] else f" (step {report['step']})")
    main = Table("metric", "value", title=unwrapped(title))
    main.add_row("linear top-1 / top-5", f"{_pct(report['linear_top1'])} / {_pct(report['linear_top5'])} %")
    best = f"{report['linear']['best_lr']:g}"
    main.add_row("linear best lr (val top-1)", f"{best} ({_pct(report['linear']['val_top1'][best])} %)")
    main.add_row("kNN top-1 " + " / ".join(f"k={k}" for k in report["knn_top1"]),
                 " / ".join(_pct(v) for v in report["knn_top1"].values()) + " %")
    fs = report["fewshot"]
    main.add_row(f"few-shot top-1 ({fs['method']}, {fs['draws']} draws) "
                 + " / ".join(f"{k}-shot" for k in fs["top1"]), " / ".join(_pct(v) for v in fs["top1"].values()) + " %")
    data = report["data"]
    main.add_row("data", f"train {data['train']['name']} ({plural(data['train']['images'], 'image')}), "
                         f"eval {data['eval']['name']} ({plural(data['eval']['images'], 'image')})")
    tables = [main]
    shift = report.get("shift")
    if shift and shift.get("adapted"):
        tables.append(_adapted_shift_table(shift))
    elif shift:
        t = Table("corruption", "severity", "linear %", "drop", f"kNN k={shift['knn_k']} %", "drop",
                  title=f"robustness under shift ({plural(shift['images'], 'eval image')})")
        t.add_row("clean", "", _pct(shift["clean"]["linear_top1"]), "", _pct(shift["clean"]["knn_top1"]), "")
        for name, per in shift["corruptions"].items():
            for sev, c in per.items():
                t.add_row(name, sev, _pct(c["linear_top1"]), _pct(c["linear_drop"]), _pct(c["knn_top1"]), _pct(c["knn_drop"]))
        tables.append(t)
    cond = report.get("conditions")
    if cond:
        t = Table("statistic", *(["backbone h (probes read it)"] + (["projector z (SIGReg acts on it)"] if "projector" in cond else [])),
                  title="conditions: is the embedding an isotropic Gaussian?",
                  caption="\n".join(cond.get("reading") or ()) or None, caption_justify="left")
        spaces = [cond] + ([cond["projector"]] if "projector" in cond else [])

        def row(label: str, fmt: Callable[[dict[str, Any]], str]) -> None:
            t.add_row(label, *(fmt(s) for s in spaces))

        row("samples x dims", lambda s: f"{s['n']} x {s['dim']}")
        row("SIGReg (Gaussian ref)", lambda s: "-" if s["sigreg"] is None else f"{s['sigreg']:.3g} ({s['sigreg_gaussian']:.3g})")
        row(f"projections passing EP test at {100 * cond['alpha']:.0f}%", lambda s: f"{_pct(s['pass_rate'])} %")
        row("effective rank (Gaussian ref)", lambda s: f"{s['effective_rank']:.1f}" + (
            f" ({s['effective_rank_gaussian']:.1f})" if s.get("effective_rank_gaussian") else ""))
        row("condition number (Gaussian ref)", lambda s: _num(s["condition_number"]) + (
            f" ({_num(s['condition_number_gaussian'])})" if s.get("condition_number_gaussian") else ""))
        row("null dimensions (Gaussian ref)", lambda s: f"{s['null_dims']}" + (
            f" ({s['null_dims_gaussian']})" if s.get("null_dims_gaussian") is not None else ""))
        row("median excess kurtosis", lambda s: _num(s["median_excess_kurtosis"]))
        row("|mean| / RMS std", lambda s: f"{s['mean_norm']:.3g} / {s['scale']:.3g}")
        row("verdict", lambda s: s["verdict"])
        tables.append(t)
    return tables


def _adapted_shift_table(shift: dict[str, Any]) -> Table:
    """Clean, corrupted and adapted top-1 side by side, per corruption and severity."""
    knn = f"kNN k={shift['knn_k']}"
    t = Table("corruption", "sev", "linear clean %", "corrupted", "adapted", "recovered",
              f"{knn} clean %", "corrupted", "adapted",
              title=f"robustness under shift, before and after label-free adaptation ({shift['images']} eval images; "
                    f"adapted: BatchNorm statistics re-estimated on each row's corrupted images, no labels)")
    clean, adapted = shift["clean"], shift["adapted"]
    t.add_row("clean", "", _pct(clean["linear_top1"]), "", _pct(adapted["clean"]["linear_top1"]), "",
              _pct(clean["knn_top1"]), "", _pct(adapted["clean"]["knn_top1"]))
    for name, per in shift["corruptions"].items():
        for sev, c in per.items():
            a = adapted["corruptions"][name][sev]
            rec = "-" if a["linear_recovered"] is None else f"{100 * a['linear_recovered']:.0f}%"
            t.add_row(name, sev, _pct(clean["linear_top1"]), _pct(c["linear_top1"]), _pct(a["linear_top1"]), rec,
                      _pct(clean["knn_top1"]), _pct(c["knn_top1"]), _pct(a["knn_top1"]))
    return t


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"
