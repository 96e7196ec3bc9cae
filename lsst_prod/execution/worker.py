"""Runs one quantum attempt on a worker and returns its provenance record.

This function is what Parsl ships to workers.  It never touches the database:
it writes output files atomically through the repository and returns a plain
dict (inputs, outputs with checksums, timings, peak memory, outcome, error
class and message, software versions) that the driver's single provenance
writer stores.  Every exception is caught and classified here, so an exception
surfacing from the Parsl future itself always means the worker was lost.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

from ..errors import AlgorithmError, InjectedFailure, LsstProdError, OutOfMemory, TransientError

LOG_TAIL_LINES = 30


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except Exception:  # pragma: no cover - non-POSIX
        return None


class _TailHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def software_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lsst-prod", "numpy", "scipy", "astropy", "fitsio", "pyarrow", "sep", "galsim", "parsl"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _inject(spec: dict[str, Any] | None, attempt: int, executor: str) -> None:
    if not spec or attempt not in spec.get("attempts", [1]):
        return
    kind = spec["error"]
    msg = f"injected {kind} failure on attempt {attempt} (campaign inject_failures)"
    if kind == "transient":
        raise InjectedFailure(msg)
    if kind == "out_of_memory":
        raise OutOfMemory(msg)
    if kind == "crash":
        if executor == "threads":
            raise InjectedFailure(msg + " [a crash cannot kill a thread; raised instead]")
        os._exit(137)
    raise AlgorithmError(msg, injected=True)


class _MemoryLimit:
    """Cap this process's data segment (RLIMIT_DATA) for one quantum: an allocation beyond the
    memory class raises MemoryError, which is recorded as OutOfMemory and retried on a larger
    class.  Works without cgroups (and under Slurm without task/cgroup).  Not applied in the
    thread executor (the limit is per process)."""

    def __init__(self, gib: float | None) -> None:
        self.gib = gib
        self.saved = None

    def __enter__(self) -> "_MemoryLimit":
        if self.gib:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
            limit = int(self.gib * (1 << 30))
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            self.saved = (soft, hard)
            resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.saved is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_DATA, self.saved)


#: Below this much free space a failed write is attributed to a full disk, whatever the library
#: that failed said (cfitsio reports "status 252", arrow "IOError").
LOW_SPACE_BYTES = 16 << 20
#: cfitsio reports a failed write (ENOSPC included) as status 106 without the errno; a write that fails
#: with less than this free is taken for a full disk (the failed file has been removed by then, so the
#: free space is back above LOW_SPACE_BYTES: seen on a 252 GB disk with 29 MB free, a coadd retried 3 times)
WRITE_FAILURE_SPACE_BYTES = 1 << 30
_WRITE_FAILURE_MARKERS = ("FITSIO status = 106", "error writing to FITS file")
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "the file system is read-only"}


def storage_problem(exc: BaseException, repo_root: str) -> str | None:
    """A sentence when ``exc`` comes from a full or read-only file system, else None."""
    code = getattr(exc, "errno", None)
    if code in _STORAGE_ERRNOS:
        return f"{_STORAGE_ERRNOS[code]} ({exc}); free space under {repo_root}, then `lsst-prod restart`"
    try:
        st = os.statvfs(repo_root)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    if free < WRITE_FAILURE_SPACE_BYTES and any(m in str(exc) for m in _WRITE_FAILURE_MARKERS):
        return (f"a FITS write failed under {repo_root} with {free // 2**20} MiB free (cfitsio: "
                f"{str(exc).splitlines()[0][:120]}): the disk is full; free space, then `lsst-prod restart`")
    if free < LOW_SPACE_BYTES:
        return (f"no space left under {repo_root} ({free // 1024} KiB free) while the quantum failed with "
                f"{type(exc).__name__}: {str(exc)[:200]}; free space, then `lsst-prod restart`")
    if not os.access(repo_root, os.W_OK):
        return f"{repo_root} is not writable ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def start_marker(repo_root: str, run: str, quantum_id: str, attempt: int) -> Path:
    """File a worker touches when an attempt starts: the driver times walltimes from it."""
    import hashlib

    key = hashlib.sha1(quantum_id.encode()).hexdigest()[:20]
    return Path(repo_root) / run / "_running" / f"{key}.{attempt}"


def execute_quantum(payload: dict[str, Any], comm: Any = None) -> dict[str, Any]:
    """Run ``payload['stage']`` on ``payload['data_id']``; return the attempt's record.

    An MPI stage (``resources.mpi_ranks > 0``) called without ``comm`` launches its ranks
    (:mod:`.mpi`) and returns rank 0's record; each rank runs this function with ``comm``.
    """
    from ..stages import STAGES

    stage_cls = STAGES[payload["stage"]]
    if comm is None or comm.Get_rank() == 0:
        marker = start_marker(payload["repo_root"], payload["run"], payload["quantum_id"], payload["attempt"])
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass  # timing falls back to submission time
    if stage_cls.resources.mpi_ranks > 0 and comm is None:
        return _execute_mpi(payload, int(payload["config"].get("mpi_ranks") or stage_cls.resources.mpi_ranks))
    from ..config.stages import STAGE_CONFIGS
    from ..repo import DataId, DatasetRef, Repository
    from ..stages.base import QuantumContext

    data_id = DataId(payload["data_id"])
    stage_name = payload["stage"]
    logger = logging.getLogger(f"lsst_prod.stages.{stage_name}")
    tail = _TailHandler()
    root = logging.getLogger("lsst_prod")
    root.addHandler(tail)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    log = logging.LoggerAdapter(logger, {"data_id": str(data_id)})

    record: dict[str, Any] = {
        "quantum_id": payload["quantum_id"],
        "stage": stage_name,
        "data_id": data_id.to_dict(),
        "attempt": payload["attempt"],
        "host": socket.gethostname(),
        "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "executor": payload.get("executor"),
        "memory_class": payload.get("memory_class"),
        "params": payload["config"],
        "versions": software_versions(),
        "inputs": payload["inputs"],
        "left_out": payload.get("left_out") or [],
        "outputs": [],
        "summary": {},
    }
    _reset_peak_rss()
    t0 = time.perf_counter()
    c0 = time.process_time()
    record["start"] = _now()
    repo = Repository(payload["repo_root"], payload.get("repo_url"))
    ctx = QuantumContext(
        repo=repo,
        run=payload["run"],
        stage=stage_name,
        data_id=data_id,
        config=STAGE_CONFIGS[stage_name].model_validate(payload["config"]),
        inputs={(r["dataset_type"], DataId(r["data_id"])): DatasetRef.from_dict(r) for r in payload["inputs"]},
        release_id=payload["release_id"],
        attempt=payload["attempt"],
        log=log,
        comm=comm,
        extra=payload.get("extra") or {},
    )
    limit = payload.get("memory_limit_gib") if payload.get("executor") != "threads" else None
    verified: dict[str, float] = {}
    try:
        log.info("[%s] %s attempt %d starting", data_id, stage_name, payload["attempt"])
        _inject(payload.get("inject"), payload["attempt"], payload.get("executor", ""))
        tv = time.perf_counter()
        nbytes = sum(repo.verify(ref) for ref in ctx.inputs.values())
        verified = {"input_mib_verified": round(nbytes / 2**20, 2), "input_verify_s": round(time.perf_counter() - tv, 4)}
        with _MemoryLimit(limit):
            stage_cls().run_quantum(ctx)
        record["outcome"] = "succeeded"
        log.info("[%s] %s succeeded", data_id, stage_name)
    except LsstProdError as exc:
        if exc.error_class == "NoWorkFound":
            record["outcome"] = "nowork"
        else:
            record["outcome"] = "failed"
        record["error_class"] = exc.error_class
        record["error_message"] = str(exc)
        record["error_metadata"] = getattr(exc, "metadata", {})
        log.warning("[%s] %s: %s: %s", data_id, stage_name, exc.error_class, exc)
    except MemoryError as exc:
        record.update(outcome="failed", error_class="OutOfMemory",
                      error_message=f"MemoryError: {exc} (memory class limit {limit} GiB)")
    except OSError as exc:
        full = storage_problem(exc, payload["repo_root"])
        if full:
            record.update(outcome="failed", error_class="StorageFull", error_message=full)
            log.error("[%s] %s: %s", data_id, stage_name, full)
        else:
            err = TransientError(f"{type(exc).__name__}: {exc}")
            record.update(outcome="failed", error_class=err.error_class, error_message=str(err))
            log.warning("[%s] %s: I/O error treated as transient: %s", data_id, stage_name, exc)
    except Exception as exc:  # a bug or unclassified failure: keep the traceback
        full = storage_problem(exc, payload["repo_root"])
        if full:  # libraries (cfitsio, arrow) report a full disk in their own words
            record.update(outcome="failed", error_class="StorageFull", error_message=full)
            log.error("[%s] %s: %s", data_id, stage_name, full)
        else:
            record.update(
                outcome="failed",
                error_class="UnexpectedError",
                error_message=f"{type(exc).__name__}: {exc}",
                error_metadata={"traceback": traceback.format_exc(limit=8)},
            )
            log.error("[%s] %s: unexpected %s: %s", data_id, stage_name, type(exc).__name__, exc)
    finally:
        root.removeHandler(tail)
    record["end"] = _now()
    record["wall_s"] = time.perf_counter() - t0
    record["cpu_s"] = time.process_time() - c0
    record["peak_rss_mib"] = _peak_rss_mib()
    if record["outcome"] == "succeeded":
        record["outputs"] = [r.to_dict() for r in ctx.outputs]
    else:
        # a failed attempt leaves no file behind: what it wrote before failing is unregistered
        for ref in ctx.outputs:
            try:
                repo.path_of(ref).unlink(missing_ok=True)
            except OSError:
                pass
        record["outputs"] = []
    record["summary"] = {**ctx.summary, **verified} if record["outcome"] == "succeeded" else ctx.summary
    if ctx.excluded:
        record["summary"] = {**record["summary"], "n_inputs_excluded": len(ctx.excluded), "excluded": ctx.excluded}
    record["log_tail"] = "\n".join(tail.lines)
    return record


def _execute_mpi(payload: dict[str, Any], ranks: int) -> dict[str, Any]:
    """Launch the quantum's MPI ranks; failures of the launch itself become a failed record."""
    from ..errors import LsstProdError
    from .mpi import run_mpi_program

    mpi = payload.get("mpi") or {}
    n = min(ranks, int(mpi.get("max_ranks", ranks)))
    start, t0 = _now(), time.perf_counter()
    try:
        record = run_mpi_program("lsst_prod.execution.mpi_entry", payload, n, mpi.get("launcher", "mpiexec"),
                                 mpi.get("launcher_options", ""), workdir=mpi.get("workdir"))
    except LsstProdError as exc:
        return {
            "quantum_id": payload["quantum_id"], "stage": payload["stage"], "data_id": payload["data_id"],
            "attempt": payload["attempt"], "outcome": "failed", "error_class": exc.error_class,
            "error_message": str(exc), "host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "executor": payload.get("executor"),
            "inputs": payload["inputs"], "left_out": payload.get("left_out") or [], "outputs": [],
            "start": start, "end": _now(),
            "wall_s": time.perf_counter() - t0, "params": payload["config"], "versions": software_versions(),
        }
    record["summary"] = dict(record.get("summary") or {}, mpi_ranks=n)
    return record
