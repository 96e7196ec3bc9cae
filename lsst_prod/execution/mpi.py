"""MPI quanta: a worker launches N ranks with srun or mpiexec and collects rank 0's record.

``mpi_command`` is a pure function from (launcher, ranks, program) to argv, so
it is tested with plain asserts.  Inside a Slurm block the ranks are a job
step (``srun --overlap``: the block's worker pool already occupies the
allocation, and the step must share it); elsewhere ``mpiexec`` (MPICH's, from
the ``mpich`` wheel beside mpi4py) starts them on this node.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InvalidQuantum, TransientError


def mpi_command(launcher: str, n_ranks: int, program: list[str], options: str = "",
                in_slurm_allocation: bool = False) -> list[str]:
    """argv that runs ``program`` as ``n_ranks`` MPI ranks."""
    if n_ranks < 1:
        raise InvalidQuantum(f"an MPI job needs at least 1 rank, got {n_ranks}")
    extra = shlex.split(options)
    if launcher == "srun":
        if not in_slurm_allocation:
            raise InvalidQuantum("mpi.launcher 'srun' used outside a Slurm allocation (no SLURM_JOB_ID)")
        mpi_opt = [] if any(o.startswith("--mpi") for o in extra) else ["--mpi=pmi2"]
        return ["srun", "--overlap", f"--ntasks={n_ranks}", "--nodes=1", "--kill-on-bad-exit=1", *mpi_opt,
                *extra, *program]
    if launcher == "mpiexec":
        return ["mpiexec", "-n", str(n_ranks), *extra, *program]
    raise InvalidQuantum(f"unknown MPI launcher {launcher!r}")


def run_mpi_program(module: str, payload: dict[str, Any], n_ranks: int, launcher: str, options: str = "",
                    workdir: Path | None = None, timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``python -m module IN OUT`` as MPI ranks; return the JSON rank 0 wrote to OUT."""
    workdir = Path(workdir or tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=workdir, prefix=".mpi-") as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(payload))
        argv = mpi_command(launcher, n_ranks, [sys.executable, "-m", module, str(inp), str(out)], options,
                           in_slurm_allocation="SLURM_JOB_ID" in os.environ)
        env = dict(os.environ)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
        except FileNotFoundError as exc:
            raise InvalidQuantum(f"MPI launcher not found: {argv[0]} ({exc})") from None
        except subprocess.TimeoutExpired:
            raise TransientError(f"MPI job {' '.join(argv[:4])} ... timed out after {timeout_s} s") from None
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout)[-2000:]
            raise TransientError(f"MPI job exited with {proc.returncode}: {' '.join(argv[:6])} ...; {tail}")
        result = json.loads(out.read_text())
        result["mpi_command"] = argv[:-5]  # the launcher prefix, without "python -m module IN OUT"
        return result
