"""The dataset types the repository knows: name, dimensions and storage format.

Adding a stage that writes a new kind of output means adding one entry here;
the planner uses the dimensions to connect producers and consumers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetType:
    name: str
    dimensions: tuple[str, ...]
    storage: str  # "fits" | "parquet" | "json"
    description: str = ""

    @property
    def extension(self) -> str:
        return {"fits": ".fits", "parquet": ".parquet", "json": ".json"}[self.storage]


_TYPES = [
    # inputs written by the simulator (or ingest)
    DatasetType("camera", ("instrument",), "json", "instrument description"),
    DatasetType("raw", ("instrument", "visit", "detector"), "fits", "raw detector image, ADU, with overscan"),
    DatasetType("bias", ("instrument", "detector"), "fits", "master bias structure, ADU"),
    DatasetType("flat", ("instrument", "detector", "physical_filter"), "fits", "normalized flat field"),
    DatasetType("defects", ("instrument", "detector"), "fits", "bad-pixel mask"),
    DatasetType("refcat", (), "parquet", "astrometric/photometric reference catalog"),
    DatasetType("truth_objects", (), "parquet", "simulator truth: objects"),
    DatasetType("truth_ccdvisits", (), "parquet", "simulator truth: per visit x detector conditions"),
    DatasetType("truth_sources", ("instrument", "visit", "detector"), "parquet", "simulator truth: objects as drawn"),
    # single-frame processing
    DatasetType("calexp", ("instrument", "visit", "detector"), "fits", "calibrated exposure: image, mask, variance, WCS, PSF, photoCalib"),
    DatasetType("calexpBackground", ("instrument", "visit", "detector"), "fits", "background model subtracted from the calexp"),
    DatasetType("source", ("instrument", "visit", "detector"), "parquet", "Source table (DP1 columns)"),
    DatasetType("ccdVisit", ("instrument", "visit", "detector"), "parquet", "CcdVisit row(s)"),
    # global relative calibration
    DatasetType("relcal_solution", ("instrument",), "parquet", "per visit/detector relative zero points and astrometric corrections"),
    DatasetType("relcal_stars", ("instrument",), "parquet",
                "relcal's astrometric stars: position at a reference epoch, proper motion, parallax"),
    DatasetType("source_calibrated", ("instrument", "visit", "detector"), "parquet",
                "Source table with relatively calibrated fluxes and positions"),
    DatasetType("visitSummary", ("instrument", "visit"), "parquet", "Visit row and per-detector summaries"),
    # coadds and objects
    DatasetType("warp", ("instrument", "visit", "skymap", "tract", "patch"), "fits", "visit resampled to a patch"),
    DatasetType("coadd", ("skymap", "tract", "patch", "band"), "fits", "deep coadd"),
    DatasetType("coadd_bestSeeing", ("skymap", "tract", "patch", "band"), "fits", "best-seeing coadd"),
    DatasetType("coaddDetections", ("skymap", "tract", "patch", "band"), "parquet", "coadd peaks per band"),
    DatasetType("mergedDetections", ("skymap", "tract", "patch"), "parquet", "peaks merged across bands"),
    DatasetType("deblendedCatalog", ("skymap", "tract", "patch"), "parquet", "deblended children"),
    DatasetType("object", ("skymap", "tract", "patch"), "parquet", "Object table (DP1 columns)"),
    DatasetType("multifit", ("skymap", "tract", "patch"), "parquet", "multi-epoch model fits"),
    DatasetType("forcedSource", ("instrument", "visit", "detector"), "parquet", "ForcedSource rows"),
    DatasetType("diffim", ("instrument", "visit", "detector"), "fits", "difference image"),
    DatasetType("diaSource", ("instrument", "visit", "detector"), "parquet", "DiaSource rows"),
]

DATASET_TYPES: dict[str, DatasetType] = {t.name: t for t in _TYPES}


def get_dataset_type(name: str) -> DatasetType:
    try:
        return DATASET_TYPES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, DATASET_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown dataset type {name!r}{hint}") from None
