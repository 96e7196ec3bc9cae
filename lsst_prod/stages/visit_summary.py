"""One Visit row per visit (DP1 ``Visit`` columns) from its raw header and its CcdVisit rows."""

from __future__ import annotations

import numpy as np
from astropy.time import Time

from ..config.stages import VisitSummaryConfig
from ..repo import DataId
from ..repo.formats import read_image, read_parquet, table_from_columns, write_parquet
from .base import QuantumContext, QuantumSpec, Resources, Stage


class VisitSummaryStage(Stage):
    name = "visit_summary"
    dimensions = ("instrument", "visit")
    input_types = ("raw", "ccdVisit")
    output_types = ("visitSummary",)
    gather = {"ccdVisit": 1}  # a visit summary of the detectors that succeeded
    resources = Resources(cores=1, memory_gib=0.5, walltime_s=300)
    description = "Visit table row (pointing, time, conditions) from the raw header and CcdVisit rows"

    def plan(self, ctx, config: VisitSummaryConfig) -> list[QuantumSpec]:
        specs = []
        for v in ctx.visits:
            ccds = [d for t, d in ctx.produced if t == "ccdVisit" and d["visit"] == v["visit"]]
            if not ccds:
                continue
            did = DataId(instrument=ctx.instrument, visit=v["visit"])
            inputs = [("ccdVisit", d) for d in sorted(ccds)] + [("raw", sorted(ccds)[0])]
            specs.append(QuantumSpec(self.name, did, tuple(inputs), (("visitSummary", did),)))
        return specs

    def run_quantum(self, ctx: QuantumContext) -> None:
        _, hdr = read_image(ctx.input_path("raw"))
        rows = [read_parquet(ctx.repo.path_of(r)) for r in ctx.inputs_of("ccdVisit")]
        seeing = np.array([r.column("seeing").to_numpy()[0] for r in rows], float)
        zp = np.array([r.column("zeroPoint").to_numpy()[0] for r in rows], float)
        exptime = float(hdr["EXPTIME"])
        start = float(hdr["MJD-OBS"])
        mid = start + exptime / 2.0 / 86400.0
        alt = float(hdr.get("ALTITUDE", np.nan))
        cols = {
            "visit": [int(ctx.data_id["visit"])], "physical_filter": [hdr["FILTER"]],
            "band": [str(rows[0].column("band").to_numpy()[0])],
            "ra": [float(hdr["RA"])], "dec": [float(hdr["DEC"])], "skyRotation": [float(hdr.get("ROTPA", 0.0))],
            "azimuth": [float(hdr.get("AZIMUTH", np.nan))], "altitude": [alt], "zenithDistance": [90.0 - alt],
            "airmass": [float(hdr.get("AIRMASS", np.nan))], "expTime": [exptime],
            "expMidpt": [Time(mid, format="mjd", scale="tai").isot], "expMidptMJD": [mid],
            "obsStart": [Time(start, format="mjd", scale="tai").isot], "obsStartMJD": [start],
            "nDetectors": [len(rows)], "seeingMedian": [float(np.median(seeing))],
            "zeroPointMedian": [float(np.median(zp))],
        }
        units = {"ra": "deg", "dec": "deg", "skyRotation": "deg", "azimuth": "deg", "altitude": "deg",
                 "zenithDistance": "deg", "expTime": "s", "expMidptMJD": "d", "obsStartMJD": "d",
                 "seeingMedian": "arcsec", "zeroPointMedian": "mag"}
        table = table_from_columns({k: np.asarray(v) for k, v in cols.items()}, units,
                                   {"release_id": ctx.release_id})
        ctx.put("visitSummary", lambda p: write_parquet(p, table))
        ctx.summary.update(n_detectors=len(rows))
