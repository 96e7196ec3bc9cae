"""Validation metrics on synthetic arrays (fast): one-to-one matching, pull bins, the chi2 median
bound, the two-peak criterion and the strict rule (a missing metric of an enabled stage fails)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from lsst_prod.validate import checks as C
from lsst_prod.validate.matching import unique_match
from lsst_prod.validate.objects import chi2_median_bound, two_peaks
from lsst_prod.validate.single_frame import pull_bin_checks


def test_unique_match_is_one_to_one():
    truth = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 10.0], [20.0, 20.0]])
    det = np.array([[0.1, 0.0], [0.5, 0.0], [10.0, 10.0], [30.0, 30.0]])
    assert unique_match(truth, det, 1.0).tolist() == [0, 1, 2, -1]
    # two truths, one detection: one is matched (the closer), the other is missed
    assert unique_match(truth[:2], det[:1], 1.0).tolist() == [0, -1]
    # two detections on one truth: one counts, the other is spurious
    assert unique_match(truth[:1], det[:2], 1.0).tolist() == [0]
    assert unique_match(truth, np.zeros((0, 2)), 1.0).tolist() == [-1] * 4
    rng = np.random.default_rng(3)
    t = rng.uniform(0, 500, (3000, 2))
    d = np.vstack([t + rng.normal(0, 0.5, t.shape), t[:300] + rng.normal(0, 0.5, (300, 2))])
    m = unique_match(t, d, 2.0)
    got = m[m >= 0]
    assert len(np.unique(got)) == len(got)  # no detection counted twice
    assert (m >= 0).mean() > 0.99


def _pulls(rng, n=3000, scale=1.0, bias=0.0, err_scale=1.0):
    snr = 10 ** rng.uniform(1, 3, n)
    flux = snr * 100.0
    err = 100.0
    measured = flux * (1 + bias) + rng.normal(0, err * scale, n)
    return (measured - flux) / (err * err_scale), snr


def test_pull_bins_pass_on_gaussian_and_fail_on_perturbations():
    rng = np.random.default_rng(1)
    p, s = _pulls(rng)
    _, ck = pull_bin_checks(p, s)
    assert all(c["status"] == "pass" for c in ck.values()), ck
    _, ck = pull_bin_checks(*_pulls(rng, err_scale=1.5))  # inflated errors
    assert ck["flux_pull_snr10_30_std"]["status"] == "fail"
    _, ck = pull_bin_checks(*_pulls(rng, bias=0.03))  # a 3 % flux scale
    assert all(ck[f"{C.pull_prefix(lo, hi)}_mean"]["status"] == "fail" for lo, hi in C.PULL_BINS)
    p, s = _pulls(rng)
    p[::20] += 30  # 5 % outliers
    _, ck = pull_bin_checks(p, s)
    assert ck["flux_pull_snr10_30_clipped_fraction"]["status"] == "fail"


def test_pull_bins_insufficient_and_required():
    rng = np.random.default_rng(2)
    p, s = _pulls(rng)
    faint = s < 100
    _, ck = pull_bin_checks(p[faint], s[faint])
    assert ck["flux_pull_snr100_300_std"]["status"] == "insufficient"
    assert C.all_pass(ck)  # upper bins without stars do not fail on their own
    _, ck = pull_bin_checks(p[~faint], s[~faint])
    assert ck["flux_pull_snr10_30_std"]["status"] == "missing" and not C.all_pass(ck)


def test_chi2_median_bound_from_the_distribution():
    rng = np.random.default_rng(4)
    dofs = rng.integers(1, 12, 400)
    x = stats.chi2.rvs(dofs, random_state=rng) / dofs
    med, lo, hi = chi2_median_bound(dofs)
    assert lo < np.median(x) < hi
    assert not lo < np.median(x * 1.5) < hi  # errors too small by 1.22
    assert not lo < np.median(x / 1.5) < hi
    # a single dof: the median of chi2(1) is 0.455, not 1
    assert abs(chi2_median_bound(np.ones(100))[0] - stats.chi2.median(1)) < 1e-6


def test_two_peaks_resolution_limit():
    fwhm = 1.0
    assert not two_peaks(np.array([0.8]), np.array([1.0]), np.array([1.0]), fwhm)[0]
    assert two_peaks(np.array([0.9]), np.array([1.0]), np.array([1.0]), fwhm)[0]  # 2 sigma = 0.85 FWHM
    assert not two_peaks(np.array([1.0]), np.array([1.0]), np.array([0.1]), fwhm)[0]  # faint companion
    assert two_peaks(np.array([1.9]), np.array([1.0]), np.array([0.1]), fwhm)[0]


def test_missing_metric_of_an_enabled_stage_fails():
    ok = C.check(1.0, "<=", 2.0)
    checks = {name: ok for name in C.REQUIRED["objects"]}
    assert C.all_pass(C.require(checks, {"objects"}))
    del checks["deblend_resolved_fraction"]
    req = C.require(checks, {"objects"})
    assert req["deblend_resolved_fraction"]["status"] == "missing" and not C.all_pass(req)
    # a stage that is not enabled owes nothing
    assert C.all_pass(C.require(checks | {"deblend_resolved_fraction": ok}, {"objects", "warp"}))
    # a value that could not be computed is missing, not merely failed
    req = C.require({"relcal_zp_rms_mmag": C.check(float("nan"), "<=", 5.0)}, set())
    assert req["relcal_zp_rms_mmag"]["status"] == "missing"


def test_strict_with_known_failures(monkeypatch, tmp_path, capsys):
    """--known-failures: listed failing metrics do not fail --strict, unlisted ones do, a listed
    metric that passes is reported, and a name that is not a metric is a ConfigError (exit 2)."""
    import lsst_prod.cli as cli
    import lsst_prod.validate.single_frame as vsf

    checks = {"a": {"value": 1.0, "bound": "<= 0", "status": "fail"},
              "b": {"value": 0.0, "bound": "<= 1", "status": "pass"},
              "c": {"value": 2.0, "bound": "<= 1", "status": "fail"}}
    monkeypatch.setattr(vsf, "validate_run", lambda repo, run: {"checks": checks, "all_pass": False})
    monkeypatch.setattr(cli, "_repo_arg", lambda args: None)
    monkeypatch.setattr(cli, "_run_arg", lambda args, repo: "r")
    known = tmp_path / "known.txt"
    known.write_text("# comment\na   # why\n")
    assert cli.main(["validate", "--strict", "--known-failures", str(known)]) == 1  # c is not listed
    known.write_text("a\nc\nb\n")
    capsys.readouterr()
    assert cli.main(["validate", "--strict", "--json", "--known-failures", str(known)]) == 0
    err = capsys.readouterr().err
    assert "known failure: a" in err and "b now passes" in err
    known.write_text("a\nc\nnot_a_metric\n")
    assert cli.main(["validate", "--strict", "--known-failures", str(known)]) == 2
    assert cli.main(["validate", "--strict"]) == 1


def test_separation_is_right_across_ra_zero_and_near_the_pole():
    """Truth and measurement on either side of RA = 0 are 72 mas apart at dec -31 (a raw RA difference
    would make it 360 degrees); 100 mas at dec 89.9 (where RA degrees are 0.0017 of a degree of arc)."""
    from lsst_prod.validate.matching import separation_mas

    d = 0.036 / 3600 / np.cos(np.radians(-31.0))  # 36 mas of arc, in RA degrees
    sep = separation_mas(np.array([360.0 - d]), np.array([-31.0]), np.array([d]), np.array([-31.0]))
    assert abs(sep[0] - 72.0) < 1e-3
    d = 0.1 / 3600 / np.cos(np.radians(89.9))
    sep = separation_mas([10.0], [89.9], [10.0 + d], [89.9])
    assert abs(sep[0] - 100.0) < 1e-2
    assert separation_mas([], [], [], []).shape == (0,)
