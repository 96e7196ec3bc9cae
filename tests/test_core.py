"""Data IDs, release-unique IDs, atomic writes, the registry and the sky map."""

from __future__ import annotations

import numpy as np
import pytest

from lsst_prod import ids
from lsst_prod.config.skymap import SkyMapConfig
from lsst_prod.errors import InvalidQuantum
from lsst_prod.repo import DataId, Repository
from lsst_prod.repo.atomic import TMP_PREFIX, sha256_file, write_atomic
from lsst_prod.skymap import SkyMap


def test_dataid_is_frozen_hashable_sorted():
    a = DataId(detector=1, visit=2512010003, instrument="SimCam")
    b = DataId({"instrument": "SimCam", "visit": 2512010003, "detector": 1})
    assert a == b and hash(a) == hash(b)
    assert list(a) == ["instrument", "visit", "detector"]
    assert DataId.from_key(a.key()) == a
    assert sorted([DataId(visit=3, detector=0), DataId(visit=2, detector=1)])[0]["visit"] == 2
    with pytest.raises(TypeError):
        DataId(visit=1.5)
    with pytest.raises(ValueError):
        a.union({"visit": 7})


def test_source_ids_roundtrip_and_unique_across_releases():
    v = ids.visit_id(20261120, 42)
    assert v == 2611200042
    dr1 = ids.SourceIdFactory(1, v, 7).make(1000)
    dr2 = ids.SourceIdFactory(2, v, 7).make(1000)
    dia = ids.SourceIdFactory(1, v, 7, kind=1).make(1000)
    assert len(np.unique(np.concatenate([dr1, dr2, dia]))) == 3000
    assert (dr1 > 0).all() and dr1.dtype == np.int64
    parts = ids.unpack_source_id(int(dr2[41]))
    assert parts == {"release": 2, "kind": 0, "visit": v, "detector": 7, "counter": 42}
    assert ids.unpack_source_id(int(dia[0]))["kind"] == 1
    # the largest legal fields still give a positive int64
    top = ids.SourceIdFactory(63, 2**33 - 1, 255, kind=1).make(2**15 - 1)
    assert top.max() < 2**63 and top.min() > 0


def test_object_ids_roundtrip_and_overflow():
    o = ids.ObjectIdFactory(5, 9652, 77).make(3)
    assert ids.unpack_object_id(int(o[2])) == {"release": 5, "kind": 0, "tract": 9652, "patch": 77, "counter": 3}
    with pytest.raises(InvalidQuantum, match="release=64"):
        ids.ObjectIdFactory(64, 1, 1).make(1)
    with pytest.raises(InvalidQuantum, match="counter"):
        ids.SourceIdFactory(1, 1, 1).make(2**15)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "sub" / "x.fits"

    def bad(p):
        p.write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_atomic(target, bad)
    assert not target.exists()
    assert not list(target.parent.glob(f"{TMP_PREFIX}*"))
    checksum, size = write_atomic(target, lambda p: p.write_bytes(b"abc"))
    assert target.read_bytes() == b"abc" and size == 3 and checksum == sha256_file(target)


def test_registry_put_find_replace(tmp_path):
    repo = Repository.create(tmp_path / "repo")
    did = {"instrument": "SimCam", "visit": 2512010003, "detector": 1}
    ref1 = repo.put_file("raw", did, "SimCam/raw", lambda p: p.write_bytes(b"one"))
    ref2 = repo.put_file("raw", did, "SimCam/raw", lambda p: p.write_bytes(b"two"))
    assert ref1.path == ref2.path and ref1.checksum != ref2.checksum
    found = Repository.open(tmp_path / "repo").find("raw", did, ["other", "SimCam/raw"])
    assert found == ref2
    assert len(repo.query("raw")) == 1
    with pytest.raises(FileNotFoundError, match="not an lsst-prod repository"):
        Repository.open(tmp_path / "nothing")


def test_skymap_tracts_partition_the_sky():
    sm = SkyMap(SkyMapConfig(n_rings=60, patch_inner_pixels=4000))
    rng = np.random.default_rng(3)
    ra = rng.uniform(0, 360, 3000)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 3000)))
    tracts = sm.tract_for(ra, dec)
    for t in np.unique(tracts)[:200]:
        info = sm.tract_info(int(t))
        sel = tracts == t
        assert info.contains_inner(ra[sel], dec[sel]).all()
        # every inner position lands on the tract's pixel grid, in exactly one patch
        patches = sm.patch_for(int(t), ra[sel], dec[sel])
        assert (patches >= 0).all()


def test_skymap_patches_and_overlap_query():
    sm = SkyMap(SkyMapConfig())
    t = int(sm.tract_for(150.0, 2.2))
    info = sm.tract_info(t)
    # inner regions of the patches tile the tract exactly
    area = sum((p.inner[2] - p.inner[0]) * (p.inner[3] - p.inner[1])
               for p in (sm.patch_info(t, i) for i in range(info.n_patch_x * info.n_patch_y)))
    assert area == info.nx * info.ny
    # a small square around a patch centre overlaps that patch only; a square on a corner overlaps four
    w = info.wcs()
    p = sm.patch_info(t, 50)
    cx, cy = (p.inner[0] + p.inner[2]) / 2, (p.inner[1] + p.inner[3]) / 2
    ra, dec = w.wcs_pix2world([cx - 10, cx + 10, cx + 10, cx - 10], [cy - 10, cy - 10, cy + 10, cy + 10], 0)
    assert sm.overlapping(ra, dec) == [(t, 50)]
    x0, y0 = p.inner[0], p.inner[1]
    ra, dec = w.wcs_pix2world([x0 - 300, x0 + 300, x0 + 300, x0 - 300], [y0 - 300, y0 - 300, y0 + 300, y0 + 300], 0)
    assert {pp for _, pp in sm.overlapping(ra, dec)} == {50, 49, 50 - info.n_patch_x, 49 - info.n_patch_x}
