#!/usr/bin/env bash
# Install a single-node Slurm test cluster's packages (Debian 12): slurmctld, slurmd, munge.
# Root only; idempotent. Used by CI (.ci/run) and documented in docs/sites.md.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "slurm/install.sh: slurmctld, slurmd and munge already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q -o DPkg::Lock::Timeout=600 --no-install-recommends \
    slurmctld slurmd slurm-client munge libpmix2
# srun --mpi=pmix looks for libpmix.so (Debian ships only the .so.2)
if [ -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so.2 ] && [ ! -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so ]; then
    ln -sf libpmix.so.2 /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so
fi
echo "slurm/install.sh: done"
