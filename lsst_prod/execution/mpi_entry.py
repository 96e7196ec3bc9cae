"""``python -m lsst_prod.execution.mpi_entry IN OUT``: one MPI rank of a quantum.

Every rank runs the stage with the communicator; rank 0's record (with the
outputs it wrote) is written to OUT for the launching worker.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    from .worker import execute_quantum

    comm = MPI.COMM_WORLD
    payload = json.loads(open(argv[1]).read())
    record = execute_quantum(payload, comm=comm)
    outcomes = comm.gather(record["outcome"], root=0)
    if comm.Get_rank() == 0:
        if record["outcome"] == "succeeded" and any(o != "succeeded" for o in outcomes):
            record["outcome"] = "failed"
            record["error_class"] = "TransientError"
            record["error_message"] = f"rank outcomes {outcomes}"
        record["summary"] = dict(record.get("summary") or {}, mpi_size=comm.Get_size())
        tmp = argv[2] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, default=str)
        os.replace(tmp, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
