"""Rendering one (visit, detector): GalSim objects -> electrons -> raw ADU, with its truth.

Each object whose TRUE pixel position (at the visit's epoch) lies within
``render_margin_pix`` of the detector is drawn, noise-free, into its own
postage stamp with GalSim (``method='auto'``: FFT convolution with the pixel)
at its exact sub-pixel position, and the stamps are summed:

* PSF (:mod:`lsst_prod.sim.psf`): a Kolmogorov atmosphere convolved with the
  telescope's obscured Airy (default) or a Moffat, of FWHM and shear (g1, g2)
  given in detector-pixel axes by :func:`lsst_prod.sim.cadence.psf_at` at the
  object's focal-plane position;
* stars and transients: the PSF with the object's flux;
* galaxies: (bulge_frac DeVaucouleurs(hlr_b, truncated at 8 hlr_b) +
  (1 - bulge_frac) Exponential(hlr_d)), sheared by (g1, g2) in the sky frame
  (West, North), mapped to pixels with the TRUE local Jacobian of the
  sky -> pixel mapping (so rotation, parity, pixel scale and even the
  distortion's tiny shear are right), convolved with the PSF;
* asteroids: the PSF convolved with a trail (a thin box) of the length and
  direction the object moves during the exposure, centred on the
  mid-exposure position.

Stamps have half-width :meth:`PsfFactory.point_source_radius` for point sources
(Kolmogorov: 10 FWHM (1 + |g|), the FFT wraps the light beyond into the stamp's
border; Moffat: the 99.9 % radius), grown by the galaxy's 6 hlr (or the trail)
for extended objects.  ``flux_e`` in the truth is the profile's total flux;
``psf_fwhm_pix`` the measured FWHM of the PSF actually drawn.

Then ``e = Poisson(model + sky) + cosmic rays`` and the raw contract of
:mod:`lsst_prod.sim.instrument`.  Everything random comes from
``rng_for(seed, "render", visit, detector)`` so a raw can be regenerated alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import galsim
import numpy as np
from scipy.spatial import cKDTree

from ..camera import Detector, detector_to_focal_plane
from ..config.simulation import SimulationConfig
from .astrometry import local_jacobian, true_sky_to_pixel
from .cadence import VisitTruth, psf_at, sky_e_per_pix, zero_point
from .instrument import (
    HeaderCards,
    bad_columns,
    bias_structure,
    cosmic_rays,
    electrons_to_raw,
    flat_field,
    raw_header,
    row_offsets,
)
from .psf import PointSourceDrawer, PsfFactory
from .sky import SkyCatalog
from .spec import (
    KIND_ASTEROID,
    KIND_GALAXY,
    KIND_NAMES,
    electrons_from_njy,
    njy_to_mag,
    rng_for,
)
from .survey import Survey, build_survey

_MAX_STAMP_RADIUS = 256


@dataclass(eq=False)
class CcdRender:
    """Everything produced for one (visit, detector); pure data (picklable)."""

    visit: int
    detector: int
    raw: np.ndarray  # uint16 (ny, nx + overscan)
    header: HeaderCards  # (keyword, value, comment)
    sources: dict[str, np.ndarray]  # truth_sources columns
    ccdvisit: dict[str, Any]  # truth_ccdvisits row
    model_e: np.ndarray | None = None  # noise-free objects + sky, electrons (keep_images=True)
    electrons: np.ndarray | None = None  # Poisson + cosmic rays, electrons (keep_images=True)
    cosmic_ray_e: np.ndarray | None = None  # cosmic-ray deposits, electrons (keep_images=True)


@dataclass(frozen=True)
class DrawList:
    """The objects to draw on one detector (indices into the sky catalog and their truth)."""

    index: np.ndarray
    x: np.ndarray
    y: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    flux_njy: np.ndarray
    flux_e: np.ndarray


def select_objects(survey: Survey, vt: VisitTruth, det: Detector, zp: float, margin: float) -> DrawList:
    """Objects present in the visit whose TRUE centre is within ``margin`` pixels of the detector."""
    sky = survey.sky
    ref = survey.config.refcat_epoch_mjd
    ra, dec = sky.positions(vt, ref)
    flux = sky.fluxes(vt, ref)
    x, y = true_sky_to_pixel(vt, det, ra, dec)
    ok = (flux > 0) & (x >= -0.5 - margin) & (x < det.nx - 0.5 + margin) \
        & (y >= -0.5 - margin) & (y < det.ny - 0.5 + margin) & np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(ok)
    return DrawList(idx, x[idx], y[idx], ra[idx], dec[idx], flux[idx], electrons_from_njy(flux[idx], zp))


def draw_objects(config: SimulationConfig, sky: SkyCatalog, vt: VisitTruth, det: Detector,
                 objs: DrawList) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Noise-free electrons of all objects, (ny, nx) float64; per-object own peak; per-object PSF.

    The PSF columns hold the FWHM of the profile actually drawn (measured, pixels) and its shear.
    """
    gsp = galsim.GSParams(folding_threshold=config.folding_threshold)
    factory = PsfFactory(config, vt.band, gsp)
    points = PointSourceDrawer(factory) if factory.model == "kolmogorov" else None
    model = np.zeros((det.ny, det.nx))
    n = objs.index.size
    u, v = detector_to_focal_plane(det, objs.x, objs.y)
    fwhm, pg1, pg2 = psf_at(vt, u, v)
    kinds = sky.kind[objs.index]
    peak = np.zeros(n)
    need_jac = np.flatnonzero((kinds == KIND_GALAXY) | (kinds == KIND_ASTEROID))
    jac = {}
    if need_jac.size:
        js = local_jacobian(vt, det, objs.ra[need_jac], objs.dec[need_jac])
        jac = {int(i): js[k] for k, i in enumerate(need_jac)}
    for i in range(n):
        flux = float(objs.flux_e[i])
        k = int(objs.index[i])
        gabs = math.hypot(pg1[i], pg2[i])
        psf = factory.profile(float(fwhm[i]), float(pg1[i]), float(pg2[i]))
        radius = factory.point_source_radius(float(fwhm[i]), gabs)
        if kinds[i] == KIND_GALAXY:
            J = jac[i]
            bf = float(sky.bulge_frac[k])
            hb, hd = float(sky.bulge_hlr_arcsec[k]), float(sky.disk_hlr_arcsec[k])
            comps = []
            if bf > 0:
                comps.append(galsim.DeVaucouleurs(half_light_radius=hb, flux=bf, trunc=8.0 * hb,
                                                  flux_untruncated=False, gsparams=gsp))
            if bf < 1:
                comps.append(galsim.Exponential(half_light_radius=hd, flux=1.0 - bf, gsparams=gsp))
            gal = comps[0] if len(comps) == 1 else galsim.Add(comps, gsparams=gsp)
            g1, g2 = float(sky.g1[k]), float(sky.g2[k])
            gg = math.hypot(g1, g2)
            if gg > 0:
                gal = gal.shear(g1=g1, g2=g2)
            gal = gal.transform(J[0, 0], J[0, 1], J[1, 0], J[1, 1])
            prof = galsim.Convolve(gal, psf, gsparams=gsp).withFlux(flux)
            stretch = (1.0 + gg) / math.sqrt(max(1.0 - gg * gg, 1e-6))
            extent = max(6.0 * hd, 8.0 * hb if bf > 0 else 0.0) * stretch * float(np.linalg.svd(J, compute_uv=False)[0])
            radius = int(math.ceil(math.hypot(extent, radius))) + 2
        elif kinds[i] == KIND_ASTEROID:
            J = jac[i]
            secs = vt.exptime * 3600.0 / 86400.0  # deg/day -> arcsec over the exposure
            w = -float(sky.rate_ra_deg_per_day[k]) * secs  # West
            nn = float(sky.rate_dec_deg_per_day[k]) * secs  # North
            dx, dy = J @ np.array([w, nn])
            length = math.hypot(dx, dy)
            if length > 0.05:
                trail = galsim.Box(length, 1e-3, gsparams=gsp).rotate(math.atan2(dy, dx) * galsim.radians)
                prof = galsim.Convolve(trail, psf, gsparams=gsp).withFlux(flux)
                radius += int(math.ceil(length / 2.0)) + 1
            else:
                prof = psf.withFlux(flux)
        else:
            prof = psf.withFlux(flux)
        radius = min(radius, _MAX_STAMP_RADIUS)
        point = points is not None and kinds[i] not in (KIND_GALAXY, KIND_ASTEROID)
        ix, iy = int(math.floor(objs.x[i] + 0.5)), int(math.floor(objs.y[i] + 0.5))
        x0, y0 = ix - radius, iy - radius
        size = 2 * radius + 1
        bx0, by0 = max(x0, 0), max(y0, 0)
        bx1, by1 = min(x0 + size, det.nx), min(y0 + size, det.ny)
        if bx1 <= bx0 or by1 <= by0:
            continue
        if point:  # exact numpy FFT drawing, flux-conserving (sim/psf.py)
            arr = flux * points.draw(float(fwhm[i]), float(pg1[i]), float(pg2[i]), objs.x[i] - ix, objs.y[i] - iy, size)
        else:
            stamp = galsim.ImageD(size, size, scale=1.0)
            prof.drawImage(stamp, offset=(objs.x[i] - ix, objs.y[i] - iy), method="auto")
            arr = stamp.array
        peak[i] = arr.max()
        model[by0:by1, bx0:bx1] += arr[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0]
    return model, peak, {"psf_fwhm_pix": factory.drawn_fwhm(fwhm), "psf_g1": pg1, "psf_g2": pg2}


@functools.lru_cache(maxsize=16)
def _calibs(config_json: str, detector: int, physical_filter: str) -> tuple[np.ndarray, np.ndarray, list]:
    """(flat, bias, bad columns) of a detector, cached per process (they are fixed per config)."""
    survey = build_survey(SimulationConfig.model_validate_json(config_json))
    config, det = survey.config, survey.camera.detector(detector)
    flat = flat_field(config, survey.camera, det, physical_filter)
    bias = bias_structure(config, det)
    flat.flags.writeable = False
    bias.flags.writeable = False
    return flat, bias, bad_columns(config, det)


def _neighbours(x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = x.size
    if n < 2:
        return np.full(n, np.inf), np.zeros(n)
    tree = cKDTree(np.stack([x, y], axis=1))
    d, j = tree.query(np.stack([x, y], axis=1), k=2)
    nn = j[:, 1]
    return d[:, 1], flux[nn] / np.maximum(flux, 1e-300)


def render_ccd(config: SimulationConfig, visit: int, detector: int, *, keep_images: bool = False) -> CcdRender:
    """Render one raw and its truth (pure and deterministic: depends only on config, visit, detector)."""
    survey = build_survey(config)
    camera = survey.camera
    vt = survey.visit(visit)
    det = camera.detector(detector)
    qe = survey.qe[(det.id, vt.band)]
    zp = zero_point(config, vt, qe)
    sky_e = sky_e_per_pix(config, vt, qe)

    objs = select_objects(survey, vt, det, zp, float(config.render_margin_pix))
    model, own_peak, psf_cols = draw_objects(config, survey.sky, vt, det, objs)
    model += sky_e

    rng = rng_for(config.seed, "render", vt.visit, det.id)
    ro = row_offsets(rng, det.ny, config.row_offset_amp_adu)
    electrons = rng.poisson(model).astype(np.float64)
    cr, n_cr = cosmic_rays(config, det, vt.exptime, rng)
    electrons += cr
    flat, bias, columns = _calibs(config.model_dump_json(), det.id, vt.physical_filter)
    raw = electrons_to_raw(config, det, electrons, flat, bias, columns, ro, rng)

    # ---- truth_sources: objects whose centre falls on the imaging area
    all_dist, all_ratio = _neighbours(objs.x, objs.y, objs.flux_e)
    on = (objs.x >= -0.5) & (objs.x < det.nx - 0.5) & (objs.y >= -0.5) & (objs.y < det.ny - 0.5)
    ix = np.clip(np.floor(objs.x[on] + 0.5).astype(int), 0, det.nx - 1)
    iy = np.clip(np.floor(objs.y[on] + 0.5).astype(int), 0, det.ny - 1)
    sat = np.zeros(ix.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            xx = np.clip(ix + dx, 0, det.nx - 1)
            yy = np.clip(iy + dy, 0, det.ny - 1)
            expected = det.bias_level_adu + ro[yy] + bias[yy, xx] + model[yy, xx] * flat[yy, xx] / det.gain
            sat |= expected >= det.saturation_adu
    idx = objs.index[on]
    sources = {
        "visit": np.full(idx.size, vt.visit, dtype=np.int64),
        "detector": np.full(idx.size, det.id, dtype=np.int32),
        "truth_id": survey.sky.truth_id[idx],
        "kind": np.array(KIND_NAMES, dtype=object)[survey.sky.kind[idx].astype(int)],
        "x": objs.x[on],
        "y": objs.y[on],
        "ra": objs.ra[on],
        "dec": objs.dec[on],
        "flux_nJy": objs.flux_njy[on],
        "flux_e": objs.flux_e[on],
        "mag": njy_to_mag(objs.flux_njy[on]),
        "is_saturated": sat,
        "peak_e": own_peak[on],
        "nn_dist_pix": all_dist[on],
        "nn_flux_ratio": all_ratio[on],
        "psf_fwhm_pix": psf_cols["psf_fwhm_pix"][on],
        "psf_g1": psf_cols["psf_g1"][on],
        "psf_g2": psf_cols["psf_g2"][on],
    }

    fw_c, g1_c, g2_c = psf_at(vt, det.fp_x0, det.fp_y0)
    fw_c = PsfFactory(config, vt.band).measure(float(fw_c))  # the FWHM of the profile drawn there
    ccdvisit = {
        "visit": int(vt.visit),
        "detector": int(det.id),
        "band": vt.band,
        "physical_filter": vt.physical_filter,
        "day_obs": int(vt.day_obs),
        "seq": int(vt.seq),
        "mjd_start": vt.mjd_start,
        "mjd_mid": vt.mjd_mid,
        "exptime": vt.exptime,
        "seeing_fwhm_arcsec": float(fw_c) * vt.pixel_scale_arcsec,
        "psf_fwhm_pix": float(fw_c),
        "psf_g1": float(g1_c),
        "psf_g2": float(g2_c),
        "sky_e_per_pix": float(sky_e),
        "zero_point": float(zp),
        "transparency_mag": vt.transparency_mag,
        "qe_factor": float(qe),
        "airmass": vt.airmass,
        "gain": det.gain,
        "read_noise": det.read_noise,
        "n_cosmic_rays": int(n_cr),
        "n_cosmic_ray_pixels": int(np.count_nonzero(cr)),
    }
    for f in VisitTruth.__dataclass_fields__:
        ccdvisit.setdefault(f, getattr(vt, f))
    header = raw_header(config, camera, det, vt)
    out = CcdRender(vt.visit, det.id, raw, header, sources, ccdvisit)
    if keep_images:
        out.model_e = model
        out.electrons = electrons
        out.cosmic_ray_e = cr
    return out
