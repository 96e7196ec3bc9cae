"""File formats: calexp-like FITS exposures and Parquet tables with units.

An exposure file has the HDUs ``PRIMARY`` (observation metadata), ``IMAGE``
(float32, with the WCS), ``MASK`` (uint32, ``MP_*`` cards naming the bit
planes), ``VARIANCE`` (float32) and optionally ``PSF`` (the PSF model's
array and header) and ``APCORR`` (aperture-correction coefficients): readable
by astropy and DS9 (each image HDU carries the WCS).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fitsio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..algorithms import masks

#: cfitsio (inside fitsio) is not thread-safe: concurrent FITS I/O from threads of one process
#: corrupts reads (seen with the thread executor). Worker processes are unaffected by the lock.
_FITS_LOCK = threading.RLock()

_RESERVED = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "EXTNAME",
             "BZERO", "BSCALE", "TFIELDS"}


def _clean_header(header: dict[str, Any] | None) -> list[dict[str, Any]]:
    out = []
    for k, v in (header or {}).items():
        if k.upper() in _RESERVED or v is None:
            continue
        if isinstance(v, (np.floating,)):
            v = float(v)
        if isinstance(v, float) and not np.isfinite(v):
            v = str(v)  # FITS has no NaN/inf numbers (cfitsio corrupts the file): keep them as text
        elif isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        out.append({"name": k.upper()[:8] if len(k) <= 8 else k, "value": v})
    return out


@dataclass
class Exposure:
    """Image, mask, variance + metadata; the in-memory form of a calexp."""

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)  # PRIMARY header cards
    wcs_header: dict[str, Any] = field(default_factory=dict)  # FITS WCS cards (TAN-SIP)
    psf: tuple[np.ndarray, dict[str, Any]] | None = None  # PsfModel.to_fits()
    extra: dict[str, tuple[np.ndarray, dict[str, Any]]] = field(default_factory=dict)


def write_exposure(path: Path, exp: Exposure) -> None:
    """Write an exposure to ``path`` (call through an atomic writer)."""
    with _FITS_LOCK:
        with fitsio.FITS(str(path), "rw", clobber=True) as f:
            f.write(None, header=_clean_header(exp.metadata))
            f.write(exp.image.astype(np.float32), extname="IMAGE", header=_clean_header(exp.wcs_header | {"BUNIT": exp.metadata.get("BUNIT", "electron")}))
            f.write(exp.mask.astype(np.uint32), extname="MASK", header=_clean_header(exp.wcs_header | masks.header_cards()))
            f.write(exp.variance.astype(np.float32), extname="VARIANCE",
                    header=_clean_header(exp.wcs_header | {"BUNIT": exp.metadata.get("BUNIT", "electron") + "2"}))
            if exp.psf is not None:
                arr, hdr = exp.psf
                f.write(np.asarray(arr, dtype=np.float64), extname="PSF", header=_clean_header(hdr))
            for name, (arr, hdr) in exp.extra.items():
                f.write(np.asarray(arr), extname=name.upper(), header=_clean_header(hdr))


def _header_dict(h) -> dict[str, Any]:
    return {rec["name"]: rec["value"] for rec in h.records() if rec.get("name") and rec["name"] not in ("COMMENT", "HISTORY")}


def read_exposure(path: Path, with_pixels: bool = True) -> Exposure:
    with _FITS_LOCK:
        with fitsio.FITS(str(path)) as f:
            meta = _header_dict(f[0].read_header())
            img_hdr = _header_dict(f["IMAGE"].read_header())
            wcs = {k: v for k, v in img_hdr.items() if k not in _RESERVED and k != "BUNIT"}
            if with_pixels:
                image, mask, var = f["IMAGE"].read(), f["MASK"].read(), f["VARIANCE"].read()
            else:
                image = mask = var = np.empty((0, 0))
            names = {hdu.get_extname() for hdu in f}
            psf = (f["PSF"].read(), _header_dict(f["PSF"].read_header())) if "PSF" in names else None
            extra = {n: (f[n].read(), _header_dict(f[n].read_header())) for n in names
                     if n and n not in ("IMAGE", "MASK", "VARIANCE", "PSF")}
        return Exposure(image, mask, var, meta, wcs, psf, extra)


def write_image(path: Path, data: np.ndarray, header: dict[str, Any] | None = None) -> None:
    """A single-image FITS file (calibration products)."""
    with _FITS_LOCK:
        with fitsio.FITS(str(path), "rw", clobber=True) as f:
            f.write(data, header=_clean_header(header))


def read_image(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    with _FITS_LOCK:
        with fitsio.FITS(str(path)) as f:
            return f[0].read(), _header_dict(f[0].read_header())


def table_from_columns(columns: dict[str, np.ndarray], units: dict[str, str] | None = None,
                       metadata: dict[str, Any] | None = None) -> pa.Table:
    """A pyarrow Table whose fields carry ``unit`` metadata and whose schema carries ``metadata``."""
    units = units or {}
    fields, arrays = [], []
    for name, values in columns.items():
        arr = pa.array(values)
        meta = {"unit": units[name]} if name in units else None
        fields.append(pa.field(name, arr.type, metadata=meta))
        arrays.append(arr)
    schema = pa.schema(fields, metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_parquet(path: Path, table: pa.Table) -> None:
    pq.write_table(table, str(path), compression="zstd")


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(str(path), columns=columns)


def read_columns(path: Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """A Parquet table as a dict of numpy arrays (column name -> values)."""
    return table_columns(read_parquet(path, columns))


def table_columns(table: pa.Table) -> dict[str, np.ndarray]:
    return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}
