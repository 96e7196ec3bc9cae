"""Checks: a metric's value against its bound, and which metrics each enabled stage owes.

A check is a dict ``{"value", "bound", "status", "pass"}`` with ``status`` one of

* ``pass`` / ``fail``: the value is finite and meets / misses the bound;
* ``insufficient``: too little data to judge (reported; neither passes nor fails on its own);
* ``missing``: the stage ran (or was meant to) but the metric could not be computed: a failure.

``pass`` is True, False, or None for ``insufficient``.  ``--strict`` fails on any ``fail`` or
``missing``.
"""

from __future__ import annotations

import math
from typing import Any

PULL_BINS = ((10.0, 30.0), (30.0, 100.0), (100.0, 300.0), (300.0, math.inf))
#: pull bins that must hold enough stars (the faint end is where the noise model is tested)
PULL_BINS_REQUIRED = 2
VAR_BINS = ((2.0, 3.0), (3.0, 5.0), (5.0, 10.0), (10.0, math.inf))


def bin_name(lo: float, hi: float) -> str:
    return f"{lo:g}_{hi:g}" if math.isfinite(hi) else f"{lo:g}_inf"


def pull_prefix(lo: float, hi: float) -> str:
    return f"flux_pull_snr{bin_name(lo, hi)}"


def var_name(lo: float, hi: float) -> str:
    return f"forced_variable_recovered_fraction_{bin_name(lo, hi)}sigma"


#: metrics every enabled stage must deliver (a missing one fails --strict)
REQUIRED: dict[str, tuple[str, ...]] = {
    "single_frame": (
        "astrometry_rms_mas", "astrometry_reserved_rms_mas", "astrometry_nonref_rms_mas",
        "photometry_zp_error_mmag", "completeness_snr10_isolated_stars",
        *(f"{pull_prefix(lo, hi)}_{q}" for lo, hi in PULL_BINS for q in ("mean", "std", "clipped_fraction")),
    ),
    "relcal": ("relcal_zp_rms_mmag", "relcal_astrometry_rms_mas"),
    "objects": ("coadd_flux_ratio_stars", "coadd_flux_ratio_patch_worst_excess", "object_completeness_snr10",
                "deblend_flux_error_median", "deblend_flux_error_median_resolvable", "deblend_resolved_fraction"),
    "forced": ("forced_variable_recovered_fraction", *(var_name(lo, hi) for lo, hi in VAR_BINS),
               "forced_constant_chi2_dof_median", "forced_constant_false_positive_rate"),
}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def check(value: Any, op: str, bound: Any, *, insufficient: bool = False, note: str | None = None) -> dict[str, Any]:
    """``op`` is '<=', '>=' or 'in' (bound = (lo, hi))."""
    v = float(value) if value is not None else math.nan
    if op == "<=":
        ok, txt = v <= bound, f"<= {_fmt(bound)}"
    elif op == ">=":
        ok, txt = v >= bound, f">= {_fmt(bound)}"
    elif op == "in":
        ok, txt = bound[0] <= v <= bound[1], f"{_fmt(bound[0])}-{_fmt(bound[1])}"
    else:  # pragma: no cover - programming error
        raise ValueError(op)
    out: dict[str, Any] = {"value": v, "bound": txt}
    if insufficient:
        out.update(status="insufficient", **{"pass": None})
    elif math.isfinite(v) and ok:
        out.update(status="pass", **{"pass": True})
    else:
        out.update(status="fail", **{"pass": False})
    if note:
        out["note"] = note
    return out


def missing(reason: str) -> dict[str, Any]:
    return {"value": math.nan, "bound": "-", "status": "missing", "pass": False, "note": reason}


def require(checks: dict[str, dict[str, Any]], stages: set[str]) -> dict[str, dict[str, Any]]:
    """Add a ``missing`` check for every metric an enabled stage owes and did not deliver; a
    delivered check whose value is not finite (and is not ``insufficient``) becomes ``missing``."""
    out = dict(checks)
    for stage in sorted(stages):
        for name in REQUIRED.get(stage, ()):
            if name not in out:
                out[name] = missing(f"stage {stage} is enabled in the run but the metric could not be computed")
    for name, c in out.items():
        if c["status"] == "fail" and not math.isfinite(c["value"]):
            out[name] = {**c, "status": "missing", "pass": False,
                         "note": c.get("note") or "no data to compute the metric from"}
    return out


def all_pass(checks: dict[str, dict[str, Any]]) -> bool:
    return all(c["status"] in ("pass", "insufficient") for c in checks.values())
