"""Tests of lsst_prod.algorithms.merge: multi-band footprint and peak merging."""

from __future__ import annotations

import numpy as np
import pytest

from lsst_prod.algorithms.detect import detect_sources
from lsst_prod.algorithms.footprints import Footprints
from lsst_prod.algorithms.merge import merge_detections

try:
    from ._psf_double import GalSimPsf
except ImportError:  # tests/algorithms is not a package
    from _psf_double import GalSimPsf

SKY = 100.0
SHAPE = (120, 160)


def _band(rng, psf, stars):
    model = np.zeros(SHAPE)
    for x, y, f in stars:
        psf.draw_star(model, x, y, f)
    var = SKY + model
    image = model + rng.normal(size=SHAPE) * np.sqrt(var)
    return detect_sources(image, var, np.zeros(SHAPE, np.uint32), psf.sigma_at(0, 0))


@pytest.fixture(scope="module")
def merged():
    rng = np.random.default_rng(3)
    g, r = GalSimPsf(fwhm=4.6), GalSimPsf(fwhm=4.0)
    # A in both bands; B only in g; C only in r; D (g) and E (r) 12 px apart: footprints overlap only across bands
    per = {
        "g": _band(rng, g, [(30.3, 30.6, 3e4), (90.0, 30.0, 2e4), (40.2, 90.4, 2e4)]),
        "r": _band(rng, r, [(30.3, 30.6, 4e4), (130.0, 40.0, 2e4), (52.4, 91.1, 2e4)]),
    }
    return per, merge_detections(per, SHAPE)


def test_single_band_sources_are_kept_and_shared_sources_merged(merged):
    per, m = merged
    fp = m.footprints
    assert per["g"].n_peaks == 3 and per["r"].n_peaks == 3
    assert fp.n_peaks == 5  # A counted once
    xy = np.column_stack([fp.peak_x, fp.peak_y])

    def peak_near(x, y):
        d = np.hypot(xy[:, 0] - x, xy[:, 1] - y)
        assert d.min() < 2.0
        return int(np.argmin(d))

    a, b, c = peak_near(30.3, 30.6), peak_near(90.0, 30.0), peak_near(130.0, 40.0)
    assert m.peak_detected[a].tolist() == [True, True]
    assert m.peak_detected[b].tolist() == [True, False]
    assert m.peak_detected[c].tolist() == [False, True]
    assert np.isnan(m.peak_band_significance[b, 1]) and m.peak_band_significance[b, 0] > 5
    assert fp.peak_significance[a] == np.nanmax(m.peak_band_significance[a])
    assert m.bands == ("g", "r")


def test_overlapping_footprints_of_different_bands_merge(merged):
    per, m = merged
    fp = m.footprints
    d, e = (int(np.argmin(np.hypot(fp.peak_x - x, fp.peak_y - y))) for x, y in [(40.2, 90.4), (52.4, 91.1)])
    assert fp.peak_footprint[d] == fp.peak_footprint[e]
    f = fp.peak_footprint[d]
    assert len(fp.peaks_of(f)) == 2 and m.footprint_bands[f].tolist() == [True, True]
    # each band alone has one footprint with one peak there
    for band, (x, y) in (("g", (40, 90)), ("r", (52, 91))):
        f_band = per[band].labels[y, x] - 1
        assert f_band >= 0 and len(per[band].peaks_of(f_band)) == 1
    # the union covers both bands' footprint pixels, and nothing else
    union = (per["g"].labels > 0) | (per["r"].labels > 0)
    assert np.array_equal(fp.labels > 0, union)
    assert fp.area.sum() == union.sum() and fp.n_footprints == 4


def _fp(labels, peaks):
    """Footprints from a labels image and (x, y, significance) peaks."""
    p = np.array(peaks, dtype=float).reshape(-1, 3)
    n = int(labels.max())
    bbox = np.array([[0, 0, labels.shape[1], labels.shape[0]]] * n, dtype=np.int64).reshape(n, 4)
    return Footprints(labels=labels.astype(np.int32), bbox=bbox,
                      area=np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64),
                      peak_footprint=labels[p[:, 1].astype(int), p[:, 0].astype(int)].astype(np.int64) - 1,
                      peak_x=p[:, 0], peak_y=p[:, 1], peak_significance=p[:, 2])


def test_matching_radius_priority_and_positions():
    lab = np.zeros((40, 40), np.int32)
    lab[5:35, 5:35] = 1
    g = _fp(lab, [(10, 10, 20.0), (25, 25, 8.0)])
    r = _fp(lab, [(11, 12, 30.0), (25, 31, 9.0), (26, 25, 7.0)])  # (11,12) and (26,25) match; (25,31) is new
    m = merge_detections({"g": g, "r": r}, (40, 40), match_radius_pix=3.0)
    fp = m.footprints
    assert fp.n_peaks == 3 and fp.n_footprints == 1
    # sorted by decreasing significance; the position comes from the most significant band
    assert fp.peak_significance.tolist() == [30.0, 9.0, 8.0]
    assert (fp.peak_x[0], fp.peak_y[0]) == (11.0, 12.0)
    assert (fp.peak_x[2], fp.peak_y[2]) == (25.0, 25.0)
    assert m.peak_detected.tolist() == [[True, True], [False, True], [True, True]]
    np.testing.assert_array_equal(m.peak_band_significance[2], [8.0, 7.0])
    # a smaller radius keeps (11, 12) apart from (10, 10)
    m2 = merge_detections({"g": g, "r": r}, (40, 40), match_radius_pix=2.0)
    assert m2.footprints.n_peaks == 4
    # priority r first: (26,25) seeds, g's (25,25) matches it
    m3 = merge_detections({"g": g, "r": r}, (40, 40), priority=("r", "g"))
    assert m3.footprints.n_peaks == 3


def test_edge_cases():
    lab = np.zeros((20, 20), np.int32)
    empty = _fp(lab, [])
    m = merge_detections({"g": empty, "r": empty}, (20, 20))
    assert m.footprints.n_footprints == 0 and m.footprints.n_peaks == 0 and m.peak_detected.shape == (0, 2)
    lab[2:6, 2:6] = 1
    one = _fp(lab, [(3, 3, 6.0)])
    m = merge_detections({"g": one, "r": empty}, (20, 20))
    assert m.footprints.n_peaks == 1 and m.peak_detected.tolist() == [[True, False]]
    with pytest.raises(ValueError):
        merge_detections({"g": one}, (21, 20))
    with pytest.raises(ValueError):
        merge_detections({"g": one, "r": empty}, (20, 20), priority=("g",))


def test_two_peaks_of_one_band_on_one_merged_peak_are_both_kept():
    """A broad band's blended peak (g, between the stars) seeds; the sharp band (r) resolves the
    pair 4 px apart, both r peaks within 3 px of the g peak: the nearer matches it, the other is new."""
    lab = np.zeros((30, 30), np.int32)
    lab[5:25, 5:25] = 1
    g = _fp(lab, [(15, 15, 10.0)])
    r = _fp(lab, [(13, 15, 30.0), (17.5, 15, 20.0)])
    m = merge_detections({"g": g, "r": r}, (30, 30), match_radius_pix=3.0)
    fp = m.footprints
    assert fp.n_peaks == 2
    assert sorted(zip(fp.peak_x.tolist(), fp.peak_y.tolist())) == [(13.0, 15.0), (17.5, 15.0)]
    assert m.peak_detected.tolist() == [[True, True], [False, True]]


def test_split_merged_breaks_a_percolated_footprint_into_groups_of_at_most_max_peaks():
    """One merged footprint over 120 x 120 pixels with 64 peaks (8 x 8, 15 px apart; PSF sigma 2 px)
    becomes footprints of <= 25 peaks; every pixel stays in some footprint, peaks keep their order and
    positions, and each new footprint inherits the parent's bands."""
    from lsst_prod.algorithms.footprints import Footprints
    from lsst_prod.algorithms.merge import MergedDetections, split_merged

    labels = np.zeros((130, 130), np.int32)
    labels[5:125, 5:125] = 1
    g = np.arange(8) * 15 + 10.0
    px, py = (a.ravel() for a in np.meshgrid(g, g))
    sig = np.linspace(100, 20, 64)
    fp = Footprints(labels=labels, bbox=np.array([[5, 5, 125, 125]]), area=np.array([120 * 120]),
                    peak_footprint=np.zeros(64, np.int64), peak_x=px, peak_y=py, peak_significance=sig)
    merged = MergedDetections(fp, ("g", "r"), np.ones((64, 2), bool), np.column_stack([sig, sig]),
                              np.array([[True, False]]), 1.5)
    out = split_merged(merged, 2.0, 25)
    counts = np.bincount(out.footprints.peak_footprint)
    assert out.n_footprints > 1 and counts.max() <= 25 and counts.sum() == 64
    assert np.array_equal(out.footprints.labels > 0, labels > 0)
    assert np.array_equal(out.footprints.peak_x, px) and np.array_equal(out.peak_detected, merged.peak_detected)
    assert out.footprint_bands.shape == (out.n_footprints, 2) and out.footprint_bands[:, 0].all()
    assert not out.footprint_bands[:, 1].any()
    # each peak lies in its own footprint's pixels
    lab = out.footprints.labels[np.rint(py).astype(int), np.rint(px).astype(int)]
    assert np.array_equal(lab, out.footprints.peak_footprint + 1)
    assert split_merged(merged, 2.0, 64) is merged
