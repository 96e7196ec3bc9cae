"""Issue #9: names that cannot leave the repository, an atomic submit, inputs that cannot crash
or hang the configuration layer (hypothesis fuzzing of campaign and site files)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lsst_prod.cli import main
from lsst_prod.config.campaign import load_campaign
from lsst_prod.config.site import load_site
from lsst_prod.errors import ConfigError, PlanningError
from lsst_prod.execution.driver import DriverLock
from lsst_prod.execution.runs import _claim_run
from lsst_prod.names import check_name, check_run_name, relative_inside
from lsst_prod.repo import Repository
from lsst_prod.skymap import SkyMap

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN_TEXT = (ROOT / "campaigns" / "dp-mini.yaml").read_text().replace(
    "site: ../sites/local.yaml", f"site: {ROOT / 'sites' / 'local.yaml'}")
SITE_FILES = sorted((ROOT / "sites").glob("*.yaml"))


def _write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


def _files_under(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["..", "../x", "/abs", "a/b", "a b", "a\nb", "a\n", "", ".hidden", "x" * 65,
                                 "a;rm -rf", "a$(x)", "é"])
def test_check_name_refuses_unsafe(bad):
    with pytest.raises(ConfigError, match="not a safe name"):
        check_name(bad, "skymap.name")


@pytest.mark.parametrize("bad", ["/abs/run", "../../x", "rel/../../x", "a//b", "a/b/c/d/e", "rel/a\nb", "rel/ x"])
def test_check_run_name_refuses_unsafe(bad):
    with pytest.raises(ConfigError):
        check_run_name(bad)


def test_safe_names_accepted():
    assert check_run_name("dp-mini/20261207T030000Z-2") == "dp-mini/20261207T030000Z-2"
    assert check_name("lsst_prod_rings", "skymap.name") == "lsst_prod_rings"
    assert relative_inside("run/calexp/SimCam/1/calexp_1_2.fits") == "run/calexp/SimCam/1/calexp_1_2.fits"
    for bad in ("/etc/passwd", "../x", "a/../../x", "a\n/b"):
        with pytest.raises(ConfigError):
            relative_inside(bad)


def test_repository_paths_never_leave_the_root(tmp_path):
    repo = Repository.create(tmp_path / "repo")
    with pytest.raises(ConfigError):
        repo.relpath_for("coadd", {"skymap": "../../../../outside", "tract": 1, "patch": 2, "band": "g"}, "r/1")
    with pytest.raises(ConfigError):
        repo.relpath_for("calexp", {"instrument": "SimCam", "visit": 1, "detector": 2}, "/abs/run")
    with pytest.raises(ConfigError):
        repo.path_of("../../outside.fits")
    with pytest.raises(ConfigError):
        repo.stage_file("coadd", {"skymap": "..", "tract": 1, "patch": 2, "band": "g"}, "r/1",
                        lambda p: p.write_bytes(b"x"))
    assert os.listdir(tmp_path) == ["repo"]
    assert not (tmp_path.parent / "outside.fits").exists()


@pytest.mark.parametrize("key,value", [
    ("  name: lsst_prod_rings", "  name: ../../../../../../outside"),
    ("release: dp-mini", "release: ../x"),
    ("instrument: SimCam", "instrument: /abs"),
    ("bands: [g, r]", "bands: [g, '../r']"),
])
def test_campaign_names_checked_at_load(tmp_path, key, value):
    assert key in CAMPAIGN_TEXT
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+"):
        load_campaign(_write(tmp_path, CAMPAIGN_TEXT.replace(key, value, 1)))


@pytest.mark.parametrize("run", ["/abs/path", "../../x", "a\nb", "ok/../../../x"])
def test_submit_refuses_unsafe_run_names_and_writes_nothing(tmp_path, run, capsys):
    campaign = _write(tmp_path, CAMPAIGN_TEXT)
    Repository.create(tmp_path / "repo").close()
    before = _files_under(tmp_path)
    code = main(["submit", str(campaign), "--repo", str(tmp_path / "repo"), "--run", run, "--no-progress"])
    assert code == 2
    assert "--run" in capsys.readouterr().err
    assert _files_under(tmp_path) == before
    assert not Path("/abs/path").exists()


def test_band_typo_is_an_error_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"bands\.1.*'R'.*did you mean 'r'"):
        load_campaign(_write(tmp_path, CAMPAIGN_TEXT.replace("bands: [g, r]", "bands: [g, R]", 1)))


# ----------------------------------------------------------------------------- submit lock
def _make_run(repo: Repository, run: str) -> Path:
    repo.registry.ensure_run(run, "processing", {})
    pdir = repo.root / run / "_plan"
    pdir.mkdir(parents=True)
    (pdir / "graph.json").write_text('{"first": true}')
    return pdir


def test_submit_refuses_an_existing_run_and_changes_nothing(tmp_path):
    campaign = _write(tmp_path, CAMPAIGN_TEXT)
    repo = Repository.create(tmp_path / "repo")
    pdir = _make_run(repo, "dp-mini/taken")
    before = {p: p.read_bytes() for p in pdir.iterdir()}
    code = main(["submit", str(campaign), "--repo", str(repo.root), "--run", "dp-mini/taken", "--no-progress"])
    assert code == 2
    assert {p: p.read_bytes() for p in pdir.iterdir()} == before


def test_default_run_name_gets_a_suffix_when_taken(tmp_path):
    repo = Repository.create(tmp_path / "repo")
    _make_run(repo, "rel/20261207T000000Z")
    name, pdir = _claim_run(repo, "rel/20261207T000000Z", default_name=True)
    assert name == "rel/20261207T000000Z-2" and pdir.is_dir()
    with pytest.raises(PlanningError, match="already exists"):
        _claim_run(repo, "rel/20261207T000000Z", default_name=False)


def _claim_worker(root: str, run: str, start: float, out) -> None:
    repo = Repository(root)
    while time.time() < start:
        pass
    try:
        _claim_run(repo, run, default_name=False)
        out.put("won")
    except PlanningError:
        out.put("refused")


def test_concurrent_claims_one_wins(tmp_path):
    repo = Repository.create(tmp_path / "repo")
    ctx = mp.get_context("fork")
    for trial in range(10):
        q = ctx.Queue()
        start = time.time() + 0.2
        procs = [ctx.Process(target=_claim_worker, args=(str(repo.root), f"rel/t{trial}", start, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
        assert sorted(q.get(timeout=5) for _ in procs) == ["refused", "won"]


def _hold_lock(path: str, ready) -> None:
    with DriverLock(Path(path)):
        ready.set()
        time.sleep(60)


def test_driver_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "driver.lock"
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(path), ready))
    p.start()
    try:
        assert ready.wait(10)
        held = DriverLock(path).holder()
        assert held is not None and held["pid"] == p.pid
        with pytest.raises(PlanningError, match=f"pid {p.pid}"):
            with DriverLock(path):
                pass
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
    assert DriverLock(path).holder() is None
    with DriverLock(path):  # the kernel released the dead holder's lock
        assert DriverLock(path).holder() is not None


def test_junk_lock_file_is_not_a_traceback(tmp_path):
    path = tmp_path / "driver.lock"
    path.write_bytes(b"\xff\x00junk{")
    assert DriverLock(path).holder() is None
    with DriverLock(path):
        pass


def test_status_of_an_unknown_run_exits_2(tmp_path, capsys):
    repo = Repository.create(tmp_path / "repo")
    _make_run(repo, "dp-mini/one")
    for cmd in ("status", "report", "restart"):
        assert main([cmd, "dp-mini/onf", "--repo", str(repo.root)]) == 2
        assert "did you mean 'dp-mini/one'" in capsys.readouterr().err
    assert main(["status", "../../x", "--repo", str(repo.root)]) == 2


# ----------------------------------------------------------------------------- YAML
BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    + ["release: x"])


@pytest.mark.parametrize("text,match", [
    (BILLION_LAUGHS, "expands to more than"),
    ("a: &a [*a]\n", "recursive|expands|nested"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("release: dp\x07mini\n", "control characters"),
    ("release: x\nrelease: y\n", "duplicate key 'release'"),
    ("release_id: " + "9" * 5000 + "\n", "cannot be read|release_id"),
    (CAMPAIGN_TEXT.replace("n_rings: 120", "n_rings: 200000000"), "n_rings"),
    (CAMPAIGN_TEXT.replace("pixel_scale_arcsec: 0.2", "pixel_scale_arcsec: 1e-300"), "pixel_scale_arcsec"),
    (CAMPAIGN_TEXT.replace("pixel_scale_arcsec: 0.2", "pixel_scale_arcsec: .inf"), "pixel_scale_arcsec"),
    (CAMPAIGN_TEXT.replace("release_id: 1 ", "release_id: .nan "), "release_id"),
    ("- a\n- b\n", "mapping"),
])
def test_hostile_yaml_is_a_config_error_fast(tmp_path, text, match):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        load_campaign(_write(tmp_path, text))
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("raw,match", [
    (CAMPAIGN_TEXT.encode("utf-16"), "UTF-16"),
    (b"release: dp\xffmini\n", r"c\.yaml:1: not UTF-8"),
    (b"release: x\n" * 3 + b"\x80\n", r"c\.yaml:4: not UTF-8"),
])
def test_bad_encodings(tmp_path, raw, match):
    with pytest.raises(ConfigError, match=match):
        load_campaign(_write(tmp_path, raw))


def test_cli_exit_code_2_for_bad_yaml(tmp_path, capsys):
    assert main(["plan", str(_write(tmp_path, BILLION_LAUGHS)), "--repo", str(tmp_path)]) == 2
    assert "c.yaml" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fuzzing
#: values that broke the configuration layer before (issue #9), spliced in place of scalars
NASTY = ["9" * 5000, "1e-300", "1e308", ".inf", "-.inf", ".nan", "-1", "0", "200000000", "''", "~", "[]", "{}",
         "../../../x", "/abs", "\"a\\nb\"", "*undefined", "&a x", "!!python/object:os.system x", "[[[[[[[[[[]]]]]]]]]]",
         "!!binary AAAA", "2025-13-45", "\"\\x00\"", "yes", "0x7fffffffffffffffffff"]


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check_config_input(path: Path, loader) -> str:
    """Load ``path``: 'ok' or 'config_error'; anything else (a traceback, > 5 s) is raised."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(5)
    try:
        loader(path)
        event("accepted")
        return "ok"
    except ConfigError as exc:
        assert str(exc).strip(), "empty ConfigError message"
        event("ConfigError")
        return "config_error"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mutate(text: str, data: st.DataObject) -> bytes:
    """One of several mutations of a YAML text: bytes flipped, lines dropped, duplicated or
    shuffled, scalars replaced by hostile values, re-encoded."""
    lines = text.splitlines(keepends=True)
    kind = data.draw(st.sampled_from(["scalar", "bytes", "lines", "insert", "encode"]))
    if kind == "scalar":
        for _ in range(data.draw(st.integers(1, 3))):
            cand = [i for i, ln in enumerate(lines) if ":" in ln and not ln.lstrip().startswith("#")]
            i = data.draw(st.sampled_from(cand))
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {data.draw(st.sampled_from(NASTY))}\n"
        return "".join(lines).encode()
    raw = bytearray(text.encode())
    if kind == "bytes":
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(raw) - 1))
            raw[pos] = data.draw(st.integers(0, 255))
        return bytes(raw)
    if kind == "lines":
        i = data.draw(st.integers(0, len(lines) - 1))
        j = data.draw(st.integers(i, min(len(lines), i + 5)))
        op = data.draw(st.sampled_from(["drop", "dup", "indent", "dedent"]))
        chunk = lines[i:j]
        if op == "drop":
            lines[i:j] = []
        elif op == "dup":
            lines[j:j] = chunk
        elif op == "indent":
            lines[i:j] = ["   " + ln for ln in chunk]
        else:
            lines[i:j] = [ln.lstrip() for ln in chunk]
        return "".join(lines).encode()
    if kind == "insert":
        pos = data.draw(st.integers(0, len(raw)))
        junk = data.draw(st.binary(min_size=1, max_size=16))
        return bytes(raw[:pos]) + junk + bytes(raw[pos:])
    return text.encode(data.draw(st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"])), errors="replace")


#: bench/fuzz_config.py raises these (>= 10,000 cases); the suite runs a few hundred
N_CAMPAIGN = int(os.environ.get("LSST_PROD_FUZZ_CAMPAIGNS", "150"))
N_SITE = int(os.environ.get("LSST_PROD_FUZZ_SITES", "100"))


def _load_and_plan_skymap(path: Path) -> None:
    """What `lsst-prod plan` does with a campaign before it needs a repository: load it, build
    its sky map, place a field in it (a bad sky map used to hang here)."""
    campaign = load_campaign(path)
    sm = SkyMap(campaign.config.skymap)
    tract = int(sm.tract_for(10.0, -30.0))
    info = sm.tract_info(tract)
    sm.patch_info(tract, info.n_patch_x * info.n_patch_y - 1)


@settings(max_examples=N_CAMPAIGN, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_campaign_files(tmp_path, data):
    path = _write(tmp_path, mutate(CAMPAIGN_TEXT, data), "fuzz.yaml")
    check_config_input(path, _load_and_plan_skymap)


@settings(max_examples=N_SITE, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data(), site=st.sampled_from(SITE_FILES))
def test_fuzz_site_files(tmp_path, data, site):
    path = _write(tmp_path, mutate(site.read_text(), data), "fuzz-site.yaml")
    check_config_input(path, load_site)


# ----------------------------------------------------------------------------- damaged registries
@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"junk" * 100, "not an SQLite")])
def test_damaged_registry_is_an_error_and_left_untouched(tmp_path, capsys, content, match):
    (tmp_path / "registry.sqlite3").write_bytes(content)
    for cmd in (["status"], ["report"], ["validate"], ["restart"]):
        assert main([*cmd, "--repo", str(tmp_path)]) == 2
        assert match in capsys.readouterr().err
    assert (tmp_path / "registry.sqlite3").read_bytes() == content
    assert sorted(os.listdir(tmp_path)) == ["registry.sqlite3"]


def test_read_only_repository_reads_and_refuses_writes(tmp_path, capsys, monkeypatch):
    repo = Repository.create(tmp_path / "repo")
    _make_run(repo, "dp-mini/one")
    repo.close()
    # root ignores permission bits, so the read-only condition is simulated where it is decided
    monkeypatch.setattr(Repository, "read_only", property(lambda self: True))
    before = _files_under(tmp_path / "repo")
    assert main(["status", "dp-mini/one", "--repo", str(tmp_path / "repo")]) == 0
    capsys.readouterr()
    assert main(["report", "dp-mini/one", "--repo", str(tmp_path / "repo"), "--json"]) == 2
    assert "has no quanta" in capsys.readouterr().err  # the registry was read (a planned-only run)
    campaign = _write(tmp_path, CAMPAIGN_TEXT)
    assert main(["submit", str(campaign), "--repo", str(tmp_path / "repo"), "--no-progress"]) == 1
    assert "read-only" in capsys.readouterr().err
    assert main(["restart", "dp-mini/one", "--repo", str(tmp_path / "repo")]) == 1
    assert {f for f in _files_under(tmp_path / "repo") if not f.endswith(("-wal", "-shm"))} == \
        {f for f in before if not f.endswith(("-wal", "-shm"))}
