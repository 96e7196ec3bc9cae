"""Tests of lsst_prod.algorithms.photocal (zero point from matched reference stars)."""

from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.algorithms.photocal import (
    AB_NJY_ZERO_POINT,
    fit_zero_point,
    intrinsic_scatter,
    provisional_zero_point,
    zero_point_to_njy_per_electron,
)
from lsst_prod.errors import AlgorithmError

TRUE_ZP = 28.734


def _catalogue(rng, n=100, frac_err=0.01, outlier_frac=0.05, extra_scatter=0.0):
    """Matched stars with ``frac_err`` total fractional error (split between measured and reference)."""
    ref_mag = rng.uniform(17.0, 21.0, n)
    ref_njy = 10 ** (-0.4 * (ref_mag - AB_NJY_ZERO_POINT))
    true_e = 10 ** (-0.4 * (ref_mag - TRUE_ZP))  # electrons
    e_each = frac_err / np.sqrt(2.0)
    inst = true_e * (1 + rng.normal(0, e_each, n)) * (1 + rng.normal(0, extra_scatter, n))
    ref = ref_njy * (1 + rng.normal(0, e_each, n))
    n_out = int(round(outlier_frac * n))
    out = rng.choice(n, n_out, replace=False)
    inst[out] *= 10 ** (-0.4 * rng.choice([-1, 1], n_out) * rng.uniform(0.1, 1.0, n_out))  # variables, blends
    return inst, e_each * inst, ref, e_each * ref, out


def test_zero_point_recovered_to_1_mmag_with_outliers():
    rng = np.random.default_rng(2024)
    errors, reported = [], []
    for _ in range(50):
        inst, inst_err, ref, ref_err, out = _catalogue(rng)
        cal = fit_zero_point(inst, inst_err, ref, ref_err)
        errors.append(cal.zero_point - TRUE_ZP)
        reported.append(cal.zero_point_err)
        assert not cal.used[out].any()  # every 0.1-1 mag outlier is clipped
        assert cal.n_used >= 90
        assert abs(cal.zero_point - TRUE_ZP) < 4 * cal.zero_point_err
    errors = np.array(errors) * 1e3  # mmag
    # statistical floor: 1.0857 * 1% / sqrt(95) = 1.1 mmag per realisation; no bias from the outliers
    assert np.sqrt(np.mean(errors**2)) < 1.3
    assert abs(np.mean(errors)) < 0.5
    np.testing.assert_allclose(np.median(reported) * 1e3, 1.0857 * 10 / np.sqrt(95), rtol=0.1)


def test_calibration_factor_and_units():
    rng = np.random.default_rng(5)
    inst, inst_err, ref, ref_err, _ = _catalogue(rng, outlier_frac=0.0, frac_err=0.001)
    cal = fit_zero_point(inst, inst_err, ref, ref_err)
    assert abs(cal.zero_point - TRUE_ZP) < 1e-3
    np.testing.assert_allclose(cal.nJy_per_electron, 10 ** (-0.4 * (cal.zero_point - 31.4)))
    np.testing.assert_allclose(inst * cal.nJy_per_electron, ref, rtol=0.005)  # electrons -> nJy
    assert zero_point_to_njy_per_electron(31.4) == 1.0
    assert cal.rms_mmag < 2.0 and cal.intrinsic_scatter_mmag < 1.0
    assert set(cal.to_dict()) >= {"zero_point", "zero_point_err", "nJy_per_electron", "n_used", "rms_mmag"}


def test_intrinsic_scatter_is_estimated():
    rng = np.random.default_rng(8)
    inst, inst_err, ref, ref_err, _ = _catalogue(rng, n=400, outlier_frac=0.0, extra_scatter=0.03)
    cal = fit_zero_point(inst, inst_err, ref, ref_err)
    np.testing.assert_allclose(cal.intrinsic_scatter_mmag, 1085.7 * 0.03, rtol=0.15)
    assert abs(cal.zero_point - TRUE_ZP) < 4 * cal.zero_point_err
    # the helper itself: residuals drawn with errors 1 and extra scatter 2 -> s ~ 2
    r = rng.normal(0, np.sqrt(5.0), 20000)
    assert abs(intrinsic_scatter(r, np.ones_like(r)) - 2.0) < 0.05
    assert intrinsic_scatter(rng.normal(0, 0.5, 100), np.ones(100)) == 0.0


def test_too_few_stars_and_bad_values():
    with pytest.raises(AlgorithmError) as exc:
        fit_zero_point(np.ones(3), np.full(3, 0.01), np.ones(3), np.full(3, 0.01))
    assert exc.value.metadata["n_stars"] == 3
    rng = np.random.default_rng(1)
    inst, inst_err, ref, ref_err, _ = _catalogue(rng, n=30, outlier_frac=0.0)
    inst[:4] = [np.nan, -1.0, 0.0, np.inf]
    good = np.ones(30, bool)
    good[4] = False
    cal = fit_zero_point(inst, inst_err, ref, ref_err, good=good)
    assert not cal.used[:5].any() and cal.n_used <= 25
    assert abs(cal.zero_point - TRUE_ZP) < 4 * cal.zero_point_err


def _coloured(rng, n, zp, k, pivot=1.0, frac_err=0.01, extra=0.0, outliers=0):
    """Stars with reference colour c ~ U(0.3, 3): m_ref - m_inst = zp + k (c - pivot) + noise."""
    c = rng.uniform(0.3, 3.0, n)
    ref_mag = rng.uniform(17.0, 21.0, n)
    m_inst = ref_mag - zp - k * (c - pivot) + rng.normal(0, extra, n)
    inst = 10 ** (-0.4 * m_inst)
    e_each = frac_err / np.sqrt(2.0)
    inst *= 1 + rng.normal(0, e_each, n)
    ref = 10 ** (-0.4 * (ref_mag - AB_NJY_ZERO_POINT)) * (1 + rng.normal(0, e_each, n))
    out = rng.choice(n, outliers, replace=False)
    inst[out] *= 10 ** (-0.4 * rng.uniform(0.2, 0.5, outliers))  # missed variables
    return inst, e_each * inst, ref, e_each * ref, c, out


def test_colour_term_and_zero_point_recovered():
    """Injected k = 0.08 mag/mag: over 50 realisations of 150 stars (1 % errors + 15 mmag star-dependent
    scatter, 3 missed variables), |mean(k) - k| < 2 mmag/mag, rms(k - k) within 20 % of the reported
    error, zero point at the pivot rms < 2.5 mmag; each realisation within 4 sigma."""
    rng = np.random.default_rng(77)
    dk, dz, ek = [], [], []
    for _ in range(50):
        inst, inst_err, ref, ref_err, c, out = _coloured(rng, 150, TRUE_ZP, 0.08, extra=0.015, outliers=3)
        cal = fit_zero_point(inst, inst_err, ref, ref_err, colour=c, colour_pivot=1.0, colour_term_prior_sigma=1.0)
        assert cal.colour_term_fitted and not cal.used[out].any()
        assert abs(cal.colour_term - 0.08) < 4 * cal.colour_term_err
        assert abs(cal.zero_point - TRUE_ZP) < 4 * cal.zero_point_err
        dk.append(cal.colour_term - 0.08)
        dz.append(cal.zero_point - TRUE_ZP)
        ek.append(cal.colour_term_err)
    dk, dz = np.array(dk), np.array(dz)
    assert abs(np.mean(dk)) < 0.002
    assert np.sqrt(np.mean(dk**2)) == pytest.approx(np.median(ek), rel=0.25)
    assert 1e3 * np.sqrt(np.mean(dz**2)) < 2.5
    # the colour term ignored: the zero point is off by k <c - pivot> (0.08 x 0.65 = 52 mmag)
    inst, inst_err, ref, ref_err, c, _ = _coloured(np.random.default_rng(1), 400, TRUE_ZP, 0.08)
    plain = fit_zero_point(inst, inst_err, ref, ref_err)
    assert abs(plain.zero_point - TRUE_ZP - 0.08 * (np.mean(c) - 1.0)) < 0.01
    assert np.isnan(plain.colour_pivot) and plain.colour_term == 0.0


def test_colour_term_prior_and_few_stars():
    """A tight prior pulls k to its mean; with fewer than colour_min_stars stars k is held at the prior."""
    rng = np.random.default_rng(3)
    inst, inst_err, ref, ref_err, c, _ = _coloured(rng, 100, TRUE_ZP, 0.05)
    exact = fit_zero_point(inst, inst_err, ref, ref_err, colour=c, colour_term_prior_sigma=10.0)
    tight = fit_zero_point(inst, inst_err, ref, ref_err, colour=c, colour_term_prior=0.02,
                           colour_term_prior_sigma=1e-4)
    assert abs(exact.colour_term - 0.05) < 0.005
    assert abs(tight.colour_term - 0.02) < 1e-4
    # noise-free data: zp and k exact (1e-6) with a weak prior
    clean_inst = 10 ** (-0.4 * ((AB_NJY_ZERO_POINT - 2.5 * np.log10(ref)) - TRUE_ZP - 0.05 * (c - 1.0)))
    clean = fit_zero_point(clean_inst, 1e-3 * clean_inst, ref, 1e-3 * ref, colour=c, colour_term_prior_sigma=100.0)
    assert abs(clean.zero_point - TRUE_ZP) < 1e-6 and abs(clean.colour_term - 0.05) < 1e-6
    few = fit_zero_point(inst[:12], inst_err[:12], ref[:12], ref_err[:12], colour=c[:12], colour_term_prior=0.05,
                         colour_min_stars=20)
    assert not few.colour_term_fitted and few.colour_term == 0.05 and np.isnan(few.colour_term_err)
    assert abs(few.zero_point - TRUE_ZP) < 5 * few.zero_point_err
    d = few.to_dict()
    assert d["colour_term"] == 0.05 and d["colour_pivot"] == 1.0 and d["colour_term_fitted"] is False
    # stars without a colour are left out
    c_nan = c.copy()
    c_nan[:10] = np.nan
    cal = fit_zero_point(inst, inst_err, ref, ref_err, colour=c_nan)
    assert not cal.used[:10].any() and cal.n_used <= 90


def test_provisional_zero_point_of_too_few_stars():
    """3-4 stars (a sparse detector): fit_zero_point refuses them; the provisional median is the zero
    point to the stars' scatter / sqrt(n), flagged, with the colour term held at its prior."""
    rng = np.random.default_rng(5)
    inst, inst_err, ref, ref_err, _ = _catalogue(rng, n=4, frac_err=0.02, outlier_frac=0.0)
    with pytest.raises(AlgorithmError):
        fit_zero_point(inst, inst_err, ref, ref_err, min_stars=5)
    cal = provisional_zero_point(inst, inst_err, ref, ref_err)
    assert cal.provisional and cal.n_used == 4 and cal.used.all()
    assert abs(cal.zero_point - TRUE_ZP) < 3 * cal.zero_point_err and cal.zero_point_err < 0.03
    assert not fit_zero_point(*_catalogue(rng, n=50)[:4]).provisional
    # one star far off (a variable the refcat did not flag) moves the median by less than the mean
    inst[0] *= 10 ** (-0.4 * 0.5)
    cal = provisional_zero_point(inst, inst_err, ref, ref_err)
    mean = float(np.mean(AB_NJY_ZERO_POINT - 2.5 * np.log10(ref) + 2.5 * np.log10(inst)))
    assert abs(cal.zero_point - TRUE_ZP) < abs(mean - TRUE_ZP)
    # the colour term, held at its prior: zp at the pivot colour
    colour = np.array([0.5, 1.0, 1.5, 2.0])
    k = 0.1
    inst2 = inst_err * 0 + 10 ** (-0.4 * (AB_NJY_ZERO_POINT - 2.5 * np.log10(ref) - TRUE_ZP - k * (colour - 1.0)))
    cal = provisional_zero_point(inst2, inst_err, ref, ref_err, colour=colour, colour_pivot=1.0, colour_term_prior=k)
    assert abs(cal.zero_point - TRUE_ZP) < 1e-9 and cal.colour_term == k
    # bad values are left out; no usable star at all is an error
    inst2[1] = np.nan
    assert provisional_zero_point(inst2, inst_err, ref, ref_err, colour=colour, colour_term_prior=k).n_used == 3
    with pytest.raises(AlgorithmError):
        provisional_zero_point(np.full(3, np.nan), inst_err[:3], ref[:3], ref_err[:3])
