"""Site files, executors built from them, MPI launch commands, MPI through the local site,
and out-of-memory escalation across memory classes (real MemoryError under RLIMIT_DATA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import ROOT, report_json, write_campaign
from lsst_prod.cli import main
from lsst_prod.config.site import SiteConfig, load_site
from lsst_prod.errors import ConfigError, InvalidQuantum
from lsst_prod.execution.mpi import mpi_command
from lsst_prod.execution.parsl_adapter import build_executors, executor_label
from lsst_prod.repo import Repository


def _site(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


def test_site_errors_name_file_line_key(tmp_path):
    p = _site(tmp_path, "name: x\nscheduler: slurm\nmax_workers: 2\n")
    with pytest.raises(ConfigError, match=r"site\.yaml:1: .*needs a 'slurm:' block"):
        load_site(p)
    p = _site(tmp_path, "name: x\nscheduler: slurm\nslurm:\n  partition: debug\n  cores_per_node: 4\n"
                        "  walltime: 1h\n")
    with pytest.raises(ConfigError, match=r"site\.yaml:6: key 'slurm.walltime': .*HH:MM:SS"):
        load_site(p)
    p = _site(tmp_path, "name: x\nmemory_classes:\n  - {name: big, memory_gib: 8}\n  - {name: small, memory_gib: 2}\n")
    with pytest.raises(ConfigError, match="ordered from smallest to largest"):
        load_site(p)
    p = _site(tmp_path, "name: x\nslurm:\n  partiton: debug\n")
    with pytest.raises(ConfigError, match=r"site\.yaml:3: unknown key 'slurm.partiton'; did you mean 'partition'"):
        load_site(p)
    p = _site(tmp_path, "name: x\nmpi: {launcher: srun}\n")
    with pytest.raises(ConfigError, match="srun' needs scheduler: slurm"):
        load_site(p)


def test_memory_class_routing():
    site = load_site(ROOT / "sites" / "ccin2p3.yaml")
    assert [m.name for m in site.classes()] == ["small", "medium", "large"]
    assert site.class_for(2.0) == 0 and site.class_for(3.5) == 1 and site.class_for(100) == 2
    assert executor_label(site, 1) == "htex_medium" and executor_label(site, 0, mpi=True) == "mpi"
    assert SiteConfig(name="t").classes()[0].name == "default"
    assert executor_label(SiteConfig(name="t", executor="threads"), 0, mpi=True) == "threads"


def test_executors_from_slurm_site_have_no_side_effects():
    """Building executors runs no scheduler command; the providers carry the site's request."""
    site = load_site(ROOT / "sites" / "ccin2p3.yaml")
    execs = build_executors(site)
    assert [e.label for e in execs] == ["htex_small", "htex_medium", "htex_large", "mpi"]
    small = execs[0]
    prov = small.provider
    assert type(prov).__name__ == "SlurmProvider"
    assert (prov.partition, prov.account, prov.qos, prov.walltime) == ("htc", "lsst", "normal", "12:00:00")
    assert prov.cores_per_node == 16 and prov.mem_per_node == 64 and prov.max_blocks == 200
    assert "#SBATCH --licenses=sps" in prov.scheduler_options
    assert "source /pbs/throng/lsst/software/lsst-prod/venv/bin/activate" in prov.worker_init
    assert small.mem_per_worker == 3.0
    # workers per node: cores, limited by node memory / class memory (64 GiB / 24 GiB -> 2)
    assert execs[0].max_workers_per_node == 16 and execs[2].max_workers_per_node == 2
    assert execs[3].max_workers_per_node == 1 and execs[3].provider.cores_per_node == 16
    # only the first class starts a block at load; the others scale out when they get work
    assert execs[0].provider.init_blocks == 2 and execs[1].provider.init_blocks == 0


def test_mpi_commands_golden():
    prog = ["python", "-m", "mod", "in", "out"]
    assert mpi_command("mpiexec", 2, prog) == ["mpiexec", "-n", "2", *prog]
    assert mpi_command("srun", 4, prog, in_slurm_allocation=True) == [
        "srun", "--overlap", "--ntasks=4", "--nodes=1", "--kill-on-bad-exit=1", "--mpi=pmi2", *prog]
    assert mpi_command("srun", 2, prog, "--mpi=pmix --cpu-bind=cores", in_slurm_allocation=True)[5:7] == [
        "--mpi=pmix", "--cpu-bind=cores"]
    with pytest.raises(InvalidQuantum, match="outside a Slurm allocation"):
        mpi_command("srun", 2, prog)
    with pytest.raises(InvalidQuantum, match="at least 1 rank"):
        mpi_command("mpiexec", 0, prog)


@pytest.mark.slow
def test_two_rank_mpi_through_local_site(capsys):
    """A real 2-rank MPI job (mpiexec) started by a worker of the site's MPI executor;
    the Allreduce equals the serial sum."""
    assert main(["site", "check", str(ROOT / "sites" / "local.yaml"), "--mpi", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mpi"]["ranks"] == 2 and out["mpi"]["ok"] and out["mpi"]["max_rel_diff"] < 1e-12
    assert out["mpi"]["mpi_command"][:3] == ["mpiexec", "-n", "2"]


OOM_SITE = """name: oom-test
scheduler: local
executor: htex
max_workers: 2
heartbeat_period_s: 5
memory_classes:
  - {name: tiny, memory_gib: 0.1}
  - {name: big, memory_gib: 8.0}
"""


@pytest.mark.slow
def test_out_of_memory_escalates_and_survives_restart(workdir, capsys):
    """single_frame needs ~0.2 GiB of data: asked at 0.05 GiB it goes to the 0.1 GiB class, where it really runs out of memory
    (MemoryError under RLIMIT_DATA), is retried on the 8 GiB class and succeeds. With one attempt allowed the
    quantum fails, the escalation is recorded, and restart runs it directly on the large class."""
    (workdir / "sites" / "oom.yaml").parent.mkdir(exist_ok=True)
    campaign = write_campaign(workdir)
    (workdir / "sites" / "oom.yaml").write_text(OOM_SITE)
    text = campaign.read_text().replace("site: sites/threads.yaml", "site: sites/oom.yaml")
    text = text.replace("max_attempts: 2", "max_attempts: 1")
    repo = Repository.open(workdir / "repo")
    visit = min(v["visit"] for v in repo.visits())
    text = text.replace("bands: [g, r]\nstages:", f"bands: [g, r]\nvisits:\n  include: [{visit}]\n  detectors: [0]\n"
                                                  "stages:", 1)
    # ask for less than the stage needs: it lands on the tiny class and really runs out of memory there
    text = text.replace("single_frame: {}", "single_frame: {memory_gib: 0.05}")
    campaign.write_text(text)
    assert main(["submit", str(campaign), "--no-progress", "--run", "oom/1"]) == 1
    report = report_json(workdir / "repo", "oom/1", capsys)
    (q,) = report["quanta"]
    assert q["attempts"][0]["error_class"] == "OutOfMemory" and q["attempts"][0]["memory_class"] == "tiny"
    assert "MemoryError" in q["attempts"][0]["error_message"]

    assert main(["restart", "oom/1", "--repo", str(workdir / "repo"), "--no-progress"]) == 0
    (q,) = report_json(workdir / "repo", "oom/1", capsys)["quanta"]
    assert [(a["outcome"], a["memory_class"]) for a in q["attempts"]] == [("failed", "tiny"), ("succeeded", "big")]

    # with retries allowed the escalation happens inside one run
    campaign.write_text(text.replace("max_attempts: 1", "max_attempts: 3"))
    assert main(["submit", str(campaign), "--no-progress", "--run", "oom/2"]) == 0
    (q,) = report_json(workdir / "repo", "oom/2", capsys)["quanta"]
    assert [(a["outcome"], a["memory_class"]) for a in q["attempts"]] == [("failed", "tiny"), ("succeeded", "big")]
