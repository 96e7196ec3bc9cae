"""``python -m lsst_prod.execution.mpi_selftest IN OUT``: an MPI reduction checked against the serial answer.

Every rank builds its share of a deterministic set of vectors (seeded by the
vector index, so the partition does not change the data), the ranks sum them
with ``Allreduce``, and rank 0 compares with the serial sum and writes the
result (ranks, hosts, Slurm job and step, max relative difference) to OUT.
Used by ``lsst-prod site check --mpi`` and the site tests.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import numpy as np


def vectors(n_vectors: int, length: int, indices) -> np.ndarray:
    out = np.zeros(length)
    for i in indices:
        out += np.random.default_rng(i).normal(size=length)
    return out


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    spec = json.loads(open(argv[1]).read())
    n, length = int(spec.get("n_vectors", 64)), int(spec.get("length", 1000))
    mine = vectors(n, length, range(rank, n, size))
    total = np.empty_like(mine)
    comm.Allreduce(mine, total, op=MPI.SUM)
    hosts = comm.gather(socket.gethostname(), root=0)
    if rank == 0:
        serial = vectors(n, length, range(n))
        rel = float(np.max(np.abs(total - serial)) / np.max(np.abs(serial)))
        result = {"ranks": size, "hosts": hosts, "max_rel_diff": rel, "ok": rel < 1e-12,
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_step_id": os.environ.get("SLURM_STEP_ID"),
                  "checksum": float(total.sum())}
        tmp = argv[2] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
