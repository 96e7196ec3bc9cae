"""The driver: submits ready quanta to Parsl, records every attempt, retries by error class.

One driver process per run (a lock file says which); it is the only writer of
provenance.  Quanta are submitted as soon as everything they read exists;
when an attempt comes back its record is stored in one transaction, then the
policy decides: succeed (release the children), retry, fail (block the
descendants) or stop the stage.  A killed driver leaves quanta in 'running';
``restart`` runs them again (outputs are idempotent: fixed paths, atomic writes).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config.campaign import Campaign
from ..errors import PlanningError, StorageFull
from ..names import check_run_name
from ..graph.graph import QuantumGraph
from ..repo import DataId, Repository
from ..repo.atomic import sweep_temporaries
from ..provenance.writer import ProvenanceWriter
from .cleanup import DRIVER_TOKEN_VAR, job_comment
from .parsl_adapter import ParslSession, executor_label, is_worker_lost
from .policy import Action, decide
from .worker import execute_quantum, start_marker

log = logging.getLogger(__name__)


def plan_dir(repo: Repository, run: str) -> Path:
    return repo.root / check_run_name(run) / "_plan"


def parsl_dir(repo: Repository, run: str, site=None) -> Path:
    """Parsl's run directory (logs, submit scripts): the site's scratch_dir/<run>, else REPO/<run>/_parsl."""
    if site is not None and site.scratch_dir:
        import os

        return Path(os.path.expandvars(site.scratch_dir)) / check_run_name(run)
    return repo.root / check_run_name(run) / "_parsl"


@dataclass
class RunResult:
    run: str
    counts: Counter = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.counts.get("blocked", 0) == 0


class DriverLock:
    """The per-run driver lock: ``flock(2)`` on ``REPO/<run>/_plan/driver.lock``.

    Taking it is one atomic system call, so two processes can never both hold it (a
    check-then-write lock could), and the kernel drops it when the holder dies, kill -9
    included, so a dead driver never blocks ``restart``.  The file's content (host, pid,
    process group, start time) is informational: junk in it is shown, never trusted.  The file
    is never unlinked (unlinking would let a waiter lock an orphaned inode).  On NFS, Linux
    maps flock to POSIX byte-range locks, which NFSv4 servers arbitrate across hosts.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self.previous: dict[str, Any] = {}

    def _read_info(self, fd: int) -> dict[str, Any]:
        try:
            raw = os.pread(fd, 4096, 0)
            info = json.loads(raw.decode("utf-8"))
            if isinstance(info, dict):
                return info
        except (OSError, ValueError):
            pass
        return {"pid": "?", "host": "?", "note": "unreadable lock content"}

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (its recorded info), or None when nobody does."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read_info(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> "DriverLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PlanningError(f"cannot open the run lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = self._read_info(fd)
            os.close(fd)
            raise PlanningError(f"run is being driven by pid {held.get('pid')} on {held.get('host')} "
                                f"(since {held.get('started')}); lock {self.path}") from None
        self.previous = self._read_info(fd)  # a dead driver's record: restart cleans up after it
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "pgid": os.getpgid(0), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": token}
        # every process this driver starts (Parsl interchange, worker pools, MPI launchers)
        # inherits the token: after a kill -9 they are found by it, whatever they renamed
        # themselves to (Parsl sets process titles)
        os.environ[DRIVER_TOKEN_VAR] = token
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # informational only (a full disk must not stop a restart from taking the lock)
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        os.environ.pop(DRIVER_TOKEN_VAR, None)
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # releases the flock
            self._fd = None


def _storage_error(exc: BaseException) -> BaseException:
    """StorageFull for the database's own words for a full or read-only disk, else ``exc``."""
    text = str(exc).lower()
    if "disk is full" in text or "readonly" in text or "read-only" in text or "no space" in text:
        return StorageFull(f"the registry cannot be written ({str(exc).splitlines()[0]}); free space "
                           f"(or make it writable), then `lsst-prod restart`")
    return exc


def _injection_for(campaign: Campaign, stage: str, data_id: DataId) -> dict[str, Any] | None:
    for spec in campaign.config.inject_failures:
        if spec.stage == stage and all(data_id.get(k) == v for k, v in spec.data_id.items()):
            return {"error": spec.error, "attempts": list(spec.attempts)}
    return None


class Driver:
    def __init__(self, repo: Repository, campaign: Campaign, graph: QuantumGraph, run: str,
                 progress: Any | None = None) -> None:
        self.repo = repo
        self.campaign = campaign
        self.graph = graph
        self.run = run
        self.writer = ProvenanceWriter(repo, run)
        self.progress = progress  # object with start(counts_by_stage), advance(stage, status), stop()
        self._producer = {key: q.id for q in graph for key in q.spec.outputs}
        self._nowork = _nowork_quanta(repo, run)
        #: consumer quantum -> the inputs it runs without (their producers failed or were blocked)
        self._left_out: dict[str, dict[tuple[str, DataId], dict[str, Any]]] = {}
        self.stage_configs = {name: cfg.model_dump(mode="json")
                              for name, cfg in campaign.config.stages.enabled().items()}

    def _payload(self, qid: str, attempt: int, executor: str,
                 memory_class: int = 0) -> dict[str, Any] | tuple[str, str]:
        """The worker's payload, or (error class, reason) when the quantum cannot run."""
        q = self.graph[qid]
        mc = self.campaign.site.classes()[memory_class]
        inputs = [r.to_dict() for r in q.prerequisites]
        prereq_keys = {(r.dataset_type, r.data_id) for r in q.prerequisites}
        for dtype, did in q.spec.inputs:
            if (dtype, did) in prereq_keys:
                continue
            left = self._left_out.get(qid, {})
            if (dtype, did) in left:
                continue  # its producer failed: this gather quantum runs without it (recorded)
            ref = self.repo.find(dtype, did, [self.run])
            if ref is None:
                if self._producer.get((dtype, did)) in self._nowork:
                    continue  # its producer found nothing to do (e.g. a detector that misses a patch)
                return "Blocked", f"input {dtype} {did} was not produced (its producer wrote nothing)"
            inputs.append(ref.to_dict())
        left_out = [dict(v) for _, v in sorted(self._left_out.get(qid, {}).items(), key=lambda kv: (kv[0][0], kv[0][1]))]
        short = _below_minimum(q.stage, q.spec.inputs, inputs, left_out)
        if short:
            return "InsufficientInputs", short
        return {
            "quantum_id": qid,
            "stage": q.stage,
            "data_id": q.data_id.to_dict(),
            "attempt": attempt,
            "run": self.run,
            "repo_root": str(self.repo.root),
            "repo_url": self.repo.url,
            "config": self.stage_configs[q.stage],
            "inputs": inputs,
            "release_id": self.campaign.config.release_id,
            "executor": executor,
            "memory_class": mc.name,
            "memory_limit_gib": None if mc.memory_gib >= 1e5 else mc.memory_gib,
            "mpi": {**self.campaign.site.mpi.model_dump(), "workdir": str(plan_dir(self.repo, self.run).parent / "_mpi")},
            "inject": _injection_for(self.campaign, q.stage, q.data_id),
            "extra": {"skymap": self.campaign.config.skymap.model_dump(mode="json"),
                      "bands": list(self.campaign.config.bands), "left_out": left_out},
            "left_out": left_out,
        }

    def _can_do_without(self, consumer: str, producer: str) -> list[tuple[str, DataId]] | None:
        """The inputs of ``consumer`` that ``producer`` writes, if the consumer's stage gathers
        every one of them (so it may run without them); None if any of them is required."""
        from ..stages import STAGES

        c = self.graph[consumer]
        gather = STAGES[c.stage].gather
        keys = [key for key in c.spec.inputs if self._producer.get(key) == producer]
        if not keys or any(t not in gather for t, _ in keys):
            return None
        return keys

    def _remove_outputs(self, record: dict[str, Any]) -> None:
        for out in record.get("outputs") or []:
            try:
                self.repo.path_of(out["path"]).unlink(missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort while the disk is failing
                pass

    def execute(self, to_run: set[str] | None = None) -> RunResult:
        """Run ``to_run`` (default: the whole graph); quanta outside it count as done."""
        to_run = {q.id for q in self.graph} if to_run is None else set(to_run)
        result = RunResult(self.run)
        pending_deps = {qid: {d for d in self.graph[qid].depends_on if d in to_run} for qid in to_run}
        attempts: Counter = Counter()
        prior = _prior_attempts(self.repo, self.run)
        site = self.campaign.site
        classes = site.classes()
        from ..stages import STAGES

        def initial_class(qid: str) -> int:
            """The stage's memory class, or the one a previous run escalated to (restart)."""
            stage = self.graph[qid].stage
            requested = self.campaign.config.stages.enabled()[stage].memory_gib
            idx = site.class_for(requested or STAGES[stage].resources.memory_gib)
            _, name, _ = prior.get(qid, (0, None, None))
            names = [c.name for c in classes]
            return max(idx, names.index(name)) if name in names else idx

        mem_class = {qid: initial_class(qid) for qid in to_run}
        uses_mpi = any(STAGES[self.graph[q].stage].resources.mpi_ranks > 0 for q in to_run)
        stopped_stages: set[str] = set()
        order = {qid: i for i, qid in enumerate(q.id for q in self.graph)}
        ready = deque(sorted((q for q, deps in pending_deps.items() if not deps), key=order.__getitem__))
        inflight: dict[Future, tuple[str, int]] = {}
        started: dict[Future, float] = {}

        def running_since(fut: Future) -> float:
            """When the worker started the attempt (its start marker), or +inf while it is queued."""
            if started[fut] == float("inf"):
                qid, attempt = inflight[fut]
                try:
                    started[fut] = start_marker(str(self.repo.root), self.run, qid, attempt).stat().st_mtime
                except OSError:
                    pass
            return started[fut]

        def walltime(qid: str) -> float:
            stage = self.graph[qid].stage
            return float(self.campaign.config.stages.enabled()[stage].walltime_s or STAGES[stage].resources.walltime_s)
        session = ParslSession(site, parsl_dir(self.repo, self.run, site), with_mpi=uses_mpi, job_comment=job_comment(self.run))
        if self.progress:
            self.progress.start(Counter(self.graph[q].stage for q in to_run))

        def finish(qid: str, status: str, reason: str | None = None) -> None:
            result.counts[status] += 1
            if status == "nowork":
                self._nowork.add(qid)
            if self.progress:
                self.progress.advance(self.graph[qid].stage, status)
            if status in ("succeeded", "nowork"):
                for child in self.graph.children(qid):
                    if child in pending_deps:
                        pending_deps[child].discard(qid)
                        if not pending_deps[child]:
                            ready.append(child)
            else:
                if status == "failed":
                    result.failed.append(qid)
                # Walk down from the failed quantum: a consumer that gathers what it lost runs
                # without it (recorded as left out); any other consumer is blocked, and is in turn
                # a lost producer for its own consumers.
                why = f"upstream {qid} {status}: {reason}"
                lost = deque([(qid, f"{status}: {reason}")])
                blocked: list[str] = []
                while lost:
                    producer, cause = lost.popleft()
                    for child in self.graph.children(producer):
                        if child not in pending_deps or producer not in pending_deps[child]:
                            continue
                        keys = self._can_do_without(child, producer)
                        if keys is not None:
                            for key in keys:
                                self._left_out.setdefault(child, {})[key] = {
                                    "dataset_type": key[0], "data_id": key[1].to_dict(), "producer": producer,
                                    "reason": cause}
                            pending_deps[child].discard(producer)
                            if not pending_deps[child]:
                                ready.append(child)
                            continue
                        pending_deps.pop(child)
                        try:
                            ready.remove(child)
                        except ValueError:
                            pass
                        result.counts["blocked"] += 1
                        if self.progress:
                            self.progress.advance(self.graph[child].stage, "blocked")
                        blocked.append(child)
                        lost.append((child, f"blocked by {qid}"))
                self.writer.set_status(blocked, "blocked", "Blocked", why)
            pending_deps.pop(qid, None)

        def submit(qid: str) -> None:
            if self.graph[qid].stage in stopped_stages:
                self.writer.set_status([qid], "blocked", "Blocked", "stage stopped after InvalidQuantum")
                finish(qid, "blocked", "stage stopped")
                return
            attempts[qid] += 1
            attempt = prior.get(qid, (0, None, None))[0] + attempts[qid]
            is_mpi = STAGES[self.graph[qid].stage].resources.mpi_ranks > 0
            label = executor_label(site, mem_class[qid], mpi=is_mpi)
            payload = self._payload(qid, attempt, label, mem_class[qid])
            if isinstance(payload, tuple):
                error_class, reason = payload
                self.writer.set_status([qid], "blocked", error_class, reason)
                finish(qid, "blocked", reason)
                return
            self.writer.set_status([qid], "running")
            fut = session.submit(execute_quantum, payload, executor=label)
            inflight[fut] = (qid, attempt)
            started[fut] = float("inf")  # not running until its worker says so (queueing is not counted)

        with session:
            while ready or inflight:
                while ready:
                    submit(ready.popleft())
                if not inflight:
                    continue
                done, _ = wait(list(inflight), timeout=1.0, return_when=FIRST_COMPLETED)
                now = time.time()
                overdue = [f for f in inflight if f not in done and now - running_since(f) > walltime(inflight[f][0])]
                for fut in list(done) + overdue:
                    elapsed = now - running_since(fut)
                    qid, attempt = inflight.pop(fut)
                    started.pop(fut, None)
                    try:
                        start_marker(str(self.repo.root), self.run, qid, attempt).unlink()
                    except OSError:
                        pass
                    try:
                        if fut in overdue:
                            raise TimeoutError(f"exceeded its walltime of {walltime(qid):.0f} s "
                                               f"(ran {elapsed:.0f} s); abandoned")
                        record = fut.result()
                    except Exception as exc:  # the worker died or hung: the task never reported
                        q = self.graph[qid]
                        record = {
                            "quantum_id": qid, "stage": q.stage, "data_id": q.data_id.to_dict(),
                            "attempt": attempt, "outcome": "failed",
                            "error_class": "WorkerLost" if is_worker_lost(exc) else "TransientError",
                            "wall_s": elapsed if elapsed != float("-inf") else None,
                            "error_message": f"{type(exc).__name__}: {exc}",
                            "executor": executor_label(site, mem_class[qid]), "memory_class": classes[mem_class[qid]].name,
                            "inputs": [], "outputs": [],
                        }
                    action = decide(record["outcome"], record.get("error_class"), attempt, self.campaign.config.retry)
                    if record.get("error_class") == "OutOfMemory":
                        if mem_class[qid] + 1 < len(classes):
                            # escalate: the next attempt (now, or after a restart) runs on a larger class
                            mem_class[qid] += 1
                            record = dict(record, memory_class_next=classes[mem_class[qid]].name)
                            log.warning("[%s] out of memory on class %s; next attempt on %s", qid,
                                        classes[mem_class[qid] - 1].name, classes[mem_class[qid]].name)
                        elif action is Action.RETRY:
                            action = Action.FAIL  # already on the largest class the site has
                    status = {Action.SUCCEED: record["outcome"], Action.RETRY: "submitted",
                              Action.FAIL: "failed", Action.STOP_STAGE: "failed", Action.BLOCK: "blocked"}[action]
                    try:
                        self.writer.record_attempt(record, status)
                    except Exception as exc:
                        # the registry cannot take the record (a full disk, a read-only file
                        # system): the attempt's files would be unregistered, so remove them, and
                        # those of the attempts still in flight once they end, before stopping;
                        # `restart` re-runs those quanta (DriverLost)
                        self._remove_outputs(record)
                        for other in wait(list(inflight), timeout=600).done:
                            try:
                                self._remove_outputs(other.result())
                            except Exception:  # noqa: BLE001 - a lost worker wrote nothing to keep
                                pass
                        raise _storage_error(exc) from exc
                    if action is Action.SUCCEED:
                        finish(qid, record["outcome"])
                    elif action is Action.RETRY:
                        log.warning("[%s] attempt %d failed (%s); retrying", qid, attempt, record.get("error_class"))
                        ready.append(qid)
                    else:
                        if action is Action.STOP_STAGE:
                            stopped_stages.add(self.graph[qid].stage)
                        finish(qid, status, f"{record.get('error_class')}: {record.get('error_message')}")
        # Every worker of the session is gone: temporaries of killed writers (a cancelled block, a
        # lost worker) can only be leftovers now; the final files were never touched by them.
        sweep_temporaries(self.repo.root / self.run)
        if self.progress:
            self.progress.stop()
        return result


def _below_minimum(stage: str, planned: tuple[tuple[str, DataId], ...], inputs: list[dict[str, Any]],
                   left_out: list[dict[str, Any]]) -> str | None:
    """Why a quantum that lost inputs cannot run (fewer than its stage's minimum of a gathered
    type), or None.  A quantum that lost nothing is never stopped here: with all its producers
    done it runs, and finds for itself whether there is work (NoWorkFound)."""
    from ..stages import STAGES

    if not left_out:
        return None
    for dtype, minimum in STAGES[stage].gather.items():
        lost = [x for x in left_out if x["dataset_type"] == dtype]
        if not lost:
            continue
        have = sum(1 for r in inputs if r["dataset_type"] == dtype)
        if have < minimum:
            n_planned = sum(1 for t, _ in planned if t == dtype)
            causes = Counter(x["producer"].split(":")[0] + " " + x["reason"].split(":")[0] for x in lost)
            return (f"only {have} of {n_planned} {dtype} inputs exist (stage {stage} needs at least {minimum}); "
                    f"{len(lost)} left out: " + ", ".join(f"{n} {c}" for c, n in causes.most_common()))
    return None


def _nowork_quanta(repo: Repository, run: str) -> set[str]:
    import sqlalchemy as sa

    from ..provenance.db import quanta

    with repo.engine.connect() as c:
        return {r.quantum_id for r in c.execute(sa.select(quanta.c.quantum_id)
                                                 .where((quanta.c.run == run) & (quanta.c.status == "nowork")))}


def _prior_attempts(repo: Repository, run: str) -> dict[str, tuple[int, str | None, str | None]]:
    """quantum -> (attempts so far, memory class of the last attempt, its error class)."""
    import sqlalchemy as sa

    from ..provenance.db import quanta

    with repo.engine.connect() as c:
        rows = c.execute(sa.select(quanta.c.quantum_id, quanta.c.n_attempts, quanta.c.memory_class,
                                   quanta.c.error_class).where(quanta.c.run == run))
        return {r.quantum_id: (int(r.n_attempts or 0), r.memory_class, r.error_class) for r in rows}
