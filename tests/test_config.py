"""Every shipped campaign/site validates; bad files give file:line messages naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from lsst_prod.cli import main
from lsst_prod.config.campaign import load_campaign
from lsst_prod.config.site import load_site
from lsst_prod.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "campaigns").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_campaigns_validate(path):
    campaign = load_campaign(path)
    assert campaign.config.stages.enabled()


@pytest.mark.parametrize("path", sorted((ROOT / "sites").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sites_validate(path):
    load_site(path)


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    text = (ROOT / "campaigns" / "dp-mini.yaml").read_text()
    assert old in text
    out = tmp_path / "campaigns" / "bad.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "sites").mkdir(exist_ok=True)
    (tmp_path / "sites" / "local.yaml").write_text((ROOT / "sites" / "local.yaml").read_text())
    out.write_text(text.replace(old, new, 1))
    return out


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_typo_names_file_line_key_and_suggestion(tmp_path):
    bad = _variant(tmp_path, "detection_threshold_sigma:", "detection_treshold_sigma:")
    with pytest.raises(ConfigError) as exc:
        load_campaign(bad)
    msg = str(exc.value)
    assert msg.startswith(f"{bad}:{_line_of(bad, 'detection_treshold_sigma')}: ")
    assert "unknown key 'stages.single_frame.detection_treshold_sigma'" in msg
    assert "did you mean 'detection_threshold_sigma'?" in msg


def test_wrong_type_names_key_and_expected(tmp_path):
    bad = _variant(tmp_path, "release_id: 1 ", "release_id: one ")
    with pytest.raises(ConfigError) as exc:
        load_campaign(bad)
    msg = str(exc.value)
    assert f"{bad}:{_line_of(bad, 'release_id: one')}: key 'release_id'" in msg
    assert "valid integer" in msg and "'one'" in msg


def test_missing_site_file(tmp_path):
    bad = _variant(tmp_path, "site: ../sites/local.yaml", "site: ../sites/nowhere.yaml")
    with pytest.raises(ConfigError) as exc:
        load_campaign(bad)
    assert f"{bad}:{_line_of(bad, 'site: ../sites/nowhere.yaml')}: key 'site'" in str(exc.value)
    assert "not found" in str(exc.value)


def test_bad_yaml_syntax(tmp_path):
    bad = _variant(tmp_path, "bands: [g, r]", "bands: [g, r")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_campaign(bad)


def test_cli_exit_2_and_nothing_written(tmp_path, capsys):
    bad = _variant(tmp_path, "detection_threshold_sigma:", "detection_treshold_sigma:")
    repo = tmp_path / "repo-should-not-exist"
    for argv in (["simulate", str(bad), "--repo", str(repo)], ["submit", str(bad), "--repo", str(repo)],
                 ["plan", str(bad), "--repo", str(repo)]):
        assert main(argv) == 2
        assert not repo.exists()
    err = capsys.readouterr().err
    assert "did you mean 'detection_threshold_sigma'" in err
    # the default repo named in the campaign was not created either
    assert not (tmp_path / "demo-repo").exists()
