"""Single-frame zero points against truth with the Gaia-like refcat (catalogue level, no pixels).

For every visit x detector of the default simulation (dp-mini's: 2 detectors, 24 visits, g and r),
the stars on the detector get instrumental fluxes from the TRUE zero point (variability included)
with Poisson + sky noise for a 0.8" PSF, are cut at S/N > 10 and r > 16.5 (no saturation), matched to
the refcat by ID, and fitted with ``fit_zero_point`` three ways:

  A  "perfect" refcat: true survey-band fluxes with 1 % noise, true variables removed (the old refcat);
  B  Gaia-like refcat (transformed G/BP/RP), stars with phot_variable_flag removed, no colour term;
  C  as B, with the colour term in BP-RP (pivot 1.0, prior sigma 0.05, >= 20 stars).

Prints the rms and mean of zp - zp_true over the ccdvisits.  ``python bench/bench_refcat_photocal.py``.
"""

from __future__ import annotations

import numpy as np

from lsst_prod.algorithms.photocal import fit_zero_point
from lsst_prod.config.simulation import SimulationConfig
from lsst_prod.sim.astrometry import true_sky_to_pixel
from lsst_prod.sim.refcat import make_refcat
from lsst_prod.sim.cadence import sky_e_per_pix, zero_point
from lsst_prod.sim.spec import KIND_STAR, electrons_from_njy
from lsst_prod.sim.survey import build_survey


def main(seed: int = 1) -> None:
    config = SimulationConfig(seed=seed)
    survey = build_survey(config)
    sky = survey.sky
    ref = make_refcat(config, sky).to_pydict()
    ref = {k: np.asarray(v) for k, v in ref.items()}
    row_of = {int(r): i for i, r in enumerate(ref["ref_id"])}
    rng = np.random.default_rng(seed)
    out = {"A": [], "B": [], "C": []}
    k_fit = []
    for vt in survey.visits:
        ra, dec = sky.positions(vt, config.refcat_epoch_mjd)
        flux = sky.fluxes(vt, config.refcat_epoch_mjd)
        for det in survey.camera.detectors:
            qe = survey.qe[(det.id, vt.band)]
            zp_true = zero_point(config, vt, qe)
            x, y = true_sky_to_pixel(vt, det, ra, dec)
            on = (sky.kind == KIND_STAR) & (sky.ref_id >= 0) & (x > 5) & (x < det.nx - 5) & (y > 5) & (y < det.ny - 5)
            on &= sky.mag["r"] > 16.5
            idx = np.flatnonzero(on)
            e = electrons_from_njy(flux[idx], zp_true)
            npix = 4 * np.pi * (0.8 / 2.3548 / config.pixel_scale_arcsec) ** 2
            err = np.sqrt(e + npix * sky_e_per_pix(config, vt, qe))
            inst = e + rng.normal(0, 1, idx.size) * err
            ok = inst > 10 * err
            idx, inst, err = idx[ok], inst[ok], err[ok]
            rows = np.array([row_of[int(r)] for r in sky.ref_id[idx]])
            f_true = sky.flux_njy(vt.band)[idx]
            a = fit_zero_point(inst, err, f_true * (1 + rng.normal(0, 0.01, idx.size)), 0.01 * f_true,
                               good=~sky.is_variable[idx])
            good = ~ref["phot_variable_flag"][rows]
            fr, fe = ref[f"{vt.band}_flux"][rows], ref[f"{vt.band}_fluxErr"][rows]
            b = fit_zero_point(inst, err, fr, fe, good=good)
            c = fit_zero_point(inst, err, fr, fe, good=good, colour=ref["bp_rp"][rows], colour_pivot=1.0,
                               colour_term_prior_sigma=0.05, colour_min_stars=20)
            for key, cal in (("A", a), ("B", b), ("C", c)):
                out[key].append(1e3 * (cal.zero_point - zp_true))
            k_fit.append(c.colour_term)
    n = len(out["A"])
    print(f"{n} ccdvisits, {int(np.sum(ref['phot_variable_flag']))} refcat stars flagged variable")
    for key, label in (("A", "perfect refcat"), ("B", "Gaia-like, no colour term"), ("C", "Gaia-like + colour term")):
        d = np.array(out[key])
        print(f"{key} {label:28s} zp - true: rms {np.sqrt(np.mean(d**2)):5.2f} mmag, mean {np.mean(d):+5.2f}, "
              f"max |.| {np.max(np.abs(d)):5.2f}")
    print(f"colour terms fitted: median {np.median(k_fit):+.4f}, rms {np.std(k_fit):.4f} mag/mag")


if __name__ == "__main__":
    main()
