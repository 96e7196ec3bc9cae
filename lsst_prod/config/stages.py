"""Parameters of each pipeline stage, as they appear under ``stages:`` in a campaign.

Every field has a unit in its name or description; unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    memory_gib: float | None = Field(
        None, gt=0, description="memory requested per quantum, GiB (default: the stage's own declaration); "
                                "picks the site's memory class, which is escalated on OutOfMemory")
    walltime_s: int | None = Field(
        None, gt=0, description="a quantum running longer is abandoned and retried as a transient failure "
                                "(default: the stage's own declaration)")


def _odd_stamp(v: int | str) -> int | str:
    if isinstance(v, int) and (v % 2 == 0 or v < 11):
        raise ValueError("must be odd (so the PSF has a centre pixel) and >= 11, or 'auto'")
    return v


def _positive_radius(v: float | str) -> float | str:
    if not isinstance(v, str) and not v > 0:
        raise ValueError("must be > 0 or 'auto'")
    return v


class SingleFrameConfig(StageConfig):
    """ISR -> background -> cosmic rays -> detection -> PSF -> measurement -> astrometry -> photometry."""

    edge_pixels: int = Field(4, ge=0, description="width of the EDGE mask at the detector border, pixels")
    background_mesh_pixels: int = Field(128, ge=16, description="background mesh size, pixels")
    background_filter_size: int = Field(3, ge=1, description="median filter over background meshes")
    background_statistic: Literal["mean", "mode"] = Field(
        "mean", description="per-mesh statistic of the final background (sources at the detection threshold "
                            "masked): 'mean' (4-sigma clipped; unbiased PSF fluxes) or 'mode' (SExtractor's, "
                            "0.3-0.4 e- low on Poisson sky); the first pass always uses the mode")
    cosmic_ray_threshold_sigma: float = Field(5.0, gt=0, description="L.A.Cosmic detection threshold")
    detection_threshold_sigma: float = Field(5.0, gt=0, description="PSF-convolved S/N threshold")
    psf_stamp_pixels: int | Literal["auto"] = Field(
        "auto", description="PSF model stamp size (odd, >= 11), pixels; 'auto': odd max(25, 7 x the FWHM measured "
                            "on the PSF candidates), which holds >= 99.5 % of a Kolmogorov PSF")
    psf_spatial_order: int = Field(2, ge=0, le=4, description="polynomial order of PSF variation over the detector")
    psf_min_stars_per_term: float = Field(8.0, ge=0, le=1000,
                                          description="the PSF's spatial order is lowered while fewer usable stars "
                                                      "than this per polynomial term remain")
    psf_min_stars: int = Field(10, ge=3, description="fewer usable PSF stars is an AlgorithmError")
    psf_wing_radius_fwhm: float = Field(2.0, ge=0, le=20,
                                        description="beyond this many FWHM the PSF model's pixels are replaced by a "
                                                    "fitted Kolmogorov wing A r^-11/3 (the pixels there are mostly "
                                                    "noise); 0 keeps every pixel")
    apcorr_reference_radius_pixels: float | Literal["auto"] = Field(
        "auto", description="aperture that defines total flux, pixels; 'auto': max(25, 8 x the PSF model's FWHM)")
    astrometry_sip_order: int = Field(3, ge=0, le=5, description="SIP distortion order of the fitted WCS")
    astrometry_search_radius_arcsec: float = Field(80.0, gt=0, description="max pointing error searched, arcsec")
    astrometry_max_rotation_deg: float = Field(1.5, ge=0, le=10, description="max rotator error searched, deg")
    astrometry_min_matches: int = Field(4, ge=4, description="fewer verified matches: AlgorithmError (a match is "
                                        "accepted on its false-alarm probability, < 1e-6; 4 matches leave 4 degrees of "
                                        "freedom to a similarity of the distortion-aware header WCS)")
    astrometry_reserve_fraction: float = Field(
        0.2, ge=0, lt=1, description="reference stars held out of the WCS fit (by refcat id, the same in every "
                                     "visit) for validation; none when the detector has too few")  # fmt: skip
    photocal_min_stars: int = Field(5, ge=1, description="fewer stars (after clipping): the zero point is their "
                                    "median, flagged provisional (ccdVisit zeroPointProvisional); relcal solves it")
    photocal_colour_term: bool = Field(True, description="fit zp + k (BP-RP - pivot) against the refcat's bp_rp")
    photocal_colour_pivot: float = Field(1.0, description="reference colour (Gaia BP-RP) at which the zero point applies, mag")
    photocal_colour_term_prior: float = Field(0.0, description="prior mean of the colour term k, mag/mag")
    photocal_colour_term_prior_sigma: float = Field(
        0.0, ge=0, description="prior sigma of k, mag/mag; 0 (default): k held at the prior mean, the instrument's "
                               "known colour term (relcal fits one per band over all visits); > 0: fitted per "
                               "detector, which adds noise (docs/algorithms-measurement.md section 4)")
    photocal_colour_term_min_stars: int = Field(20, ge=3, description="fewer used stars: k held at the prior mean")
    initial_seeing_arcsec: float = Field(1.0, gt=0, description="seeing guess before the PSF is fitted")
    telescope_diameter_m: float = Field(8.36, ge=0, description="primary mirror diameter, m: the diffraction "
                                                                "(Airy) wings of the PSF beyond the aperture-"
                                                                "correction apertures; 0: left out")
    telescope_obscuration: float = Field(0.61, ge=0, lt=1, description="linear central obscuration (fraction)")

    @field_validator("psf_stamp_pixels")
    @classmethod
    def _odd(cls, v: int | str) -> int | str:
        return _odd_stamp(v)

    @field_validator("apcorr_reference_radius_pixels")
    @classmethod
    def _positive_radius(cls, v: float | str) -> float | str:
        return _positive_radius(v)


class RelcalConfig(StageConfig):
    """Global relative calibration: repeated stars across visits, tied to the reference catalogue."""

    mpi_ranks: int = Field(2, ge=1, le=1024, description="MPI ranks (capped by the site's mpi.max_ranks)")
    snr_min: float = Field(10.0, gt=0, description="PSF-flux S/N cut for calibration stars")
    isolation_arcsec: float = Field(2.0, ge=0, description="no other source of the same ccdvisit this close")
    match_radius_arcsec: float = Field(0.4, gt=0, description="friends-of-friends / reference match radius")
    phot_error_floor_mag: float = Field(0.002, ge=0, description="added in quadrature to each measurement")
    phot_colour_term: bool = Field(True, description="fit one colour term per band: m_star + k (BP-RP - pivot) = m_ref")
    phot_colour_pivot: float = Field(1.0, description="reference colour (Gaia BP-RP) at which the zero points apply, mag")
    phot_colour_term_prior_sigma: float = Field(0.1, gt=0, description="prior sigma of the colour term about 0, mag/mag")
    astrometry_order: int = Field(1, ge=0, le=3, description="polynomial order of the per-ccdvisit correction")
    astrometry_error_floor_mas: float = Field(1.0, ge=0)
    nsigma: float = Field(4.0, gt=0, description="outlier clipping threshold")
    max_iter: int = Field(10, ge=1, description="solve/clip iterations at most")
    min_visits_per_band: int = Field(2, ge=1, le=100000,
                                     description="fewer visits in a band (after failed detector-visits are left "
                                                 "out): the quantum is blocked (InsufficientInputs)")
    min_reference_stars_per_band: int = Field(5, ge=1, le=1000000,
                                              description="fewer matched reference stars in a band: blocked")
    min_stars_per_ccdvisit_astrometry: int | None = Field(
        None, ge=1, le=100000, description="a ccdvisit with fewer stars matched in other visits is set aside "
                                           "(recorded, left out of warps); default 6 (an order-1 correction). "
                                           "With fewer than astrometry_min_stars_per_term per term of the "
                                           "polynomial, its correction is held at order 1")
    astrometry_min_stars_per_term: float = Field(
        5.0, ge=2, le=1000, description="a ccdvisit with fewer stars than this many per polynomial term (50 at order "
                                        "3) has its terms above order 1 held at 0 (its single-frame distortion is "
                                        "kept): a correction fitted to N stars with p terms carries sqrt(p / N) of "
                                        "their position error, here at most 0.45 of it")
    max_excluded_fraction: float = Field(0.5, ge=0, le=1, description="more ccdvisits than this fraction too thin to "
                                                                      "calibrate: the quantum fails instead")
    max_exclusion_rounds: int = Field(5, ge=1, le=100, description="solve again at most this many times after "
                                                                  "setting thin ccdvisits aside")


class WarpConfig(StageConfig):
    """Resample calexps onto the sky map's patches."""

    kernel: Literal["lanczos3", "lanczos2", "bilinear"] = "lanczos3"
    grid_step: int = Field(32, ge=4, description="pixels between exact WCS evaluations (mapping interpolated)")
    relcal_astrometry: bool = Field(True, description="resample each calexp from relcal's calibrated frame (its "
                                                      "single-frame WCS plus the ccdvisit's astrometric correction) "
                                                      "when the run has a relcal_solution; false: the single-frame WCS")


class CoaddConfig(StageConfig):
    """Stack warps per patch and band."""

    kinds: list[Literal["deep", "best_seeing"]] = Field(default_factory=lambda: ["deep"],
                                                        description="coadd kinds to build (LSE-163 5.4.3)")
    best_seeing_quantile: float = Field(0.25, gt=0, le=1, description="fraction of best-seeing visits kept")
    clip_nsigma: float = Field(5.0, gt=0, description="PSF-matched outlier rejection threshold")
    clip_scale_tolerance: float = Field(
        0.03, ge=0, lt=1, description="an outlier region whose net flux is within this fraction of the reference's "
                                      "flux there differs by a photometric scale, not an artefact: not clipped")
    min_coverage: float = Field(0.05, ge=0, le=1, description="a patch less covered than this by every visit "
                                                               "is NoWorkFound")
    psf_stamp_pixels: int | Literal["auto"] = Field(
        "auto", description="coadd PSF model stamp size (odd, >= 11), pixels; 'auto': as single_frame's")
    psf_spatial_order: int = Field(1, ge=0, le=3)
    psf_min_stars_per_term: float = Field(8.0, ge=0, le=1000)
    psf_min_stars: int = Field(8, ge=3)

    @field_validator("psf_stamp_pixels")
    @classmethod
    def _odd(cls, v: int | str) -> int | str:
        return _odd_stamp(v)


class ObjectsConfig(StageConfig):
    """Coadd detection, merge, deblend and measurement."""

    detection_threshold_sigma: float = Field(5.0, gt=0)
    apcorr_reference_radius_pixels: float | Literal["auto"] = Field(
        "auto", description="aperture that defines total flux, pixels; 'auto': total flux as in single_frame "
                            "(stars measured within max(12, 4 FWHM), the Kolmogorov x Airy wing beyond added); "
                            "a number: that aperture is the total")
    telescope_diameter_m: float = Field(8.36, ge=0, description="primary mirror diameter, m (Airy wings); 0: left out")
    telescope_obscuration: float = Field(0.61, ge=0, lt=1, description="linear central obscuration (fraction)")
    apcorr_from_inputs: bool = Field(
        True, description="the coadd aperture correction from the inputs' calibration: their bright stars' weighted "
                          "mean calibrated PSF flux / the coadd PSF flux (falls back to the coadd's own apertures "
                          "when fewer than 5 stars match; with apcorr_reference_radius_pixels 'auto' only)")
    apcorr_full_wing_background: bool = Field(
        True, description="aperture-correction stars measured with every source subtracted with its full-wing "
                          "(12 FWHM) model and the local background the clipped mean of all usable annulus pixels "
                          "of that residual; the correction is the inverse-variance weighted mean of the stars' "
                          "ratios (false: stamp-limited models, the measurement's sky, median ratio)")
    background_without_sources: bool = Field(
        True, description="before the final measurement, subtract the coadd's level estimated as the clipped mean "
                          "outside the footprints of the coadd minus every measured source's full-wing model (the "
                          "calexps' backgrounds took in their detected stars' wings, leaving the coadd below zero)")
    background_mesh_pixels: int = Field(256, ge=16, description="mesh cell of that coadd background, pixels")
    psf_from_inputs: bool = Field(
        True, description="measure with the coadd PSF summed from its inputs' PSFs at each position (the inputs "
                          "the coadd stores: Rubin's CoaddPsf); false, or a coadd without them: the model fitted "
                          "to the coadd's own stars")
    psf_grid_pixels: int = Field(
        100, ge=1, le=10_000, description="lattice spacing of that summed PSF, pixels: the inputs covering a "
                                         "position are found exactly there, their PSFs' smooth variation is "
                                         "interpolated between lattice nodes (docs/algorithms-coadd.md); "
                                         "warps store each input's mapping 128 pixels beyond its data, so "
                                         "nodes of a wider lattice are held at that distance")

    @field_validator("apcorr_reference_radius_pixels")
    @classmethod
    def _positive_radius(cls, v: float | str) -> float | str:
        return _positive_radius(v)


class VisitSummaryConfig(StageConfig):
    """One Visit row per visit."""


class ForcedConfig(StageConfig):
    """Forced PSF photometry on calexps at object positions."""

    neighbour_wings: bool = Field(True, description="subtract every object's Kolmogorov (x Airy) wing beyond its PSF "
                                                    "stamp and fit again (a faint object 5-10\" from a bright star)")
    telescope_diameter_m: float = Field(8.36, ge=0, description="primary mirror diameter, m: the Airy wings (0: left out)")
    telescope_obscuration: float = Field(0.61, ge=0, lt=1, description="linear central obscuration (fraction)")
    calibration_errors: bool = Field(True, description="psfFluxErr includes the calibration's uncertainty in "
                                                      "each visit (the aperture correction's at the object), "
                                                      "also given alone as psfFluxErrCalib")
    unmodelled_threshold_sigma: float | None = Field(
        5.0, gt=0, description="flag (psfFlux_flag_unmodelled; psfFlux_flag is left as it is) a flux that light no "
                               "object models (residual peaks of this many sigma, > 1 FWHM from every object) "
                               "biases by more than its error; null: not looked for")
    psf_profile_error: bool = Field(True, description="errors include the PSF model's per-pixel error (the "
                                                     "calexp PSF's PROFERR, measured on its stars) from every "
                                                     "object's model light, as DAOPHOT's profile error")


#: Stage name -> parameter model.  The planner and the stage registry share these names.
STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "single_frame": SingleFrameConfig,
    "visit_summary": VisitSummaryConfig,
    "relcal": RelcalConfig,
    "warp": WarpConfig,
    "coadd": CoaddConfig,
    "objects": ObjectsConfig,
    "forced": ForcedConfig,
}


class StagesConfig(StageConfig):
    """The ``stages:`` block: one optional entry per stage; present means enabled."""

    single_frame: SingleFrameConfig | None = None
    visit_summary: VisitSummaryConfig | None = None
    relcal: RelcalConfig | None = None
    warp: WarpConfig | None = None
    coadd: CoaddConfig | None = None
    objects: ObjectsConfig | None = None
    forced: ForcedConfig | None = None

    def enabled(self) -> dict[str, StageConfig]:
        return {name: getattr(self, name) for name in STAGE_CONFIGS if getattr(self, name) is not None}
