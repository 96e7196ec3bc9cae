#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (munge + slurmctld + slurmd), no systemd needed.
# Writes /etc/slurm/slurm.conf for this host (CPUs/memory from `slurmd -C`), partition "debug".
# Idempotent: a running cluster is left alone. Stop it with slurm/stop.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
command -v slurmctld >/dev/null || bash "$HERE/install.sh"
HOST="$(hostname -s)"

if sinfo -h -o %T >/dev/null 2>&1 && [ -n "$(sinfo -h -o %T 2>/dev/null)" ]; then
    echo "slurm/start.sh: a cluster answers already: $(sinfo -h -o '%P %T %N' | tr '\n' ' ')"
    exit 0
fi

# munge
install -d -o munge -g munge -m 0755 /run/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key; chmod 0600 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf from this machine's hardware
NODELINE="$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST/") NodeAddr=127.0.0.1 State=UNKNOWN"
install -d /etc/slurm
cat > /etc/slurm/slurm.conf <<CONF
# Written by lsst-prod slurm/start.sh: a single-node test cluster.
ClusterName=lsstprod
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
$NODELINE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
install -d /var/lib/slurm/slurmd
[ -e /var/log/slurm/jobcomp.log ] || install -o slurm -g slurm -m 0644 /dev/null /var/log/slurm/jobcomp.log

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for i in $(seq 120); do
    state="$(sinfo -h -o %T 2>/dev/null | head -n 1 || true)"
    case "$state" in
        idle|mixed|allocated) echo "slurm/start.sh: node $HOST is $state"; exit 0 ;;
        down*|drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
echo "slurm/start.sh: the node did not become idle; see /var/log/slurm/slurmctld.log and slurmd.log" >&2
exit 1
