"""Driver, retry policy, provenance and restart selection, with a toy stage in a thread pool.

The toy stage writes a small JSON file per quantum; quanta form a diamond per
"group" (a -> b1, b2 -> c) so blocking and restart of descendants are visible.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from lsst_prod.config.campaign import InjectedFailureSpec, RetryPolicy
from lsst_prod.config.site import SiteConfig
from lsst_prod.config.skymap import SkyMapConfig
from lsst_prod.config.stages import StageConfig
from lsst_prod.errors import InvalidQuantum
from lsst_prod.execution import worker
from lsst_prod.execution.driver import Driver
from lsst_prod.execution.policy import Action, decide
from lsst_prod.execution.runs import quanta_to_rerun
from lsst_prod.graph.graph import Quantum, QuantumGraph
from lsst_prod.provenance.db import attempts
from lsst_prod.provenance.report import build_report, lineage
from lsst_prod.repo import DataId, Repository
from lsst_prod.stages.base import QuantumSpec, Stage

RUN = "toy/run1"


class ToyConfig(StageConfig):
    invalid_on: list[int] = []
    hang_on: list[int] = []  # groups whose quanta hang (sleep) on their first attempt


class ToyStage(Stage):
    name = "toy"
    dimensions = ("group", "step")
    input_types = ("camera",)
    output_types = ("camera",)

    def plan(self, ctx, config):  # the test builds the graph by hand
        return []

    def run_quantum(self, ctx):
        if ctx.data_id["group"] in ctx.config.hang_on and ctx.attempt == 1:
            import time

            time.sleep(4)
        if ctx.data_id["group"] in ctx.config.invalid_on:
            raise InvalidQuantum(f"toy cannot run group {ctx.data_id['group']}")
        upstream = [json.loads(ctx.repo.path_of(r).read_text())["value"] for r in ctx.inputs.values()]
        value = sum(upstream) + 1
        ctx.put("camera", lambda p: p.write_text(json.dumps({"value": value})),
                {"instrument": f"g{ctx.data_id['group']}-{ctx.data_id['step']}"})
        ctx.summary["n_value"] = value


@pytest.fixture
def toy(monkeypatch, tmp_path):
    import lsst_prod.config.stages as stages_cfg
    import lsst_prod.stages as stages_pkg

    monkeypatch.setitem(stages_pkg.STAGES, "toy", ToyStage)
    monkeypatch.setitem(stages_cfg.STAGE_CONFIGS, "toy", ToyConfig)
    repo = Repository.create(tmp_path / "repo")
    quanta = []
    for g in range(3):
        def did(step):
            return DataId(group=g, step=step)

        def out(step):
            return ("camera", DataId(instrument=f"g{g}-{step}"))

        a = QuantumSpec("toy", did("a"), (), (out("a"),))
        b1 = QuantumSpec("toy", did("b1"), (out("a"),), (out("b1"),))
        b2 = QuantumSpec("toy", did("b2"), (out("a"),), (out("b2"),))
        c = QuantumSpec("toy", did("c"), (out("b1"), out("b2")), (out("c"),))
        quanta += [Quantum(a, (), ()), Quantum(b1, (), (a.quantum_id,)), Quantum(b2, (), (a.quantum_id,)),
                   Quantum(c, (), (b1.quantum_id, b2.quantum_id))]
    graph = QuantumGraph(quanta, ["toy"])

    def make_driver(injections=(), invalid_on=(), max_attempts=3, **cfg):
        stages = SimpleNamespace(enabled=lambda: {"toy": ToyConfig(invalid_on=list(invalid_on), **cfg)})
        config = SimpleNamespace(stages=stages, retry=RetryPolicy(max_attempts=max_attempts), release_id=1,
                                 skymap=SkyMapConfig(), bands=["r"],
                                 inject_failures=[InjectedFailureSpec(**i) for i in injections])
        campaign = SimpleNamespace(config=config, site=SiteConfig(name="t", executor="threads", max_workers=2))
        driver = Driver(repo, campaign, graph, RUN)
        driver.writer.plan(graph, {"release": "toy"})
        return driver

    return SimpleNamespace(repo=repo, graph=graph, make_driver=make_driver)


def _value(repo, group, step):
    ref = repo.find("camera", {"instrument": f"g{group}-{step}"}, [RUN])
    return json.loads(repo.path_of(ref).read_text())["value"]


def test_policy_table():
    p = RetryPolicy(max_attempts=3)
    assert decide("succeeded", None, 1, p) is Action.SUCCEED
    assert decide("failed", "TransientError", 1, p) is Action.RETRY
    assert decide("failed", "TransientError", 3, p) is Action.FAIL
    assert decide("failed", "OutOfMemory", 2, p) is Action.RETRY
    assert decide("failed", "AlgorithmError", 1, p) is Action.FAIL
    assert decide("failed", "UnexpectedError", 1, p) is Action.FAIL
    assert decide("failed", "InvalidQuantum", 1, p) is Action.STOP_STAGE
    assert decide("failed", "InsufficientInputs", 1, p) is Action.BLOCK


def test_all_succeed_with_provenance_and_lineage(toy):
    result = toy.make_driver().execute()
    assert result.ok and result.counts["succeeded"] == 12
    assert _value(toy.repo, 0, "c") == 5  # a=1, b=2 each, c=2+2+1
    report = build_report(toy.repo, RUN)
    assert report["complete"] and report["totals"]["attempts"] == 12
    rec = report["quanta"][0]["attempts"][0]
    assert rec["host"] and rec["wall_s"] >= 0 and rec["peak_rss_mib"] > 0 and rec["code_version"]
    # lineage of a final output walks back through both branches to the roots
    ref = toy.repo.find("camera", {"instrument": "g1-c"}, [RUN])
    tree = lineage(toy.repo, RUN, ref.path)
    assert tree["produced_by"]["quantum_id"] == "toy:group=1, step=c"
    assert {i["data_id"]["instrument"] for i in tree["inputs"]} == {"g1-b1", "g1-b2"}
    assert tree["inputs"][0]["inputs"][0]["produced_by"]["quantum_id"] == "toy:group=1, step=a"


def test_transient_failure_is_retried(toy):
    inj = [{"stage": "toy", "data_id": {"group": 0, "step": "b1"}, "error": "transient", "attempts": [1]}]
    result = toy.make_driver(inj).execute()
    assert result.ok
    report = build_report(toy.repo, RUN)
    q = next(q for q in report["quanta"] if q["quantum_id"] == "toy:group=0, step=b1")
    assert [a["outcome"] for a in q["attempts"]] == ["failed", "succeeded"]
    assert q["attempts"][0]["error_class"] == "InjectedFailure"
    assert report["stages"]["toy"]["retries"] == 1


def test_algorithm_failure_blocks_descendants_then_restart_runs_exactly_those(toy):
    inj = [{"stage": "toy", "data_id": {"group": 2, "step": "a"}, "error": "algorithm", "attempts": [1]}]
    result = toy.make_driver(inj).execute()
    assert not result.ok
    assert result.failed == ["toy:group=2, step=a"]
    assert result.counts["blocked"] == 3 and result.counts["succeeded"] == 8
    report = build_report(toy.repo, RUN)
    failure = next(f for f in report["failures"] if f["status"] == "failed")
    assert failure["error_class"] == "AlgorithmError" and "injected" in failure["error_message"]
    assert failure["error_metadata"] == {"injected": True}

    to_run = quanta_to_rerun(toy.repo, RUN, toy.graph)
    assert to_run == {f"toy:group=2, step={s}" for s in ("a", "b1", "b2", "c")}
    # a corrupted output of a succeeded quantum is re-run too, with its descendants
    bad = toy.repo.path_of(toy.repo.find("camera", {"instrument": "g0-b2"}, [RUN]))
    bad.write_text("corrupt")
    to_run = quanta_to_rerun(toy.repo, RUN, toy.graph)
    assert to_run == {f"toy:group=2, step={s}" for s in ("a", "b1", "b2", "c")} | {"toy:group=0, step=b2",
                                                                                     "toy:group=0, step=c"}
    result2 = toy.make_driver(inj).execute(to_run)  # attempt 2: the injection only hits attempt 1
    assert result2.ok and result2.counts["succeeded"] == 6
    assert _value(toy.repo, 2, "c") == 5 and _value(toy.repo, 0, "b2") == 2
    with toy.repo.engine.connect() as c:
        rows = c.execute(sa.select(attempts.c.attempt, attempts.c.outcome)
                         .where(attempts.c.quantum_id == "toy:group=2, step=a").order_by(attempts.c.id)).fetchall()
    assert [tuple(r) for r in rows] == [(1, "failed"), (2, "succeeded")]
    assert build_report(toy.repo, RUN)["complete"]


def test_invalid_quantum_stops_the_stage(toy):
    result = toy.make_driver(invalid_on=[0]).execute()
    assert "toy:group=0, step=a" in result.failed
    report = build_report(toy.repo, RUN)
    assert report["failures"][0]["error_class"] in ("InvalidQuantum", "Blocked")
    # after the stop no further toy quantum was submitted: everything not yet run is blocked
    assert report["totals"]["succeeded"] + report["totals"]["failed"] + report["totals"]["blocked"] == 12
    assert report["totals"]["blocked"] >= 3


def test_worker_records_unexpected_errors(toy, monkeypatch):
    monkeypatch.setattr(ToyStage, "run_quantum", lambda self, ctx: 1 / 0)
    payload = toy.make_driver()._payload("toy:group=0, step=a", 1, "threads")
    record = worker.execute_quantum(payload)
    assert record["outcome"] == "failed" and record["error_class"] == "UnexpectedError"
    assert "ZeroDivisionError" in record["error_message"] and "traceback" in record["error_metadata"]
    assert record["outputs"] == []


def test_hung_quantum_is_abandoned_after_its_walltime_and_retried(toy):
    result = toy.make_driver(hang_on=[1], walltime_s=1).execute()
    assert result.ok and result.counts["succeeded"] == 12
    report = build_report(toy.repo, RUN)
    q = next(q for q in report["quanta"] if q["quantum_id"] == "toy:group=1, step=a")
    assert [a["outcome"] for a in q["attempts"]] == ["failed", "succeeded"]
    assert q["attempts"][0]["error_class"] == "TransientError"
    assert "exceeded its walltime of 1 s" in q["attempts"][0]["error_message"]


class GatherStage(ToyStage):
    """Sums whatever of its inputs exist; needs at least two of them."""

    name = "toy_gather"
    gather = {"camera": 2}


@pytest.fixture
def gather_graph(toy, monkeypatch):
    """Three producers a0..a2 -> one gather quantum g -> one follower f (requires g's output)."""
    import lsst_prod.config.stages as stages_cfg
    import lsst_prod.stages as stages_pkg

    monkeypatch.setitem(stages_pkg.STAGES, "toy_gather", GatherStage)
    monkeypatch.setitem(stages_cfg.STAGE_CONFIGS, "toy_gather", ToyConfig)
    prods = [QuantumSpec("toy", DataId(group=9, step=f"a{i}"), (), (("camera", DataId(instrument=f"g9-a{i}")),))
             for i in range(3)]
    g = QuantumSpec("toy_gather", DataId(group=9, step="g"), tuple(p.outputs[0] for p in prods),
                    (("camera", DataId(instrument="g9-g")),))
    f = QuantumSpec("toy", DataId(group=9, step="f"), g.outputs, (("camera", DataId(instrument="g9-f")),))
    quanta = [Quantum(p, (), ()) for p in prods] + [Quantum(g, (), tuple(p.quantum_id for p in prods)),
                                                     Quantum(f, (), (g.quantum_id,))]
    graph = QuantumGraph(quanta, ["toy", "toy_gather"])

    def make_driver(injections=()):
        enabled = {"toy": ToyConfig(), "toy_gather": ToyConfig()}
        config = SimpleNamespace(stages=SimpleNamespace(enabled=lambda: enabled), retry=RetryPolicy(max_attempts=1),
                                 release_id=1, skymap=SkyMapConfig(), bands=["r"],
                                 inject_failures=[InjectedFailureSpec(**i) for i in injections])
        campaign = SimpleNamespace(config=config, site=SiteConfig(name="t", executor="threads", max_workers=2))
        driver = Driver(toy.repo, campaign, graph, RUN)
        driver.writer.plan(graph, {"release": "toy"})
        return driver

    return SimpleNamespace(repo=toy.repo, graph=graph, make_driver=make_driver)


def _inj(*steps):
    return [{"stage": "toy", "data_id": {"group": 9, "step": s}, "error": "algorithm", "attempts": [1]} for s in steps]


def test_gather_runs_on_what_exists_and_restart_reruns_it(gather_graph):
    t = gather_graph
    result = t.make_driver(_inj("a0")).execute()
    assert result.failed == ["toy:group=9, step=a0"] and result.counts["blocked"] == 0
    assert result.counts["succeeded"] == 4  # a1, a2, the gather on two inputs, and its follower
    ref = t.repo.find("camera", {"instrument": "g9-g"}, [RUN])
    assert json.loads(t.repo.path_of(ref).read_text())["value"] == 3  # 1 + 1 + 1: a0 left out
    report = build_report(t.repo, RUN)
    assert report["stages"]["toy_gather"]["partial"] == 1 and report["totals"]["inputs_left_out"] == 1
    (p,) = report["partial"]
    assert p["quantum_id"] == "toy_gather:group=9, step=g"
    assert p["left_out"] == [{"dataset_type": "camera", "data_id": {"instrument": "g9-a0"},
                              "producer": "toy:group=9, step=a0",
                              "reason": "failed: AlgorithmError: injected algorithm failure on attempt 1 "
                                        "(campaign inject_failures)"}]
    assert "AlgorithmError" in p["why"]
    # the failure is listed before anything it blocked, and the gather is not a failure
    assert [f["quantum_id"] for f in report["failures"]] == ["toy:group=9, step=a0"]

    # restart: the failed producer, the gather that ran without it, and what depends on the gather
    to_run = quanta_to_rerun(t.repo, RUN, t.graph)
    assert to_run == {"toy:group=9, step=a0", "toy_gather:group=9, step=g", "toy:group=9, step=f"}
    result2 = t.make_driver().execute(to_run)
    assert result2.ok and result2.counts["succeeded"] == 3
    assert json.loads(t.repo.path_of(ref).read_text())["value"] == 4  # all three inputs now
    report = build_report(t.repo, RUN)
    assert report["complete"] and report["partial"] == [] and report["stages"]["toy_gather"]["partial"] == 0
    assert quanta_to_rerun(t.repo, RUN, t.graph) == set()


def test_gather_below_its_minimum_is_blocked(gather_graph):
    t = gather_graph
    result = t.make_driver(_inj("a0", "a1")).execute()
    assert sorted(result.failed) == ["toy:group=9, step=a0", "toy:group=9, step=a1"]
    assert result.counts["blocked"] == 2  # the gather (1 of 3 inputs, minimum 2) and its follower
    report = build_report(t.repo, RUN)
    by_id = {f["quantum_id"]: f for f in report["failures"]}
    g = by_id["toy_gather:group=9, step=g"]
    assert g["status"] == "blocked" and g["error_class"] == "InsufficientInputs"
    assert "only 1 of 3 camera inputs" in g["error_message"] and "needs at least 2" in g["error_message"]
    assert by_id["toy:group=9, step=f"]["status"] == "blocked"
    assert [f["status"] for f in report["failures"]] == ["failed", "failed", "blocked", "blocked"]


def test_a_required_input_still_blocks(gather_graph):
    """The follower requires the gather's output: when the gather is blocked, so is the follower,
    and a failed producer of a required input blocks its consumer outright."""
    t = gather_graph
    result = t.make_driver(_inj("a0", "a1", "a2")).execute()
    assert len(result.failed) == 3 and result.counts["blocked"] == 2 and result.counts["succeeded"] == 0


def test_a_failed_fits_write_on_a_nearly_full_disk_is_storage_full(tmp_path, monkeypatch):
    """cfitsio reports ENOSPC as "status 106" without an errno, and the failed file is gone by the time the
    worker looks: a FITS write failure with less than 1 GiB free is a full disk (not retried); with room
    to spare, or another error, it is not."""
    exc = OSError("FITSIO status = 252: 1st key not SIMPLE or XTENSION\nFITSIO status = 106: error writing to FITS file")
    monkeypatch.setattr(worker.os, "statvfs", lambda p: SimpleNamespace(f_bavail=29 << 20, f_frsize=1))
    said = worker.storage_problem(exc, str(tmp_path))
    assert said and "disk is full" in said and "29 MiB free" in said
    assert worker.storage_problem(OSError("permission denied"), str(tmp_path)) is None
    monkeypatch.setattr(worker.os, "statvfs", lambda p: SimpleNamespace(f_bavail=50 << 30, f_frsize=1))
    assert worker.storage_problem(exc, str(tmp_path)) is None
